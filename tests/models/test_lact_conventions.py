"""LaCT's two epsilon conventions (FastWeightConfig.ttt_l2_norm, ttt_norm_eps): the formulas on known vectors,
the authors' values in the presets, and the mixer against the layer written out from the spec with both
epsilons explicit, under each convention (the SWA part as a plain masked softmax, the fast-weight op from
`kernels/lact`, which tests/kernels/test_lact.py checks against its own spec loop)."""

import pytest
import torch
import torch.nn.functional as F
from megatron_modules import tiny_fast_weight_model

from megatron_refine.models import get_config
from megatron_refine.models.common import l2_norm, l2_norm_lact
from megatron_refine.runtime import initialize, spawn

SPEC_L2 = {  # written out from the spec, independently of models/common.py
    "lact": lambda x: x / (x.norm(dim=-1, keepdim=True) + 1e-5),
    "fla": lambda x: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6),
}


def test_l2_norm_conventions_on_known_vectors():
    x = torch.tensor([[3.0, 4.0], [3e-3, 4e-3]], dtype=torch.float64)  # norms 5 and 5e-3
    torch.testing.assert_close(l2_norm_lact(x), x / torch.tensor([[5 + 1e-5], [5e-3 + 1e-5]], dtype=torch.float64))
    torch.testing.assert_close(l2_norm(x), x / torch.tensor([[25 + 1e-6], [2.5e-5 + 1e-6]], dtype=torch.float64).sqrt())
    # Where the norm is small the two differ: 5e-3 / (5e-3 + 1e-5) = 0.998 against 5e-3 / sqrt(2.6e-5) = 0.981.
    assert abs(l2_norm_lact(x)[1].norm() - 0.998004) < 1e-6 and abs(l2_norm(x)[1].norm() - 0.980581) < 1e-6
    zero = torch.zeros(1, 4, requires_grad=True)
    l2_norm_lact(zero).sum().backward()
    assert l2_norm_lact(zero).abs().max() == 0 and torch.isfinite(zero.grad).all()
    bf16 = torch.randn(3, 8).bfloat16()
    assert l2_norm_lact(bf16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["lact_760m", "lact_tiny"])
def test_lact_presets_use_the_authors_conventions(name):
    config = get_config(name)
    assert config.ttt_norm_eps == 1e-5 and config.ttt_l2_norm == "lact"
    assert config.layernorm_epsilon == 1e-6  # the blocks' norms keep theirs


def _spec_layer(mixer, x, l2, eps):
    """The LaCT layer from ../shared/specs/architectures.md, x [B, T, h] -> [B, T, h] (one rank)."""
    cfg = mixer.config
    B, T, h = x.shape
    hd, H, D = cfg.attention_head_dim, cfg.num_lact_heads, cfg.lact_head_dim
    # in_proj fuses the spec's projections qkv (no bias), lr_proj, momentum_proj, ttt_scale_proj (biases in rate_bias)
    w_qkv, w_lr, w_momentum, w_scale = mixer.in_proj.weight.split([3 * h, 3 * H, H, H])
    b_lr, b_momentum, b_scale = mixer.rate_bias.split([3 * H, H, H])
    q, k, v = F.linear(x, w_qkv).chunk(3, dim=-1)
    half = hd // 2
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None, None] * inv_freq  # [T, 1, hd/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)

    def rope(y):  # [B, T, h] -> [B, T, heads, hd], halves rotated
        y = y.reshape(B, T, -1, hd)
        y1, y2 = y[..., :half], y[..., half:]
        return torch.cat([y1 * cos - y2 * sin, y2 * cos + y1 * sin], dim=-1)

    qa, ka, va = rope(q), rope(k), v.reshape(B, T, -1, hd)
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < cfg.window_size)  # [Tq, Tk]
    scores = torch.einsum("bqhd,bkhd->bhqk", qa, ka) / hd**0.5
    o_swa = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), va)

    heads = lambda y: y.reshape(B, T, H, D)  # noqa: E731
    fq = l2(heads(F.silu(q * mixer.qk_scale[:, 0] + mixer.qk_offset[:, 0])))
    fk = l2(heads(F.silu(k * mixer.qk_scale[:, 1] + mixer.qk_offset[:, 1])))
    fq, fk, fv = heads(rope(fq.reshape(B, T, h))), heads(rope(fk.reshape(B, T, h))), heads(F.silu(v))
    lr = F.softplus(F.linear(x, w_lr, b_lr) + mixer.base_lr_inv).reshape(B, T, H, 3)
    momentum = torch.sigmoid(F.linear(x, w_momentum, b_momentum))
    from megatron_refine.kernels import lact_swiglu

    fo, _ = lact_swiglu(fq, fk, fv, *lr.unbind(-1), *mixer.initial_weights(), chunk_size=cfg.lact_chunk_size,
                        momentum=momentum, use_muon=cfg.use_muon)
    fo = fo * torch.rsqrt(fo.pow(2).mean(-1, keepdim=True) + eps) * mixer.ttt_norm.weight
    fo = fo * F.silu(F.linear(x, w_scale, b_scale))[..., None]
    return F.linear(o_swa.reshape(B, T, h) + fo.reshape(B, T, h), mixer.out_proj.weight)


CONVENTIONS = [("lact", 1e-5), ("fla", 1e-5), ("lact", 1e-6)]


def _mixer_follows_the_config():
    initialize(seed=4, device="cpu")
    x = torch.randn(2, 40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outputs, weights = {}, None
    for l2, eps in CONVENTIONS:
        model = tiny_fast_weight_model("lact_tiny", num_layers=1, ttt_l2_norm=l2, ttt_norm_eps=eps,
                                       params_dtype=torch.float64)
        mixer = model.decoder.layers[0].self_attention
        assert mixer.ttt_norm.eps == eps
        if weights is None:  # nonzero rate biases (they start at zero), so the check sees where they are added
            weights = {n: p.detach().clone() for n, p in mixer.named_parameters()}
            weights["rate_bias"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():  # the same weights under every convention
            for n, p in mixer.named_parameters():
                p.copy_(weights[n])
        with torch.no_grad():
            for scale in (1.0, 1e-2):  # small inputs make q, k small, where the two L2 norms differ
                out, _ = mixer(scale * x.transpose(0, 1))
                expected = _spec_layer(mixer, scale * x, SPEC_L2[l2], eps)
                torch.testing.assert_close(out.transpose(0, 1), expected, atol=1e-12, rtol=1e-10)
                outputs[l2, eps, scale] = expected
    # Each convention matters: changing either one moves the output far past the tolerance above (at unit
    # inputs the L2 norms differ by ~1e-5 relative; the ttt_norm eps moves it by percent).
    for scale in (1.0, 1e-2):
        for a, b in [(CONVENTIONS[0], CONVENTIONS[2]), (CONVENTIONS[0], CONVENTIONS[1])]:
            change = (outputs[(*a, scale)] - outputs[(*b, scale)]).norm() / outputs[(*a, scale)].norm()
            assert change > (1e-6 if scale == 1.0 else 1e-3), (a, b, scale, change)


def test_lact_mixer_follows_the_configured_conventions():
    spawn(_mixer_follows_the_config, 1)
