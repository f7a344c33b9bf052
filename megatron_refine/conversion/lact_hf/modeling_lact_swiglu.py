"""LaCT language models (`lact_swiglu`) for Hugging Face transformers, shipped by megatron-refine in its exports.

The LaCT authors' LaCTForCausalLM (a1600012888/LaCT, `lact_llm/lact_model`) with the same parameter names, shapes
and config fields, in plain PyTorch (CPU or GPU; no Triton, no flash-attn), plus a decoding cache: per layer the
fast weights with their momentum and weight-norm targets, the partial chunk's keys / values / rates, and the
sliding window's keys and values. `generate` then runs one token a step; the authors' model re-runs the prefix.

A layer: qkv = Linear(h, 3h), shared by
  - sliding-window causal attention (RoPE, window `window_size`, the query included), and
  - the fast-weight SwiGLU memory f(x) = w1 (silu(w0 x) * (w2 x)) per fast-weight head: q, k rescaled per
    channel (qk_scale, qk_offset), SiLU on q, k, v (q, k only with no_v_silu), L2-normalised q, k, RoPE; per large
    chunk of `lact_chunk_size` tokens, apply then update: the chunk's queries read the weights the previous chunks
    left, then one gradient step on sum_t lr_t <f(k_t), v_t> (rates softplus(lr_proj(x) + b), per weight), with
    momentum (the chunk's mean sigmoid(momentum_proj(x))), Muon (Newton-Schulz-5) and each row rescaled to its
    initial norm; output ttt_norm(f(q)) * silu(ttt_scale_proj(x)).
The two are summed and projected by o_proj. Fast-weight math runs in fp32. Rows of a batch must be unpadded
(attention_mask all ones): a padding token would be written into the memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lact_swiglu import LaCTSWIGLUConfig

# The authors' Newton-Schulz schedule: one (a, b, c) per iteration.
NS_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                   (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
BASE_LR = 1e-3  # softplus(lr_proj(x) + inv_softplus(BASE_LR)): the authors' "mamba" parameterisation
# Config options of the authors' code this implementation leaves out: (field, the only value supported).
SUPPORTED_ONLY = (("attn_qk_norm", False), ("qkv_bias", False), ("lr_dim", 1),
                  ("lr_parameterization", "mamba"), ("ttt_prenorm", False), ("ttt_loss_type", "dot_product"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def l2_norm(x: torch.Tensor, convention: str) -> torch.Tensor:
    if convention == "lact":  # the authors' ttt_operation.l2_norm
        return x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # fla's l2norm


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, T, H, D] rotated by positions [T] (non-interleaved halves, as fla's RotaryEmbedding); fp32 math."""
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    angle = positions.double()[:, None] * inv_freq  # [T, D/2], fp64 so long positions stay exact
    angle = torch.cat([angle, angle], dim=-1)[:, None, :]  # [T, 1, D]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * angle.cos().float() + torch.cat([-x2, x1], dim=-1) * angle.sin().float()).to(x.dtype)


def window_attention(q, k, v, k_past, v_past, window: int, block: int = 1024) -> torch.Tensor:
    """Causal attention in which each query sees itself and the window - 1 keys before it.

    q, k, v [B, T, H, D] (q, k rotated); k_past, v_past [B, P, H, D]: the P <= window - 1 keys and values
    before the first query. Queries run in blocks, each against its own key range: memory O(T * window)."""
    B, T, H, D = q.shape
    P = k_past.shape[1]
    keys, values = torch.cat([k_past, k], dim=1).transpose(1, 2), torch.cat([v_past, v], dim=1).transpose(1, 2)
    q = q.transpose(1, 2)  # [B, H, T, D]
    out = []
    for s in range(0, T, block):
        e = min(T, s + block)
        lo = max(0, P + s - window + 1)  # the first key any query of the block sees
        qi = torch.arange(P + s, P + e, device=q.device)[:, None]
        kj = torch.arange(lo, P + e, device=q.device)[None, :]
        mask = (kj <= qi) & (qi - kj < window)
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], keys[:, :, lo:P + e], values[:, :, lo:P + e],
                                                  attn_mask=mask))
    return torch.cat(out, dim=2).transpose(1, 2)


def newton_schulz5(G: torch.Tensor) -> torch.Tensor:
    """Approximately orthogonalise each G [M, m, n] (Muon), Frobenius-normalised first; fp32."""
    X = G.float()
    wide = X.shape[-2] <= X.shape[-1]
    X = X if wide else X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in NS_COEFFICIENTS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


def swiglu(w0, w1, w2, x: torch.Tensor) -> torch.Tensor:
    """f(x) for x [M, L, D] and weights [M, Dh, D], [M, D, Dh], [M, Dh, D]."""
    return (F.silu(x @ w0.mT) * (x @ w2.mT)) @ w1.mT


class FastWeightMemory:
    """One layer's fast-weight memory for M = batch x fast-weight heads rows, fp32. Holds the weights, the last
    update (momentum), the rows' initial norms, and the partial chunk's tokens as a list of segments (appending
    a decoded token copies nothing; the chunk is concatenated once, when its update fires)."""

    def __init__(self, w0, w1, w2, batch_size: int, chunk_size: int, use_momentum: bool, use_muon: bool):
        self.w = [x.float().repeat(batch_size, 1, 1) for x in (w0, w1, w2)]  # [M, rows, cols]
        self.norms = [x.norm(dim=-1, keepdim=True) for x in self.w]
        self.dw = [torch.zeros_like(x) for x in self.w] if use_momentum else None
        self.chunk_size, self.use_muon = chunk_size, use_muon
        self.pending, self.length = [], 0  # the partial chunk: [(k, v, lr, momentum)], its tokens

    def _update(self) -> None:
        """The completed chunk's step: gradient ascent on sum_t lr_t <f(k_t), v_t>, per weight."""
        k, v, lr = (torch.cat([p[i] for p in self.pending], dim=1) for i in range(3))  # [M, C, D], [M, C, 3]
        w0, w1, w2 = self.w
        gate, hidden = k @ w0.mT, k @ w2.mT  # [M, C, Dh]
        sig = torch.sigmoid(gate)
        act = gate * sig
        dh = v @ w1
        d_gate = dh * hidden * sig * (1 + gate * (1 - sig))  # silu'(x) = sig(x) (1 + x (1 - sig(x)))
        dw = [d_gate.mT @ (k * lr[..., 0:1]), (v * lr[..., 1:2]).mT @ (act * hidden), (dh * act).mT @ (k * lr[..., 2:3])]
        if self.dw is not None:
            m = torch.cat([p[3] for p in self.pending], dim=1).mean(dim=1)[:, None, None]  # [M, 1, 1]
            dw = [d + m * prev for d, prev in zip(dw, self.dw)]
            self.dw = dw
        step = [newton_schulz5(d) for d in dw] if self.use_muon else dw
        self.w = [(w + s) / ((w + s).norm(dim=-1, keepdim=True) + 1e-5) * n for w, s, n in zip(self.w, step, self.norms)]
        self.pending, self.length = [], 0

    def __call__(self, q, k, v, lr, momentum) -> torch.Tensor:
        """q, k, v [M, T, D], lr [M, T, 3], momentum [M, T] or None -> f(q) [M, T, D] (any T: prefill or a step)."""
        out, t, T = [], 0, q.shape[1]
        while t < T:
            if self.length == self.chunk_size:  # the chunk completed: update before the next token reads
                self._update()
            n = min(self.chunk_size - self.length, T - t)
            out.append(swiglu(*self.w, q[:, t:t + n]))
            self.pending.append((k[:, t:t + n], v[:, t:t + n], lr[:, t:t + n],
                                 None if momentum is None else momentum[:, t:t + n]))
            self.length, t = self.length + n, t + n
        return torch.cat(out, dim=1)


class LaCTCache:
    """The decoding state of every layer: {layer index: (FastWeightMemory, window keys, window values)}."""

    def __init__(self):
        self.layers: dict[int, tuple] = {}
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.layers)


class LowRankFastWeight(nn.Module):
    """An initial fast weight w_left @ w_right + 0.5 I (the authors' w0_w2_low_rank)."""

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))

    def forward(self) -> torch.Tensor:
        rows, cols = self.w_left.shape[1], self.w_right.shape[2]
        return self.w_left @ self.w_right + 0.5 * torch.eye(rows, cols, dtype=self.w_left.dtype, device=self.w_left.device)


class LaCTSWIGLULayer(nn.Module):
    def __init__(self, config: LaCTSWIGLUConfig, layer_idx: int):
        super().__init__()
        for name, value in SUPPORTED_ONLY:
            if getattr(config, name, value) != value:
                raise ValueError(f"{name}={getattr(config, name)!r} is not implemented by this LaCT code "
                                 f"(megatron-refine's export supports only {name}={value!r})")
        if config.ttt_l2_norm not in ("lact", "fla"):
            raise ValueError(f"ttt_l2_norm must be 'lact' or 'fla', got {config.ttt_l2_norm!r}")
        self.config, self.layer_idx = config, layer_idx
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attn_heads, h // config.num_attn_heads
        self.num_fw_heads, self.fw_head_dim = config.num_lact_heads, h // config.num_lact_heads
        H, d = self.num_fw_heads, self.fw_head_dim
        d_h = int(d * config.inter_multi)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        if config.w0_w2_low_rank > 0:
            self.w0 = LowRankFastWeight(H, d_h, d, config.w0_w2_low_rank)
            self.w2 = LowRankFastWeight(H, d_h, d, config.w0_w2_low_rank)
        else:
            self.w0 = nn.Parameter(torch.empty(H, d_h, d))
            self.w2 = nn.Parameter(torch.empty(H, d_h, d))
        self.w1 = nn.Parameter(torch.empty(H, d, d_h))
        self.lr_proj = nn.Linear(h, 3 * H)
        self.base_lr_inv = math.log(math.expm1(BASE_LR))
        self.qk_scale = nn.Parameter(torch.ones(h, 2))
        self.qk_offset = nn.Parameter(torch.zeros(h, 2))
        if config.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(h, H)
        self.ttt_norm = RMSNorm(d, eps=config.ttt_norm_eps)
        if config.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(h, H), nn.Sigmoid())

    def initial_weights(self) -> list[torch.Tensor]:
        return [w() if isinstance(w, LowRankFastWeight) else w for w in (self.w0, self.w1, self.w2)]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LaCTCache | None) -> torch.Tensor:
        """x [B, T, h], positions [T] (absolute) -> [B, T, h]; continues from and updates `cache` when given."""
        cfg = self.config
        B, T, h = x.shape
        H, d = self.num_fw_heads, self.fw_head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        state = cache.layers.get(self.layer_idx) if cache is not None else None
        if state is None:
            memory = FastWeightMemory(*self.initial_weights(), B, cfg.lact_chunk_size, cfg.use_momentum, cfg.use_muon)
            k_past = x.new_zeros(B, 0, self.num_heads, self.head_dim)
            state = (memory, k_past, k_past)
        memory, k_past, v_past = state

        heads = lambda y: y.reshape(B, T, -1, self.head_dim)  # noqa: E731
        qa, ka, va = rotary(heads(q), positions, cfg.rope_theta), rotary(heads(k), positions, cfg.rope_theta), heads(v)
        o_swa = window_attention(qa, ka, va, k_past, v_past, cfg.window_size).reshape(B, T, h)

        fq = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
        fk = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fw = lambda y: y.reshape(B, T, H, d)  # noqa: E731
        fq, fk, fv = fw(fq), fw(fk), fw(v)
        if cfg.qkv_silu:  # no_v_silu: on q and k only
            fq, fk = F.silu(fq), F.silu(fk)
            fv = fv if cfg.no_v_silu else F.silu(fv)
        fq, fk = l2_norm(fq, cfg.ttt_l2_norm), l2_norm(fk, cfg.ttt_l2_norm)
        if not cfg.ttt_nope:  # the attention heads' RoPE on the fast-weight q, k (head dims nest)
            fq = fw(rotary(heads(fq.reshape(B, T, h)), positions, cfg.rope_theta))
            fk = fw(rotary(heads(fk.reshape(B, T, h)), positions, cfg.rope_theta))
        rows = lambda y: y.float().transpose(1, 2).reshape(B * H, T, *y.shape[3:])  # [B, T, H, ...] -> [M, T, ...]
        lr = F.softplus(self.lr_proj(x).float() + self.base_lr_inv).reshape(B, T, H, 3)
        momentum = rows(self.momentum_proj(x)[..., None])[..., 0] if cfg.use_momentum else None
        fo = memory(rows(fq), rows(fk), rows(fv), rows(lr), momentum)  # [M, T, d]
        fo = self.ttt_norm(fo.reshape(B, H, T, d).transpose(1, 2).to(x.dtype))  # [B, T, H, d]
        if cfg.learnable_ttt_scale:
            fo = fo * F.silu(self.ttt_scale_proj(x))[..., None]
        if cache is not None:
            keep = cfg.window_size - 1
            k_window = torch.cat([k_past, ka], dim=1)[:, max(0, k_past.shape[1] + T - keep):]
            v_window = torch.cat([v_past, va], dim=1)[:, max(0, v_past.shape[1] + T - keep):]
            cache.layers[self.layer_idx] = (memory, k_window, v_window)
        return self.o_proj(o_swa + fo.reshape(B, T, h))


class LaCTMLP(nn.Module):
    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__()
        h = config.hidden_size
        inter = config.intermediate_size or 256 * math.ceil(int(h * config.hidden_ratio * 2 / 3) / 256)
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LaCTBlock(nn.Module):
    def __init__(self, config: LaCTSWIGLUConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = LaCTSWIGLULayer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = LaCTMLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LaCTCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.mlp(self.mlp_norm(x))


class LaCTPreTrainedModel(PreTrainedModel):
    config_class = LaCTSWIGLUConfig
    base_model_prefix = "model"
    _no_split_modules = ["LaCTBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """The authors' initialisation (normal(initializer_range) linears and embeddings, their fast weights)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LowRankFastWeight):
            gain = self.config.fw_init_gain
            nn.init.normal_(module.w_left, std=gain / math.sqrt(module.w_left.shape[-1]))
            nn.init.normal_(module.w_right, std=gain / math.sqrt(module.w_right.shape[-1]))
        elif isinstance(module, LaCTSWIGLULayer):
            nn.init.ones_(module.qk_scale)
            nn.init.zeros_(module.qk_offset)
            for w in (module.w0, module.w2):
                if isinstance(w, nn.Parameter):
                    nn.init.normal_(w, std=1 / math.sqrt(module.fw_head_dim))
            nn.init.normal_(module.w1, std=1 / math.sqrt(module.w1.shape[-1]))


class LaCTModel(LaCTPreTrainedModel):
    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LaCTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, use_cache=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported (a padding token would be written into the fast "
                             "weights): generate prompts of equal length together, or one at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        past = _cache_argument(past_key_values, kwargs)
        cache = past if isinstance(past, LaCTCache) else (LaCTCache() if use_cache else None)
        offset = cache.seen_tokens if cache is not None else 0
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden is not None:
                hidden.append(x)
            x = layer(x, positions, cache)
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        if cache is not None:
            cache.seen_tokens += x.shape[1]
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache,
                                       hidden_states=None if hidden is None else tuple(hidden))


def _cache_argument(past_key_values, kwargs: dict):
    """The decoding cache, under either name: transformers 5.24 renamed `past_key_values` to `cache` (generate
    passes the new name, older versions the old one)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


class LaCTForCausalLM(LaCTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__(config)
        self.model = LaCTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own LaCTCache

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      use_cache=True, **kwargs):
        past_key_values = _cache_argument(past_key_values, kwargs)
        if isinstance(past_key_values, LaCTCache) and past_key_values.seen_tokens:
            input_ids = input_ids[:, past_key_values.seen_tokens:]  # only the tokens the cache has not seen
        elif inputs_embeds is not None:
            return {"inputs_embeds": inputs_embeds, "past_key_values": past_key_values, "use_cache": use_cache}
        return {"input_ids": input_ids.contiguous(), "past_key_values": past_key_values, "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep: int = 0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=_cache_argument(past_key_values, kwargs),
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)
