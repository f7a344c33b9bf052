"""The delta rule on fla's Triton kernel (`fla.ops.delta_rule.chunk_delta_rule`), branch states included.

fla's kernel keeps its chunk states inside, so the states after positions chosen after the forward are read by
running the kernel again over the prefix, cut at those positions: segment j of a sequence (the tokens after its
position j - 1, up to position j) starts from the state after position j - 1 (`initial_state`) and ends at the
state after position j (`output_final_state`). One varlen call per position index covers every sequence, so a
sequence with P positions costs P calls whose lengths sum to its last position: about one more pass of the kernel
(not of the layer) over the prefix. fla's backward takes the final states' gradients and gives the initial
states', so the chain is differentiable w.r.t. k, v, beta and the initial state, like the PyTorch path's readers.
"""

from __future__ import annotations

import bisect
import functools
import os

import torch


@functools.cache
def fla_chunk_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return chunk_delta_rule


def triton_interpreting() -> bool:
    """Triton's interpreter (`TRITON_INTERPRET=1`, read by triton when fla's kernels are defined) runs them on
    a CPU with NumPy: the test suite's way to run fla's real kernels without a GPU (tests/triton_interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fla_available(x: torch.Tensor) -> bool:
    """Whether fla's Triton kernel takes this input: on CUDA in bf16 / fp16; on a CPU under Triton's interpreter
    in fp16 only (bf16 gives wrong numbers there); and fla importable."""
    if x.is_cuda:
        usable = x.dtype in (torch.bfloat16, torch.float16)
    else:
        usable = x.device.type == "cpu" and x.dtype == torch.float16 and triton_interpreting()
    return usable and fla_chunk_delta_rule() is not None


def fla_states_after(k, v, beta, scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """The `states_after` reader of `delta_rule` on fla's kernel (see the module docstring).

    k [B, T, H, K], v [B, T, H, V], beta [B, T, H] as given to the forward; packed when cu_seqlens [N + 1] is given
    (B = 1). Returns positions [B, P] -> states [B, P, H, K, V] (fp32). It reads the positions and cu_seqlens on
    the host once per call (fla's varlen kernels read their lengths there anyway).
    """
    B, T, H, K = k.shape
    k, v, beta = k.flatten(0, 1), v.flatten(0, 1), beta.flatten(0, 1)  # one time axis: [B * T, ...]
    device = k.device
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [b * T for b in range(B + 1)]

    def states_after(positions: torch.Tensor) -> torch.Tensor:
        flat = (positions + torch.arange(B, device=positions.device)[:, None] * T).flatten().tolist()
        if not flat:
            return k.new_zeros(B, 0, H, K, v.shape[-1], dtype=torch.float32)
        # Each sequence's distinct positions, in order: the chain's cut points.
        seq_of = {p: _sequence_of(bounds, p) for p in flat}
        cuts: dict[int, list[int]] = {}
        for p in sorted(set(flat)):
            cuts.setdefault(seq_of[p], []).append(p)
        seqs = sorted(cuts)
        outputs, row_of = [], {}  # row_of: position -> its row in torch.cat(outputs)
        done, state, prev_seqs = 0, None, []
        for j in range(max(len(c) for c in cuts.values())):
            step = [s for s in seqs if len(cuts[s]) > j]  # a subset of the previous step's, in the same order
            ends = [cuts[s][j] for s in step]
            begins = [cuts[s][j - 1] + 1 if j else bounds[s] for s in step]
            if j == 0:
                init = initial_state[step] if initial_state is not None else None
            else:
                rows = torch.tensor([prev_seqs.index(s) for s in step], device=device)
                init = state.index_select(0, rows)
            lengths = [e + 1 - b for b, e in zip(begins, ends)]
            index = torch.cat([torch.arange(b, e + 1) for b, e in zip(begins, ends)]).to(device)
            cu_cpu = torch.tensor([0, *lengths]).cumsum(0)
            seg = [x.index_select(0, index)[None] for x in (k, v, beta)]  # [1, total, ...]
            _, state = fla_chunk_delta_rule()(
                seg[0], seg[0], seg[1], seg[2], scale=scale, initial_state=init, output_final_state=True,
                cu_seqlens=cu_cpu.to(device), cu_seqlens_cpu=cu_cpu,
            )  # q = k: the outputs are not used
            for i, p in enumerate(ends):
                row_of[p] = done + i
            outputs.append(state)
            done, prev_seqs = done + len(step), step
        rows = torch.tensor([row_of[p] for p in flat], device=device)
        return torch.cat(outputs).index_select(0, rows).view(B, -1, H, K, v.shape[-1])

    return states_after


def _sequence_of(bounds: list[int], p: int) -> int:
    """The sequence holding flat position p: bounds[s] <= p < bounds[s + 1]."""
    return bisect.bisect_right(bounds, p) - 1
