"""FastWeightConfig validation, presets, and the published models' sizes (built on the meta device)."""

import pytest

from megatron_refine.models import MIXERS, PRESETS, PUBLISHED_VOCAB_SIZE, get_config
from megatron_refine.models.config import fla_intermediate_size
from megatron_refine.runtime import initialize, spawn


def test_fla_default_mlp_width():
    assert fla_intermediate_size(2048) == 5632  # DeltaNet-1.3B's intermediate size
    assert fla_intermediate_size(64) == 256


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("deltanet_tiny", dict(tensor_model_parallel_size=3), r"num_attention_heads \(4\) must be divisible by tensor_model_parallel_size \(3\)"),
        ("deltanet_tiny", dict(expand_k=0.75, num_attention_heads=5, hidden_size=64), "key dim .* must be divisible"),
        ("deltanet_tiny", dict(qk_norm="l1"), "qk_norm must be"),
        ("lact_tiny", dict(num_lact_heads=3), r"hidden_size \(64\) must be divisible by num_lact_heads \(3\)"),
        ("lact_tiny", dict(num_lact_heads=1, tensor_model_parallel_size=2), r"num_lact_heads \(1\) must be divisible by tensor_model_parallel_size \(2\)"),
        ("lact_tiny", dict(num_attention_heads=2, num_lact_heads=4), "multiple of the attention head dim"),
        ("lact_tiny", dict(ttt_l2_norm="rsqrt"), "ttt_l2_norm must be one of"),
        ("lact_tiny", dict(ttt_norm_eps=0.0), "ttt_norm_eps must be > 0"),
        ("deltanet_tiny", dict(mixer="mamba"), "mixer must be one of"),
        ("deltanet_tiny", dict(hidden_sizes=3), r"unknown config fields \['hidden_sizes'\]"),
        ("deltanet_2b", {}, "unknown model config 'deltanet_2b'"),
        ("hybrid_tiny", dict(hybrid_layer_pattern="G-*-"), r"write 'GGG\*' for its 'G-G-G-\*-'"),
        ("hybrid_tiny", dict(hybrid_layer_pattern="GM*G"), r"unknown layer symbol 'M' .*'G' gated_deltanet, '\*' attention"),
        ("hybrid_tiny", dict(hybrid_layer_pattern="GG*"), r"hybrid_layer_pattern has 3 layers, num_layers is 4"),
        ("hybrid_tiny", dict(num_query_groups=3), r"num_attention_heads \(4\) must be a multiple of num_query_groups \(3\)"),
        ("hybrid_tiny", dict(num_query_groups=1, tensor_model_parallel_size=2), r"num_query_groups \(1\) must be divisible by tensor_model_parallel_size \(2\)"),
        ("hybrid_tiny", dict(rotary_percent=0.1), r"rotary_percent \(0.1\) must be in \(0, 1\] and rotate an even number"),
        ("attention_tiny", dict(mixer="hybrid"), "a hybrid model sets hybrid_layer_pattern"),
        ("hybrid_tiny", dict(mixer="deltanet"), r"hybrid_tiny is a hybrid: .* pass hybrid_layer_pattern=None too"),
    ],
)
def test_bad_configs_say_what_to_change(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config(name, **overrides)


def test_a_hybrid_pattern_gives_each_layer_its_mixer():
    config = get_config("hybrid_tiny", num_layers=8, hybrid_layer_pattern="GGG*GGG*")
    assert config.mixer == "hybrid" and config.mixers == ("gated_deltanet", "attention")
    assert config.layer_mixers == ("gated_deltanet",) * 3 + ("attention",) + ("gated_deltanet",) * 3 + ("attention",)
    assert get_config("gated_deltanet_tiny").layer_mixers == ("gated_deltanet",) * 2


def test_presets_build_their_configs():
    for name in PRESETS:
        config = get_config(name)
        assert config.mixers and all(mixer in MIXERS for mixer in config.mixers)
        assert config.add_bias_linear is False and config.layernorm_epsilon == 1e-6
    assert get_config("deltanet_1p3b").ffn_hidden_size == 5632


def _published_sizes():
    from megatron_refine.models.summary import parameter_counts

    initialize(device="cpu")
    return {name: parameter_counts(get_config(name), PUBLISHED_VOCAB_SIZE) for name in ("deltanet_1p3b", "lact_760m")}


def test_published_configs_have_the_published_sizes():
    sizes = spawn(_published_sizes, 1)[0]
    deltanet, lact = sizes["deltanet_1p3b"], sizes["lact_760m"]
    assert 1.30e9 < deltanet["total"] < 1.40e9  # fla-hub/delta_net-1.3B: 1.37B with untied embeddings
    assert deltanet["embedding"] == deltanet["output_layer"] == 32000 * 2048
    assert 0.74e9 < lact["total"] < 0.82e9  # "LaCT-760M" (0.80B with fla's default MLP width)
