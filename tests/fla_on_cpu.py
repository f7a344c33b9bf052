"""fla's Triton pieces replaced by PyTorch references, so fla's layers and models run on CPU in fp32: the naive
delta-rule recurrence, nn.Conv1d's own causal depthwise conv, plain (gated) RMSNorm and SwiGLU."""

import torch
import torch.nn.functional as F


def _delta_rule(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **_):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    if use_qk_l2norm_in_kernel:
        q, k = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    o, S = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=initial_state,
                                 output_final_state=output_final_state)
    return o.transpose(1, 2), S


def _short_conv(self, x, cache=None, output_final_state=False, **_):
    """nn.Conv1d's own definition: pad W-1 on the left, depthwise, then the activation."""
    y = F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=self.kernel_size[0] - 1, groups=self.groups)
    y = y[..., : x.shape[1]].transpose(1, 2)
    return (F.silu(y) if self.activation in ("silu", "swish") else y), None


def _rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    x = x if residual is None else x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
    return (y, x) if prenorm else y


def use_pytorch_references() -> None:
    """Patch fla in this process (a test rank): DeltaNet layers and DeltaNetForCausalLM then run on CPU."""
    import fla  # noqa: F401 - registers delta_net with transformers
    import fla.layers.delta_net as fla_delta_net
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.mlp import SwiGLULinear

    fla_delta_net.chunk_delta_rule = fla_delta_net.fused_recurrent_delta_rule = _delta_rule
    ShortConvolution.forward = _short_conv
    RMSNorm.forward = _rms_norm
    FusedRMSNormGated.forward = lambda self, x, g, **_: (_rms_norm(self, x).float() * F.silu(g.float())).to(x.dtype)
    SwiGLULinear.forward = lambda self, x, y, weight, bias: F.linear(F.silu(x) * y, weight, bias)
