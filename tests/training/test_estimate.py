"""The estimator on hybrid models: every figure the sum over the layers of each layer's mixer, attention's part of
REFINE growing with the document length (a fast-weight state does not), and the single-mixer figures as before.
Context parallelism: the per-token terms divided by CP, a delta-rule layer's K + V widening and all-gather (its
kernel op's `context_parallel_bytes`), attention's gathered keys and values, LaCT refused, the longest document."""

import pytest

from megatron_refine.kernels.delta_rule.context_parallel import context_parallel_bytes
from megatron_refine.models import get_config
from megatron_refine.models.mixers import get_mixer
from megatron_refine.training.estimate import (
    FIT_GIB, GIB, Layout, branch_rows_bytes, context_parallel_comm_bytes, context_parallel_halo_bytes,
    context_parallel_layer_bytes, decoding_cache_bytes, estimate, layer_activation_bytes, layer_parameter_counts,
    longest_document, parameter_count)


def test_a_hybrid_is_the_sum_of_its_layers():
    hybrid = get_config("hybrid_tiny")  # "G*G*"
    gdn, attention = get_mixer("gated_deltanet"), get_mixer("attention")
    assert hybrid.layer_mixers == ("gated_deltanet", "attention") * 2
    h, ffn = hybrid.hidden_size, hybrid.ffn_hidden_size
    mlp_and_norms = 3 * h * ffn + 2 * h
    assert layer_parameter_counts(hybrid) == (gdn.parameter_count(hybrid) + mlp_and_norms,
                                              attention.parameter_count(hybrid) + mlp_and_norms) * 2
    assert parameter_count(hybrid, 100)["non_embedding"] == sum(layer_parameter_counts(hybrid)) + h
    mlp = 2 * (2 * h + 6 * ffn)
    assert layer_activation_bytes(hybrid, 64) == (gdn.activation_bytes(hybrid) + mlp,
                                                  attention.activation_bytes(hybrid) + mlp) * 2
    # The REFINE part: each Gated DeltaNet layer's branch path and decoding states, each attention layer's
    # probabilities over the shared prefix
    layout = Layout(gpus=1, seq_length=64, micro_batch_size=2, refine=True)
    rows = 2 * layout.n_chunks * layout.rollouts
    expected = sum(64 * 2 * gdn.branch_bytes(hybrid) + 4 * rows * gdn.state_values(hybrid) for _ in range(2))
    expected += 2 * 64 * 2 * attention.branch_bytes(hybrid)  # the scoring backward's copy of the prefix K and V
    expected += sum(branch_rows_bytes(hybrid, rows, 64, layout.k))
    assert branch_rows_bytes(hybrid, rows, 64, layout.k) == (0, rows * attention.branch_row_bytes(hybrid, 64, 5)) * 2
    assert estimate(hybrid, 100, layout)["refine"] == pytest.approx(expected / GIB, rel=1e-12)


def test_a_hybrids_memory_grows_with_the_length_through_its_attention_layers():
    rows = lambda T: estimate(get_config("qwen3_5_2b"), 248320, Layout(gpus=8, seq_length=T, refine=True))  # noqa: E731
    short, long = rows(4096), rows(16384)
    assert 0 < short["branch_rows"] < long["branch_rows"] and short["total"] < long["total"]
    # attention's probabilities over the prefix (T + k slots) and its queries / outputs (fixed) per branch row
    heads, D, k = 8, 256, 5
    per_row = lambda T: 6 * heads * k * (T + k) + 4 * k * heads * D  # noqa: E731
    assert long["branch_rows"] / short["branch_rows"] == pytest.approx(per_row(16384) / per_row(4096))
    # Pure Gated DeltaNet has none, and its decoding cache does not grow with the context
    gdn = get_config("gated_deltanet_1p3b")
    assert estimate(gdn, 32000, Layout(gpus=8, seq_length=16384, refine=True))["branch_rows"] == 0
    assert decoding_cache_bytes(gdn, 4, 1024) == decoding_cache_bytes(gdn, 4, 65536) > 0
    qwen = get_config("qwen3_5_2b", tensor_model_parallel_size=2)
    grown = decoding_cache_bytes(qwen, 4, 65536, 2) - decoding_cache_bytes(qwen, 4, 1024, 2)
    assert grown == 4 * (65536 - 1024) * 6 * 2 * (2 * 2 * 256) / 2  # 6 attention layers, bf16 K and V over TP 2


@pytest.mark.parametrize("name, tp, pp, refine, recompute, total, activations, refine_gib", [
    # the figures before hybrids: docs/scaling.md's midtrain_deltanet_1p3b and midtrain_lact_760m rows, and PP 2
    # with recomputation
    ("deltanet_1p3b", 2, 1, True, False, 35.049649715423584, 27.3515625, 1.974609375),
    ("lact_760m", 2, 1, True, False, 48.26077137887478, 44.28515625, 0.6328125),
    ("gated_deltanet_1p3b", 2, 2, False, True, 7.196328900754452, 3.152984619140625, 0.0),
])
def test_single_mixer_figures_are_unchanged(name, tp, pp, refine, recompute, total, activations, refine_gib):
    e = estimate(get_config(name, tensor_model_parallel_size=tp), 32000,
                 Layout(gpus=8, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=True,
                        refine=refine, recompute=recompute))
    assert (e["total"], e["activations"], e["refine"]) == pytest.approx((total, activations, refine_gib), rel=1e-12)


def _layout(**kw):
    return Layout(**{"gpus": 8, "seq_length": 4096, "micro_batch_size": 2, **kw})


def test_context_parallelism_divides_what_is_counted_per_token():
    config, T = get_config("deltanet_1p3b"), 4096
    one = estimate(config, 32000, _layout(refine=True))
    two = estimate(config, 32000, _layout(refine=True, context_parallel_size=2))
    # weights and gradients are not sharded by CP; the optimizer is, over DP x CP (8 GPUs either way)
    assert all(one[part] == two[part] for part in ("weights", "gradients", "optimizer"))
    # the rest is half, plus what the piece's kernel pass widens and what the all-gather keeps
    H, K = 16, 128
    widened = 2 * (2 * H * K + H * K * K / config.delta_rule_chunk_size)
    gathered = 2 * 2 * H * K * (K + K) * 4  # [P | N] of 2 pieces x 2 rows, fp32
    extra = 24 * (widened * 2 * T / 2 + gathered)
    assert two["activations"] * GIB == pytest.approx(one["activations"] * GIB / 2 + extra, rel=1e-12)
    # REFINE: half the branch path (its chained copy of v widened) and half the rollout states
    assert two["refine"] * GIB == pytest.approx(one["refine"] * GIB / 2 + 24 * 2 * H * K * 2 * T / 2, rel=1e-12)


@pytest.mark.parametrize("name, heads, K, V, conv", [("deltanet_1p3b", 16, 128, 128, 3 * 2048),
                                                     ("gated_deltanet_1p3b", 6, 256, 512, 2 * 6 * 256 + 6 * 512)])
def test_a_delta_rule_layer_widens_to_k_plus_v_and_gathers_what_its_kernel_op_sends(name, heads, K, V, conv):
    """GDN's heads: its value heads (q, k repeated to them); conv: q, k and v's channels at TP 1, kernel width 4."""
    config = get_config(name, tensor_model_parallel_size=2)
    layout = _layout(tensor_model_parallel_size=2, context_parallel_size=4)
    widened, branch, kept = context_parallel_layer_bytes(config, layout)[0]
    # bf16 v and the kernel's output grow from V to K + V a head, the chunk-start states from K x V to K x (K + V)
    chunk_states = lambda width: 2 * heads * K * width / config.delta_rule_chunk_size  # noqa: E731
    assert widened == 2 * heads * K * 2 + chunk_states(K + V) - chunk_states(V)
    assert branch == 2 * heads * K
    assert kept == context_parallel_bytes(4, 2, heads // 2, K, V)  # the heads over TP 2, the rows of a micro-batch
    halo = 2 * 4 * 2 * 3 * conv / 2  # bf16 last 3 inputs of every piece (4) and row (2), channels over TP 2
    assert context_parallel_halo_bytes(config, layout) == (halo,) * config.num_layers
    assert context_parallel_comm_bytes(config, layout) == (kept + halo,) * config.num_layers
    assert estimate(config, 32000, layout)["cp_comm_bytes"] == (kept + halo) * config.num_layers
    assert context_parallel_layer_bytes(config, _layout())[0] == (0, 0, 0)
    assert context_parallel_halo_bytes(config, _layout()) == (0,) * config.num_layers


def test_attention_keeps_the_whole_sequences_keys_and_values():
    config = get_config("qwen3_5_2b")  # "GGG*": 2 key / value heads of 256 channels
    gathered = 2 * 2 * 4096 * 2 * 2 * 256  # bf16, 2 rows, K and V: not divided by CP
    for cp in (2, 4):
        layout = _layout(context_parallel_size=cp)
        assert [kept for _, _, kept in context_parallel_layer_bytes(config, layout)][3::4] == [gathered] * 6
        assert context_parallel_comm_bytes(config, layout)[3::4] == (gathered * (cp - 1) / cp,) * 6
        halo = context_parallel_halo_bytes(config, layout)  # Gated DeltaNet's 16 + 16 + 16 heads of 128, width 4
        assert halo[3::4] == (0,) * 6 and set(halo) - {0} == {2 * cp * 2 * 3 * 3 * 16 * 128}


def test_lact_refuses_context_parallelism_with_its_reason():
    lact = get_config("lact_760m")
    assert estimate(lact, 32000, _layout())["total"] > 0
    with pytest.raises(ValueError, match="lact has no context parallelism.*not affine"):
        estimate(lact, 32000, _layout(context_parallel_size=2))
    with pytest.raises(ValueError, match="n_chunks 8 is not a multiple of context_parallel_size 16"):
        estimate(get_config("deltanet_1p3b"), 32000, _layout(gpus=16, refine=True, context_parallel_size=16))


@pytest.mark.parametrize("name, refine", [("gated_deltanet_1p3b", True), ("deltanet_1p3b", False)])
def test_the_longest_document_grows_with_the_gpus_and_its_layout_fits(name, refine):
    config = get_config(name)
    lengths = {gpus: longest_document(config, 32000, gpus, refine) for gpus in (1, 2, 8)}
    assert lengths[1][0] < lengths[2][0] < lengths[8][0]
    assert lengths[1][1].context_parallel_size == lengths[1][1].tensor_model_parallel_size == 1
    length, layout, e = lengths[8]
    assert e["total"] <= FIT_GIB and estimate(config, 32000, layout)["total"] == e["total"]
    assert layout.seq_length == length and layout.micro_batch_size == 1
    assert layout.sequence_parallel == (layout.tensor_model_parallel_size > 1)
    # twice the length fits no layout of the 8 GPUs
    longer = [estimate(config, 32000, Layout(gpus=8, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                                             micro_batch_size=1, seq_length=2 * length, refine=refine,
                                             context_parallel_size=cp))["total"]
              for tp in (1, 2) for cp in (1, 2, 4, 8) if tp * cp <= 8]
    assert min(longer) > FIT_GIB
    assert longest_document(get_config("lact_760m"), 32000, 8)[1].context_parallel_size == 1
