"""The (gated) delta rule on fla's Triton kernels (`fla.ops.delta_rule.chunk_delta_rule`,
`fla.ops.gated_delta_rule.chunk_gated_delta_rule`), branch states included.

fla's kernel keeps its chunk states inside, so the states after positions chosen after the forward are read by
running the kernel again over the prefix, cut at those positions: segment j of a sequence (the tokens after its
position j - 1, up to position j) starts from the state after position j - 1 (`initial_state`) and ends at the
state after position j (`output_final_state`). One varlen call per position index covers every sequence, so a
sequence with P positions costs P calls whose lengths sum to its last position: about one more pass of the kernel
(not of the layer) over the prefix. fla's backward takes the final states' gradients and gives the initial
states', so the chain is differentiable w.r.t. k, v, beta (g) and the initial state, like the PyTorch path's
readers.
"""

from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass

import torch


@functools.cache
def fla_chunk_delta_rule():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return chunk_delta_rule


@functools.cache
def fla_chunk_gated_delta_rule():
    """fla's `chunk_gated_delta_rule(q, k, v, g, beta, ...)`, called with its defaults: no L2 norm, sigmoid or
    gate activation inside the kernel (the caller's q, k, beta and log decay g are used as given), and the
    state laid out [N, H, K, V] (`state_v_first=False`), as ours."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return chunk_gated_delta_rule


def triton_interpreting() -> bool:
    """Triton's interpreter (`TRITON_INTERPRET=1`, read by triton when fla's kernels are defined) runs them on
    a CPU with NumPy: the test suite's way to run fla's real kernels without a GPU (tests/triton_interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fla_available(x: torch.Tensor) -> bool:
    """Whether fla's Triton kernels take this input: on CUDA in bf16 / fp16; on a CPU under Triton's interpreter
    in fp16 only (bf16 gives wrong numbers there); and fla's kernels importable (both: one fla release)."""
    if x.is_cuda:
        usable = x.dtype in (torch.bfloat16, torch.float16)
    else:
        usable = x.device.type == "cpu" and x.dtype == torch.float16 and triton_interpreting()
    return usable and fla_chunk_delta_rule() is not None and fla_chunk_gated_delta_rule() is not None


@dataclass
class _Segments:
    """One varlen call of the chain: segment i runs tokens index[cu[i]:cu[i + 1]] of the flat time axis."""

    index: torch.Tensor  # [total] token indices
    cu_seqlens: torch.Tensor  # [n + 1], on the device
    cu_seqlens_cpu: torch.Tensor  # the same on the host: fla reads no lengths back
    sequences: list[int]  # the sequence of each segment
    init_rows: torch.Tensor | None  # [n]: each segment's initial state, a row of the previous call's final states


@dataclass
class _Plan:
    calls: list[_Segments]
    rows: torch.Tensor  # [B * P]: each position's row in the concatenated final states of all calls


def _plan(positions: torch.Tensor, B: int, T: int, cu_seqlens: torch.Tensor | None) -> _Plan:
    """Where to cut the prefixes for positions [B, P]: read on the host once per positions tensor (and cu_seqlens),
    then kept on the tensor for every layer that reads the same positions (as fla caches its varlen indices)."""
    key = (B, T, cu_seqlens)
    cached = getattr(positions, "_fla_branch_plan", None)
    if cached is not None and cached[0][:2] == key[:2] and cached[0][2] is cu_seqlens:
        return cached[1]
    device = positions.device
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [b * T for b in range(B + 1)]
    flat = (positions + torch.arange(B, device=device)[:, None] * T).flatten().tolist()
    cuts: dict[int, list[int]] = {}  # each sequence's distinct positions, in order: the chain's cut points
    for p in sorted(set(flat)):
        cuts.setdefault(bisect.bisect_right(bounds, p) - 1, []).append(p)
    calls, row_of, previous = [], {}, []
    for j in range(max(map(len, cuts.values()), default=0)):
        seqs = [s for s in sorted(cuts) if len(cuts[s]) > j]  # a subset of the previous call's, in its order
        begins = [cuts[s][j - 1] + 1 if j else bounds[s] for s in seqs]
        ends = [cuts[s][j] for s in seqs]
        cu = torch.tensor([0, *(e + 1 - b for b, e in zip(begins, ends))]).cumsum(0)
        init_rows = torch.tensor([previous.index(s) for s in seqs], device=device) if j else None
        index = torch.cat([torch.arange(b, e + 1) for b, e in zip(begins, ends)]).to(device)
        calls.append(_Segments(index, cu.to(device), cu, seqs, init_rows))
        row_of.update({p: len(row_of) + i for i, p in enumerate(ends)})
        previous = seqs
    plan = _Plan(calls, torch.tensor([row_of[p] for p in flat], dtype=torch.long, device=device))
    positions._fla_branch_plan = (key, plan)
    return plan


def fla_states_after(
    k, v, beta, scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, g=None
):
    """The `states_after` reader of `delta_rule` (g None) and `gated_delta_rule` on fla's kernels (see the module
    docstring).

    k [B, T, H, K], v [B, T, H, V], beta [B, T, H] (g [B, T, H]) as given to the forward; packed when cu_seqlens
    [N + 1] is given (B = 1). Returns positions [B, P] -> states [B, P, H, K, V] (fp32). The positions and
    cu_seqlens are read on the host once per positions tensor, whichever the number of layers reading it (`_plan`).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    # one time axis: [B * T, ...]; the log decays in fp32, as the forward gives them to fla
    inputs = [x.flatten(0, 1) for x in (k, v, beta)] + ([] if g is None else [g.float().flatten(0, 1)])

    def states_after(positions: torch.Tensor) -> torch.Tensor:
        plan = _plan(positions, B, T, cu_seqlens)
        if not plan.calls:
            return inputs[0].new_zeros(B, 0, H, K, V, dtype=torch.float32)
        finals, state = [], None
        for call in plan.calls:
            if call.init_rows is None:
                init = initial_state[call.sequences] if initial_state is not None else None
            else:
                init = state.index_select(0, call.init_rows)
            seg_k, seg_v, seg_beta, *seg_g = (x.index_select(0, call.index)[None] for x in inputs)  # [1, total, ...]
            kernel = fla_chunk_delta_rule() if g is None else fla_chunk_gated_delta_rule()
            _, state = kernel(
                seg_k, seg_k, seg_v, *seg_g, seg_beta, scale=scale, initial_state=init, output_final_state=True,
                cu_seqlens=call.cu_seqlens, cu_seqlens_cpu=call.cu_seqlens_cpu,
            )  # q = k: the outputs are not used
            finals.append(state)
        return torch.cat(finals).index_select(0, plan.rows).view(B, -1, H, K, V)

    return states_after
