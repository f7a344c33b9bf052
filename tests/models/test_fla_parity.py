"""DeltaNetMixer reproduces fla's `DeltaNet` layer (weights copied across, fla's Triton pieces replaced
by PyTorch equivalents written here: the naive recurrence, a padded depthwise conv, a plain RMSNorm)."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.delta_rule.naive import delta_rule_recurrence

from megatron_refine.runtime import initialize, spawn

HIDDEN, HEADS, T = 32, 2, 11


def _naive_delta_rule(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **_):
    if use_qk_l2norm_in_kernel:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    o, S = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=initial_state,
                                 output_final_state=output_final_state)
    return o.transpose(1, 2), S


def _short_conv_forward(self, x, cache=None, output_final_state=False, **_):
    """nn.Conv1d's own definition: pad W-1 on the left, depthwise, then the activation."""
    y = F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=self.kernel_size[0] - 1, groups=self.groups)
    y = y[..., : x.shape[1]].transpose(1, 2)
    return (F.silu(y) if self.activation in ("silu", "swish") else y), None


def _rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


def _parity(use_gate, qk_activation, use_beta):
    import fla.layers.delta_net as fla_delta_net
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from megatron_modules import tiny_fast_weight_model

    fla_delta_net.chunk_delta_rule = fla_delta_net.fused_recurrent_delta_rule = _naive_delta_rule
    ShortConvolution.forward = _short_conv_forward
    RMSNorm.forward = _rms_norm_forward
    FusedRMSNormGated.forward = lambda self, x, g, **_: (_rms_norm_forward(self, x).float() * F.silu(g.float())).to(x.dtype)

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
