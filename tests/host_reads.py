"""Counting host reads of tensor values (what stalls the stream on CUDA) on any device, for the tests that
check a loop never makes one: the Python-level reads by a `TorchFunctionMode`, and the reads ops make inside
C++ (torch.multinomial's argument checks, for one) from the profiler's `aten::_local_scalar_dense` events."""

import collections

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

_T = torch.Tensor
# Python-level reads of values (all go through __torch_function__ in torch >= 2.x, checked below) ...
_READS = {_T.item, _T.tolist, _T.numpy, _T.__bool__, _T.__int__, _T.__index__, _T.__float__}
# ... and ops whose output shape depends on values: they read on the host inside C++, where the mode can't see.
_DATA_SHAPED = {torch.nonzero, _T.nonzero, torch.unique, _T.unique, torch.unique_consecutive, torch.masked_select,
                _T.masked_select}


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor's values (what syncs the stream on CUDA) made under it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self._profile = profile(activities=[ProfilerActivity.CPU])

    def __enter__(self):
        self._profile.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._profile.__exit__(*exc)
        native = sum(e.name == "aten::_local_scalar_dense" for e in self._profile.events())
        if native and not self.calls:  # Python-level reads make some too: those are counted above, by name
            self.calls["inside an op (aten::_local_scalar_dense)"] = native
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or func in _DATA_SHAPED:
            self.calls[func.__name__] += 1
        elif func is _T.__getitem__ and any(_is_mask(i) for i in _indices(args[1])):
            self.calls["boolean mask index"] += 1
        elif func in (torch.repeat_interleave, _T.repeat_interleave) and len(args) > 1 and \
                isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None:
            self.calls["repeat_interleave without output_size"] += 1
        return func(*args, **kwargs)


def _indices(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool
