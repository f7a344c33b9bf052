"""The estimator on hybrid models: every figure the sum over the layers of each layer's mixer, attention's part of
REFINE growing with the document length (a fast-weight state does not), and the single-mixer figures as before."""

import pytest

from megatron_refine.models import get_config
from megatron_refine.models.mixers import get_mixer
from megatron_refine.training.estimate import (
    GIB, Layout, branch_rows_bytes, decoding_cache_bytes, estimate, layer_activation_bytes, layer_parameter_counts,
    parameter_count)


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
