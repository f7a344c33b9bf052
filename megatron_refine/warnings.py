"""Library warnings known to be harmless here, filtered in one place: the CLI, every rank it starts (forkserver
ranks and torchrun ranks read `PYTHONWARNINGS`), the demo, the benchmarks, the recipes, and the test suite
(tests/conftest.py adds the same list to pytest's `filterwarnings`). Warnings this project raises are never in it.
A light module: importing it imports no library, so the filters are in place before megatron-core or fla speak.

`--verbose` (anywhere on the command line) or MEGATRON_REFINE_SHOW_WARNINGS=1 shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

SHOW_ENV = "MEGATRON_REFINE_SHOW_WARNINGS"

# (message prefix, category, regex of the module the warning is attributed to, or ""): none says anything a user
# can act on.
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # megatron-core at import, on CPU machines and without TE / apex (the CUDA stack's optional pieces)
    ("Transformer Engine and Apex are not installed", UserWarning, ""),
    ("Apex is not installed", UserWarning, ""),
    # megatron-core 0.16.1's TransformerConfig on its own default cuda_graph_scope
    ("full scope is deprecated", UserWarning, ""),
    # fla at import on a machine without CUDA (its PyTorch references still run)
    ("Triton is not supported on current platform", UserWarning, ""),
    # torch's distributed checkpointing under megatron-core's dist checkpoints (ShardedTensor, load_state_dict)
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, ""),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning, ""),
    # deprecations inside the libraries' own code, not ours
    ("", DeprecationWarning, r"megatron(\.|$)"),
    ("", DeprecationWarning, r"torch\.jit(\.|$)"),
    ("", DeprecationWarning, r"leptonai(\.|$)"),
    ("", DeprecationWarning, r"fastapi(\.|$)"),
    ("", DeprecationWarning, r"pydantic(\.|$)"),
    # megatron-core 0.19 at import
    ("MimoModelConfig is experimental", UserWarning, ""),
    # torch's DCP under megatron-core 0.19's sharded load, which reads each rank's shards without collectives
    # (no_dist=True) and passes the storage reader positionally
    ("torch.distributed is disabled", UserWarning, ""),
    ("The argument order of load has been changed", UserWarning, ""),
)

# (logger, message prefix): library log records of the same kind, under the same switch.
LIBRARY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # torch's CUDA build on a machine without a GPU but with a CUDA toolkit, when megatron-core 0.19 imports
    # torch.utils.cpp_extension (tensor_parallel/random.py)
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    # megatron-core 0.19 on every GPTModel built: it points to HybridModel, which 0.16.1 lacks (the migration
    # belongs with hybrid attention / fast-weight models); GPTModel keeps working there
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # megatron-core 0.19's synchronous save runs its own async writer, and it reads common.pt (kept for 0.16.1
    # readers: megatron_compat.write_common_state_file) through a function it deprecates
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    ("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated"),
)


class _DropLibraryRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _filter_library_log_records(drop: bool) -> None:
    for name, prefix in LIBRARY_LOG_RECORDS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropLibraryRecords)]:
            logger.removeFilter(f)
        if drop:
            logger.addFilter(_DropLibraryRecords(prefix))


def showing_all() -> bool:
    return os.environ.get(SHOW_ENV, "") not in ("", "0")


def filter_library_warnings() -> None:
    """Ignore LIBRARY_WARNINGS in this process and in the processes it starts; with `showing_all`, take them out
    again (a parent that filtered them passes its PYTHONWARNINGS on to this process)."""
    # Child interpreters (the launcher's forkserver, torchrun's ranks) start from PYTHONWARNINGS, which matches
    # messages literally and modules exactly: the message prefixes above as `-W` entries.
    entries = [f"ignore:{m}:{c.__name__}:" for m, c, mod in LIBRARY_WARNINGS if m and ":" not in m and not mod]
    current = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    if showing_all():
        ours = {re.escape(m) for m, _, _ in LIBRARY_WARNINGS if m}
        warnings.filters[:] = [f for f in warnings.filters
                               if not (f[0] == "ignore" and f[1] is not None and f[1].pattern in ours)]
        os.environ["PYTHONWARNINGS"] = ",".join(e for e in current if e not in entries)
        _filter_library_log_records(drop=False)
        return
    _filter_library_log_records(drop=True)
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=module)
    os.environ["PYTHONWARNINGS"] = ",".join(dict.fromkeys(current + entries))


def filterwarnings_lines() -> list[str]:
    """The same list in pytest's `filterwarnings` syntax (action:message:category:module, regexes)."""
    return [f"ignore:{re.escape(m)}:{c.__name__}:{mod}" for m, c, mod in LIBRARY_WARNINGS]


__all__ = ["LIBRARY_LOG_RECORDS", "LIBRARY_WARNINGS", "SHOW_ENV", "filter_library_warnings", "filterwarnings_lines", "showing_all"]
