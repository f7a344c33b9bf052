"""Tiny megatron-core modules for the runtime tests (built on the current parallel state)."""

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules

from megatron_refine.models.mixers import MIXERS

HIDDEN, FFN = 16, 32


def tiny_config(tp: int = 1, sequence_parallel: bool = False) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=2,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )


def swiglu_mlp(config: TransformerConfig) -> MLP:
    """Megatron's own MLP with local (non-TE) parallel linears: fc1 fuses gate and up."""
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return MLP(config, submodules, ffn_hidden_size=config.ffn_hidden_size)


VOCAB = 37
# Every mixer of the table ships a tiny preset: the model tests run each fast-weight one, and a hybrid with attention
# layers (attention alone, a plain transformer, runs in the mixer-table tests; the hybrid covers its layers).
TINY_MODELS = [f"{name}_tiny" for name in MIXERS if name != "attention"] + ["hybrid_tiny"]


def tiny_fast_weight_model(name: str, **overrides):
    """A tiny DeltaNet / LaCT model on the current parallel state (weights on CPU)."""
    from megatron.core import parallel_state

    from megatron_refine.models import build_model, get_config

    overrides.setdefault("tensor_model_parallel_size", parallel_state.get_tensor_model_parallel_world_size())
    overrides.setdefault("pipeline_model_parallel_size", parallel_state.get_pipeline_model_parallel_world_size())
    config = get_config(name, use_cpu_initialization=True, **overrides)
    return build_model(config, VOCAB)


def token_batch(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_gradients_close(model, grads, reference, rel: float = 1e-9) -> None:
    """Per-parameter gradients equal, within `rel` of the reference's global norm (fp64 comparisons)."""
    scale = torch.stack([g.norm() for g in reference if g is not None]).norm()
    for (name, _), a, b in zip(model.named_parameters(), grads, reference):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, atol=rel * scale, rtol=1e-7, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def nan_losses():
    """Inside the block the trainer's NTP forward returns NaN losses (what a diverged step looks like)."""
    import megatron_refine.training.trainer as trainer_module

    real = trainer_module._ntp_forward_step

    def nan_forward_step(trainer):
        def forward(data_iterator, model):
            output, loss_func = real(trainer)(data_iterator, model)
            return output * float("nan"), loss_func
        return forward

    trainer_module._ntp_forward_step = nan_forward_step
    try:
        yield
    finally:
        trainer_module._ntp_forward_step = real
