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

The step time is 6 P FLOPs a token (forward + backward; the fast-weight kernels and the logits add a
few percent) at a given MFU of the GPU's dense bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def data_parallel_size(self) -> int:
        return self.gpus // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


def _stages(values: tuple[float, ...], pp: int) -> float:
    """The largest sum over a pipeline stage of per-layer values (megatron-core's even split of the layers)."""
    size = -(-len(values) // pp)
    return max(sum(values[i:i + size]) for i in range(0, len(values), size))


def estimate(config: FastWeightConfig, vocab_size: int, layout: Layout, mfu: float = 0.4,
             peak_flops: float = H100_BF16_FLOPS) -> dict[str, float]:
    """Per-GPU memory (GiB) of each part, its total, tokens per step and the step time at `mfu`; `branch_rows` is the
    part of `refine` that grows with the length per branch row (`branch_rows_bytes`)."""
    tp, pp, dp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size
    counts = parameter_count(config, vocab_size)
    # The fullest pipeline stage: its share of the layers and the embedding or the output layer.
    layers = -(-config.num_layers // pp)
    params = (_stages(layer_parameter_counts(config), pp) + max(counts["embedding"], counts["output_layer"])
              * (1 if pp > 1 else 2)) / tp
    tokens = layout.micro_batch_size * layout.seq_length
    split = tp if layout.sequence_parallel else 1
    activations = layer_activation_bytes(config, layout.seq_length)
    if layout.recompute:
        kept = layers * 2 * config.hidden_size * tokens / split + max(activations) * tokens / split
    else:
        kept = _stages(activations, pp) * tokens / split
    logits = 6 * vocab_size / tp * tokens  # bf16 logits, fp32 softmax
    out = {
        "parameters": counts["total"],
        "weights": 2 * params / GIB,
        "gradients": 4 * params / GIB,
        "optimizer": 12 * params / dp / GIB,
        "activations": (kept + logits) / GIB,
        "refine": 0.0,
        "branch_rows": 0.0,
    }
    if layout.refine:
        mixers = [get_mixer(name) for name in config.layer_mixers]
        branch = tuple(tokens * m.branch_bytes(config) / tp for m in mixers)  # the chain over (about) the whole row
        rows = layout.micro_batch_size * layout.n_chunks * layout.rollouts
        decode = tuple(rows * m.state_values(config) * 4 / tp for m in mixers)
        grows = tuple(b / tp for b in branch_rows_bytes(config, rows, layout.seq_length, layout.k))
        out["branch_rows"] = _stages(grows, pp) / GIB
        out["refine"] = _stages(tuple(map(sum, zip(branch, decode, grows))), pp) / GIB
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer", "activations", "refine"))
    out["tokens_per_step"] = layout.global_batch_size * layout.seq_length
    out["step_seconds"] = 6 * counts["total"] * out["tokens_per_step"] / (mfu * peak_flops * layout.gpus)
    return out


__all__ = ["FIT_GIB", "GIB", "H100_BF16_FLOPS", "H100_MEMORY_GIB", "Layout", "branch_rows_bytes",
           "decoding_cache_bytes", "deltanet_branch_bytes", "deltanet_reference_bytes", "estimate",
           "layer_activation_bytes", "layer_parameter_counts", "parameter_count"]
