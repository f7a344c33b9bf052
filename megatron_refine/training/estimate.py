"""Per-GPU memory and step time of a training layout, from the model config alone (no GPU, no process group).

Parameters are counted from the layer shapes (`parameter_count`, equal to `build_model` on the meta device: tested
for every preset). Memory per GPU, Megatron's accounting with bf16 weights, fp32 gradient buffers
(`grad_reduce_in_fp32`) and the distributed optimizer (fp32 main weights + Adam's two moments, 12 bytes a
parameter, sharded over DP):

    weights 2 P / (TP PP) + gradients 4 P / (TP PP) + optimizer 12 P / (TP PP DP)

Activations are the tensors a layer's backward keeps per token (`layer_activation_bytes`; a mixer's share, its REFINE
branch bytes and its decoding state come from its entry in `models/mixers.py`), divided by TP under sequence
parallelism: the SwiGLU MLP's as megatron-core keeps them (counted with saved-tensor hooks on a CPU);
DeltaNet's NTP forward on fla's chunk kernel, counted from the tensors it saves (bf16 inputs of the norm,
projections and convolution, q / k / v / beta, the chunk-start states, the output and its norm: an estimate, fla
is not measurable on a CPU); LaCT's PyTorch chunked path, the same on every device, as measured on a CPU in fp32
(an upper bound for bf16 training).
With full recomputation (`recompute_granularity=full`, `recompute_method=uniform`, `recompute_num_layers=1`) a
layer keeps only its input, plus one layer's full set while it is recomputed. The vocabulary-parallel logits and
their fp32 softmax add 6 V / TP bytes a token on the last stage. These are estimates from shapes: allocator
fragmentation, communication buffers and kernel workspaces (typically a few GB) come on top.

REFINE's extra (mid-training, `n_chunks` positions a document): DeltaNet's branch states on fla's kernel are read
by the kernel chained over the prefix cut at the positions (`kernels/delta_rule/fla_path.py`), whose backward
keeps its own bf16 copies of k, v and beta and fla's per-chunk matrix A (64 values a token and head) over the
prefix (`deltanet_branch_bytes`; off CUDA the PyTorch chunked path keeps more, `deltanet_reference_bytes`); the
decoder holds n_chunks x n rollout states per layer. REFINE cannot use activation recomputation
(`TrainConfig.validate` refuses it: a recomputed layer would detach the branch states it leaves beside its output).

Hybrid models (`hybrid_layer_pattern`) sum every figure over their layers, each layer its own mixer's entry (a
pipeline stage: its own layers). An attention layer's NTP activations per token are constant (a flash-attention
kernel), but its decoding state is every earlier token's key and value (`cache_values` a token). REFINE's branch cache
of a position is the forward's own keys and values, shared by every branch and rollout of the row (nothing copied);
what grows with T is the scoring forward's attention probabilities over that prefix, per branch row (B x n_chunks x
n rows, `branch_row_bytes`: `branch_rows_bytes`). An evaluation's decoding caches grow with its context
(`decoding_cache_bytes`); a fast-weight layer's state does not.

Context parallelism (`context_parallel_size` c) splits every row into c contiguous pieces (rank r holds tokens
[r T / c, (r + 1) T / c); not load-balanced). What is counted per token (the MLP, norms, logits, the mixers'
activations, REFINE's per-token branch bytes) is divided by c, and so are REFINE's branch rows: each position's
rollouts decode on the rank that holds it (n_chunks a multiple of c). Weights and gradients are not sharded by CP;
the distributed optimizer's 12 bytes a parameter are (over DP x CP, as megatron-core's). A (gated) delta-rule layer
runs its kernel once per rank on values [0 | v] (`kernels/delta_rule/context_parallel.py`): what it keeps that
scales with the value width (v, the kernel's output, the chunk-start states; REFINE's chained copy of v) grows
from V to K + V a head, and it keeps the fp32 all-gather of every piece's transition, c x rows x H x K x (K + V)
values (`context_parallel_bytes`). An attention layer all-gathers keys and values: each rank keeps the whole
sequence's (bf16, not divided by c) for its backward. The same gathers, and the short convolutions' windows (each
piece's last W - 1 inputs, `context_parallel_halo_bytes`), are the communication per layer and micro-batch
(`context_parallel_comm_bytes`; the backward reduces as much). A mixer whose update is not affine in
its state (`context_parallel_refusal`: LaCT) has no CP layout: the estimate raises its reason.

The step time is 6 P FLOPs a token (forward + backward; the fast-weight kernels and the logits add a
few percent) at a given MFU of the GPU's dense bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_refine.kernels.delta_rule.context_parallel import context_parallel_bytes
from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.deltanet import deltanet_branch_bytes, deltanet_reference_bytes  # named in docs/scaling.md
from megatron_refine.models.mixers import get_mixer

GIB = 1024**3
H100_BF16_FLOPS = 989e12  # dense
H100_MEMORY_GIB = 80
# What a layout's estimate must stay under on an 80 GB GPU: a quarter less, for what the estimate leaves out
# (allocator fragmentation, communication buffers, kernel workspaces) and its own error. No GPU has checked it yet.
FIT_GIB = 60


def layer_parameter_counts(config: FastWeightConfig) -> tuple[int, ...]:
    """Each layer's parameters (its mixer, its two norms and its SwiGLU MLP) at TP=1."""
    c, h = config, config.hidden_size
    norms_and_mlp = 2 * h + h * 2 * c.ffn_hidden_size + c.ffn_hidden_size * h  # SwiGLU fc1 fuses gate and up
    return tuple(get_mixer(name).parameter_count(c) + norms_and_mlp for name in c.layer_mixers)


def parameter_count(config: FastWeightConfig, vocab_size: int) -> dict[str, int]:
    """{'total', 'embedding', 'output_layer', 'per_layer' (the first layer's, as models/summary.py counts it),
    'non_embedding'} of the model at TP=1, PP=1."""
    c, h, layers = config, config.hidden_size, layer_parameter_counts(config)
    embedding = output = vocab_size * h
    non_embedding = sum(layers) + h
    return {"total": non_embedding + embedding + output * (not c.tie_word_embeddings), "embedding": embedding,
            "output_layer": output * (not c.tie_word_embeddings), "per_layer": layers[0],
            "non_embedding": non_embedding}


def layer_activation_bytes(config: FastWeightConfig, seq_length: int) -> tuple[float, ...]:
    """Bytes each layer keeps for its backward per token (TP=1; see the module docstring)."""
    c, h, ffn = config, config.hidden_size, config.ffn_hidden_size
    # bf16: the norm's input, fc1's input, fc1's output (gate, up), SiLU's input, the product's two inputs, fc2's
    # input (2h + 6 ffn values: what megatron-core's SwiGLU MLP keeps, counted with saved-tensor hooks on a CPU).
    mlp = 2 * (2 * h + 6 * ffn)
    return tuple(get_mixer(name).activation_bytes(c) + mlp for name in c.layer_mixers)


def branch_rows_bytes(config: FastWeightConfig, rows: int, seq_length: int, k: int) -> tuple[float, ...]:
    """Each layer's part of REFINE that grows with the length, at TP=1, for `rows` branch rows (documents x positions
    x rollouts) whose positions lie up to `seq_length` into their row, scored over `k` rollout tokens (attention's
    probabilities over the shared prefix). Zero for a fixed-size state."""
    return tuple(rows * get_mixer(name).branch_row_bytes(config, seq_length, k) for name in config.layer_mixers)


def decoding_cache_bytes(config: FastWeightConfig, rows: int, context: int, tensor_model_parallel_size: int = 1
                         ) -> float:
    """The decoding cache of `rows` sequences after `context` tokens, over all layers, per GPU: the fast-weight
    states (fp32, fixed) and attention's keys and values (bf16, growing with the context)."""
    c = config
    per_row = sum(4 * get_mixer(name).state_values(c) + 2 * context * get_mixer(name).cache_values(c)
                  for name in c.layer_mixers)
    return rows * per_row / tensor_model_parallel_size


@dataclass
class Layout:
    """How a run is laid out: sizes per GPU follow from these."""

    gpus: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    seq_length: int = 16384
    global_batch_size: int = 32
    recompute: bool = False
    refine: bool = False
    n_chunks: int = 8
    rollouts: int = 1
    k: int = 5  # rollout tokens
    context_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.gpus // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                             * self.context_parallel_size)


def check_context_parallel(config: FastWeightConfig, layout: Layout) -> None:
    """Raises ValueError naming the fix when `layout`'s context parallelism cannot run `config`."""
    c = layout.context_parallel_size
    if c == 1:
        return
    for name in config.mixers:
        refusal = get_mixer(name).context_parallel_refusal
        if refusal:
            raise ValueError(f"context_parallel_size {c}: {name} has no context parallelism. {refusal}")
    if layout.seq_length % c:
        raise ValueError(f"seq_length {layout.seq_length} does not split into context_parallel_size {c} equal pieces")
    if layout.refine and layout.n_chunks % c:
        raise ValueError(f"REFINE's n_chunks {layout.n_chunks} is not a multiple of context_parallel_size {c}: each "
                         "rank decodes the positions it holds, the same number on every rank")


def context_parallel_layer_bytes(config: FastWeightConfig, layout: Layout) -> tuple[tuple[float, float, float], ...]:
    """Each layer's context-parallel terms per GPU at `layout`: (bytes its activations grow by per token, at TP=1 as
    `layer_activation_bytes`; bytes REFINE's branch path grows by per token; bytes its backward keeps from the
    gather of the other pieces, per micro-batch). Zeros at CP 1."""
    c, tp, rows, T = (layout.context_parallel_size, layout.tensor_model_parallel_size, layout.micro_batch_size,
                      layout.seq_length)
    terms = []
    for name in config.layer_mixers:
        if c == 1:
            terms.append((0.0, 0.0, 0.0))
        elif get_mixer(name).state_heads is not None:
            H, K, V = get_mixer(name).state_heads(config)
            # bf16 v and the kernel's output widened by K a head, the chunk-start states from K x V to K x (K + V)
            widened = 2 * (2 * H * K + H * K * K / config.delta_rule_chunk_size)
            terms.append((widened, 2 * H * K, context_parallel_bytes(c, rows, H // tp, K, V)))
        else:  # attention: bf16 keys and values of the whole sequence
            terms.append((0.0, 0.0, 2 * rows * T * get_mixer(name).cache_values(config) / tp))
    return tuple(terms)


def context_parallel_halo_bytes(config: FastWeightConfig, layout: Layout) -> tuple[float, ...]:
    """Each layer's all-gather of every piece's last W - 1 short-convolution inputs (bf16, its own included; the next
    piece reads them), per rank and micro-batch; zero at CP 1 and for a layer without a short convolution."""
    c, tp, rows = layout.context_parallel_size, layout.tensor_model_parallel_size, layout.micro_batch_size
    convs = (get_mixer(name).short_conv(config) for name in config.layer_mixers)
    return tuple(2 * c * rows * (conv[1] - 1) * conv[0] / tp if c > 1 and conv else 0.0 for conv in convs)


def context_parallel_comm_bytes(config: FastWeightConfig, layout: Layout) -> tuple[float, ...]:
    """Bytes each rank receives per layer and micro-batch in the forward's context-parallel gathers (the backward
    reduces as much): a (gated) delta-rule layer's all-gather of every piece's transition (`context_parallel_bytes`,
    its own included) and of every piece's short-convolution window (`context_parallel_halo_bytes`), an attention
    layer's keys and values of the other c - 1 pieces."""
    c = layout.context_parallel_size
    return tuple((kept if get_mixer(name).state_heads is not None else kept * (c - 1) / c) + halo
                 for name, (_, _, kept), halo in zip(config.layer_mixers, context_parallel_layer_bytes(config, layout),
                                                     context_parallel_halo_bytes(config, layout)))


def _stages(values: tuple[float, ...], pp: int) -> float:
    """The largest sum over a pipeline stage of per-layer values (megatron-core's even split of the layers)."""
    size = -(-len(values) // pp)
    return max(sum(values[i:i + size]) for i in range(0, len(values), size))


def estimate(config: FastWeightConfig, vocab_size: int, layout: Layout, mfu: float = 0.4,
             peak_flops: float = H100_BF16_FLOPS) -> dict[str, float]:
    """Per-GPU memory (GiB) of each part, its total, tokens per step and the step time at `mfu`; `branch_rows` is the
    part of `refine` that grows with the length per branch row (`branch_rows_bytes`); `cp_comm_bytes` what a rank
    receives per micro-batch forward in context-parallel gathers, over all layers (`context_parallel_comm_bytes`)."""
    check_context_parallel(config, layout)
    tp, pp, dp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size
    cp = layout.context_parallel_size
    counts = parameter_count(config, vocab_size)
    # The fullest pipeline stage: its share of the layers and the embedding or the output layer.
    layers = -(-config.num_layers // pp)
    params = (_stages(layer_parameter_counts(config), pp) + max(counts["embedding"], counts["output_layer"])
              * (1 if pp > 1 else 2)) / tp
    tokens = layout.micro_batch_size * layout.seq_length // cp  # this rank's piece of each row
    split = tp if layout.sequence_parallel else 1
    cp_terms = context_parallel_layer_bytes(config, layout)
    activations = tuple(a + widened for a, (widened, _, _) in
                        zip(layer_activation_bytes(config, layout.seq_length), cp_terms))
    gathered = tuple(kept for _, _, kept in cp_terms)
    if layout.recompute:
        kept = (layers * 2 * config.hidden_size * tokens / split + max(activations) * tokens / split
                + max(gathered))
    else:
        kept = _stages(tuple(a * tokens / split + g for a, g in zip(activations, gathered)), pp)
    logits = 6 * vocab_size / tp * tokens  # bf16 logits, fp32 softmax
    out = {
        "parameters": counts["total"],
        "weights": 2 * params / GIB,
        "gradients": 4 * params / GIB,
        "optimizer": 12 * params / (dp * cp) / GIB,
        "activations": (kept + logits) / GIB,
        "refine": 0.0,
        "branch_rows": 0.0,
        "cp_comm_bytes": sum(context_parallel_comm_bytes(config, layout)),
    }
    if layout.refine:
        mixers = [get_mixer(name) for name in config.layer_mixers]
        # the chain over (about) the whole piece
        branch = tuple(tokens * (m.branch_bytes(config) + widened) / tp
                       for m, (_, widened, _) in zip(mixers, cp_terms))
        rows = layout.micro_batch_size * layout.n_chunks * layout.rollouts // cp  # the positions this rank holds
        decode = tuple(rows * m.state_values(config) * 4 / tp for m in mixers)
        grows = tuple(b / tp for b in branch_rows_bytes(config, rows, layout.seq_length, layout.k))
        out["branch_rows"] = _stages(grows, pp) / GIB
        out["refine"] = _stages(tuple(map(sum, zip(branch, decode, grows))), pp) / GIB
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer", "activations", "refine"))
    out["tokens_per_step"] = layout.global_batch_size * layout.seq_length
    out["step_seconds"] = 6 * counts["total"] * out["tokens_per_step"] / (mfu * peak_flops * layout.gpus)
    return out


def longest_document(config: FastWeightConfig, vocab_size: int, gpus: int = 8, refine: bool = False,
                     fit_gib: float = FIT_GIB, lengths: tuple[int, ...] = tuple(4096 << i for i in range(9))
                     ) -> tuple[int, Layout, dict[str, float]] | None:
    """The longest of `lengths` (4K to 1M tokens) whose estimate, one document a micro-batch, fits `fit_gib` a GPU
    on `gpus` GPUs, with its layout and estimate; None if not even the shortest fits. The layout: TP among 1, 2, 4, 8
    that the heads allow (+ SP), CP among 1, 2, 4, 8 (1 for a mixer that refuses it), TP x CP dividing `gpus`; the
    smallest TP x CP that fits, then the smaller TP (CP's traffic per delta-rule layer is a fixed-size state, TP's
    grows with the tokens)."""
    tps = []
    for tp in (1, 2, 4, 8):
        try:
            replace(config, tensor_model_parallel_size=tp, sequence_parallel=tp > 1)
        except ValueError:  # the heads do not divide by tp
            continue
        tps.append(tp)
    refused = any(get_mixer(name).context_parallel_refusal for name in config.mixers)
    cps = (1,) if refused else (1, 2, 4, 8)
    candidates = sorted(((tp, cp) for tp in tps for cp in cps if gpus % (tp * cp) == 0),
                        key=lambda tp_cp: (tp_cp[0] * tp_cp[1], tp_cp[0]))
    best = None
    for length in lengths:
        for tp, cp in candidates:
            layout = Layout(gpus=gpus, tensor_model_parallel_size=tp, sequence_parallel=tp > 1, micro_batch_size=1,
                            seq_length=length, refine=refine, context_parallel_size=cp)
            e = estimate(config, vocab_size, layout)
            if e["total"] <= fit_gib:
                best = (length, layout, e)
                break
        else:  # memory grows with the length: no longer one fits either
            return best
    return best


__all__ = ["FIT_GIB", "GIB", "H100_BF16_FLOPS", "H100_MEMORY_GIB", "Layout", "branch_rows_bytes",
           "check_context_parallel", "context_parallel_comm_bytes", "context_parallel_halo_bytes",
           "context_parallel_layer_bytes", "decoding_cache_bytes", "deltanet_branch_bytes", "deltanet_reference_bytes",
           "estimate", "layer_activation_bytes", "layer_parameter_counts", "longest_document", "parameter_count"]
