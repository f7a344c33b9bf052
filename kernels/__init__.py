"""Fast-weight ops: math only, no Megatron. Layout [B, T, H, D] (fla's).

- `delta_rule`, `delta_rule_step`, `recurrent_delta_rule`: DeltaNet (fla's Triton kernel on CUDA, PyTorch elsewhere);
  `gated_delta_rule`, `gated_delta_rule_step`, `recurrent_gated_delta_rule`: Gated DeltaNet's (the same code, g given).
- `context_parallel_delta_rule` (g optional), `context_parallel_bytes`: the chunked ops over a sequence split across
  the ranks of a process group, the state passed between them (`delta_rule/context_parallel.py`).
- `lact_swiglu`, `lact_swiglu_step`, `LaCTState`: LaCT's large-chunk fast-weight SwiGLU.
The chunked ops can return `states_after` (`output_states_after=True`): a function of positions [B, P], chosen after the
forward, giving differentiably the states after those tokens from the forward's own chunk states; all take
`cu_seqlens` for packed sequences (fla's varlen convention, `varlen.py`), each restarting from its own state.
- `set_debug_checks`: the value checks (NaN / Inf, `cu_seqlens` contents, position ranges) read tensors on the
  host, so by default they run on CPU tensors only: on CUDA the ops never stall the stream inside the layer loop.
"""

from megatron_refine.kernels.delta_rule import (
    context_parallel_bytes,
    context_parallel_delta_rule,
    delta_rule,
    delta_rule_step,
    fla_available,
    gated_delta_rule,
    gated_delta_rule_step,
    recurrent_delta_rule,
    recurrent_gated_delta_rule,
)
from megatron_refine.kernels.lact import (
    LACT_NS_COEFFICIENTS,
    MUON_NS_COEFFICIENTS,
    LaCTState,
    lact_swiglu,
    lact_swiglu_step,
    low_rank_fast_weight,
    zeropower_via_newtonschulz5,
)
from megatron_refine.kernels.utils import get_debug_checks, set_debug_checks

__all__ = [
    "LACT_NS_COEFFICIENTS",
    "MUON_NS_COEFFICIENTS",
    "LaCTState",
    "context_parallel_bytes",
    "context_parallel_delta_rule",
    "delta_rule",
    "delta_rule_step",
    "fla_available",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "get_debug_checks",
    "lact_swiglu",
    "lact_swiglu_step",
    "low_rank_fast_weight",
    "recurrent_delta_rule",
    "recurrent_gated_delta_rule",
    "set_debug_checks",
    "zeropower_via_newtonschulz5",
]
