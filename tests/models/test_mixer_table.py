"""The table of mixers (models/mixers.py): an unknown name lists the known ones, every entry agrees with the mixer
it builds, and nothing else in the code branches on a mixer's name."""

import importlib
import re
from pathlib import Path

import pytest
from megatron_modules import tiny_fast_weight_model, token_batch

from megatron_refine.models import MIXERS, PRESETS, get_config, get_layer_spec, get_mixer
from megatron_refine.models.inference import map_tensors
from megatron_refine.runtime import initialize, spawn

ROOT = Path(__file__).resolve().parents[2]
# The fast weights each mixer's decoding cache holds (what `state_values` counts), by mixer.
FAST_WEIGHTS = {"deltanet": lambda cache: [cache.state], "gated_deltanet": lambda cache: [cache.state],
                "lact": lambda cache: [cache.fast.w0, cache.fast.w1, cache.fast.w2], "attention": lambda cache: []}


def _cache_values(cache) -> int:
    """The floating-point values a layer's cache holds for one row."""
    values = []
    map_tensors(cache, lambda t: values.append(t[0].numel() if t.is_floating_point() else 0) or t)
    return sum(values)


def test_an_unknown_mixer_lists_the_known_ones():
    for call in (lambda: get_mixer("mamba"), lambda: get_config("deltanet_tiny", mixer="mamba")):
        with pytest.raises(ValueError, match="mixer must be one of") as error:
            call()
        assert all(repr(name) in str(error.value) for name in MIXERS)


def _tiny_preset(mixer: str) -> str:
    return next(name for name, preset in PRESETS.items() if preset["mixer"] == mixer and name.endswith("_tiny"))


def _entries_against_built_models():
    initialize(seed=0, device="cpu")
    out = {}
    for name in MIXERS:
        entry = get_mixer(name)
        model = tiny_fast_weight_model(_tiny_preset(name))
        config, mixer = model.config, model.mixers[0]
        entry.check_config(config)  # a preset passes its own checks
        _, cache = model.prefill(token_batch(2, 20))
        _, longer = model.prefill(token_batch(2, 21))
        fast = FAST_WEIGHTS[name](cache.layers[mixer.layer_number])
        out[name] = dict(
            entry_name=entry.name,
            module=get_layer_spec(name, use_te=False).submodules.self_attention.module is type(mixer),
            parameters=(sum(p.numel() for p in mixer.parameters()), entry.parameter_count(config)),
            state=(sum(t[0].numel() for t in fast), entry.state_values(config)),
            # What a row's cache grows by per token of context: attention's keys and values, nothing for fast weights.
            growth=(_cache_values(longer.layers[mixer.layer_number]) - _cache_values(cache.layers[mixer.layer_number]),
                    entry.cache_values(config)),
            bytes=(entry.activation_bytes(config), entry.branch_bytes(config)),
        )
    return out


def test_every_entry_agrees_with_the_mixer_it_builds():
    assert set(FAST_WEIGHTS) == set(MIXERS)
    for name, got in spawn(_entries_against_built_models, 1)[0].items():
        assert got["entry_name"] == name and got["module"], name
        assert got["parameters"][0] == got["parameters"][1], name
        assert got["state"][0] == got["state"][1], name
        assert got["growth"][0] == got["growth"][1], name
        assert got["bytes"][0] > 0 and got["bytes"][1] >= 0, name
        module = get_mixer(name).hf_module
        if module is not None:
            from megatron_refine.conversion.hf import FORMATS

            assert FORMATS[name] is importlib.import_module(module) and FORMATS[name].MODEL_TYPE


def test_nothing_else_branches_on_a_mixer_name():
    branch = re.compile(r"""mixer\s*(==|!=)\s*["']|["']\s*(==|!=)\s*\S*mixer\b""")
    found = [f"{path.relative_to(ROOT)}:{number}" for folder in ("megatron_refine", "recipes", "tools", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, f"branch through models/mixers.py's get_mixer instead: {found}"
