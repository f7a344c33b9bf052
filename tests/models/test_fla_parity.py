"""DeltaNetMixer reproduces fla's `DeltaNet` layer (weights copied across, fla's Triton pieces replaced by
PyTorch equivalents: megatron_refine.conversion.fla_cpu)."""

import pytest
import torch

from megatron_refine.runtime import initialize, spawn

HIDDEN, HEADS, T = 32, 2, 11


def _parity(use_gate, qk_activation, use_beta):
    import fla.layers.delta_net as fla_delta_net
    from megatron_refine.conversion.fla_cpu import use_pytorch_references
    from megatron_modules import tiny_fast_weight_model

    use_pytorch_references()

    initialize(seed=5, device="cpu")
    torch.manual_seed(0)
    ref = fla_delta_net.DeltaNet(
        hidden_size=HIDDEN, num_heads=HEADS, use_gate=use_gate, qk_activation=qk_activation, use_beta=use_beta,
        norm_eps=1e-6,
    )
    for p in ref.parameters():  # fla initialises norms to ones: randomise everything so every weight matters
        torch.nn.init.normal_(p, std=0.3)
    model = tiny_fast_weight_model(
        "deltanet_tiny", hidden_size=HIDDEN, num_attention_heads=HEADS, use_gate=use_gate,
        qk_activation=qk_activation, use_beta=use_beta, num_layers=1,
    )
    mixer = model.decoder.layers[0].self_attention
    pieces = [ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight]
    pieces += [ref.b_proj.weight] if use_beta else []
    pieces += [ref.g_proj.weight] if use_gate else []
    with torch.no_grad():
        mixer.in_proj.weight.copy_(torch.cat(pieces))
        mixer.conv1d.weight.copy_(torch.cat([ref.q_conv1d.weight, ref.k_conv1d.weight, ref.v_conv1d.weight]))
        mixer.o_norm.weight.copy_(ref.o_norm.weight)
        mixer.out_proj.weight.copy_(ref.o_proj.weight)

    x = torch.randn(2, T, HIDDEN)
    expected, _, _ = ref(x)
    out, _ = mixer(x.transpose(0, 1))
    torch.testing.assert_close(out.transpose(0, 1), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "use_gate, qk_activation, use_beta", [(False, "silu", True), (True, "silu", True), (False, "relu", False)]
)
def test_deltanet_mixer_reproduces_fla_deltanet_layer(use_gate, qk_activation, use_beta):
    spawn(_parity, 1, use_gate, qk_activation, use_beta)
