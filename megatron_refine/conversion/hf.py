"""Megatron dist checkpoints <-> Hugging Face folders, in one CPU process.

Export: the model is rebuilt at TP=1 PP=1 from the checkpoint's own config (common state), its weights loaded
through dist_checkpointing (which reshards any TP / PP / DP layout), then written layer by layer into
safetensors shards (`model.safetensors.index.json` past `max_shard_bytes`), padded vocabulary rows cut.
Import: config.json gives the Megatron model config; tensors are read lazily (safetensors' safe_open) layer by
layer into a TP=1 model, padded vocabulary rows zeroed, and saved as a dist checkpoint `train --finetune` loads
at any layout, with the model config written beside it (`model_config.yaml`).
Not yet streamed: both directions hold the whole fp32 model once (the Megatron model), plus one output shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from megatron_refine.conversion import deltanet

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


def _checkpoint_folder(load: str | Path, iteration: int | None) -> Path:
    from megatron_refine.training.checkpointing import checkpoint_dir, latest_iteration

    load = Path(load)
    if (load / "common.pt").is_file() and iteration is None:
        return load  # an iter_NNNNNNN folder itself
    if not load.is_dir():
        raise FileNotFoundError(f"checkpoint folder {load} not found: check --load")
    iteration = latest_iteration(load) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"no checkpoint in {load} (no latest_checkpointed_iteration.txt): pass --iteration N")
    path = checkpoint_dir(load, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: check --iteration")
    return path


def _build(name: str, overrides: dict, vocab_size: int, dtype: torch.dtype):
    """The whole model at TP=1 PP=1 on this process's (CPU) runtime, without initialisation."""
    from megatron_refine.models import build_model, get_config

    layout = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False)
    config = get_config(name, **{**overrides, **layout, "use_cpu_initialization": True, "perform_initialization": False,
                                 "params_dtype": dtype, "bf16": dtype == torch.bfloat16})
    return build_model(config, vocab_size, pre_process=True, post_process=True, use_te=False)


class _ShardWriter:
    """safetensors shards of at most `max_bytes` (a tensor larger than that gets a shard of its own)."""

    def __init__(self, save: Path, max_bytes: int):
        self.save, self.max_bytes = save, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[Path, list[str]]] = []
        self.total = self.pending_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t.contiguous()
            self.pending_bytes += size
            self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.save / f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].replace(self.save / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        n, weight_map = len(self.files), {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(self.save / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.save / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return sorted(set(weight_map.values()))


def _imported_token_ids(common: dict, hops: int = 8) -> dict | None:
    """The special ids of the Hugging Face model this checkpoint descends from: an import keeps them in its common
    state, and a run fine-tuned from it names it in its config's checkpoint.load (followed back `hops` times)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.training.checkpointing import checkpoint_dir, latest_iteration

    while hops and not common.get("hf_token_ids"):
        parent = ((common.get("config") or {}).get("checkpoint") or {}).get("load")
        try:
            iteration = latest_iteration(parent) if parent else None
        except Exception:  # noqa: BLE001 - a parent moved or rewritten since: no ids from it
            iteration = None
        if iteration is None:
            return None
        common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(parent, iteration)))
        hops -= 1
    return common.get("hf_token_ids")


def _tokenizer(tokenizer: str | None, common: dict):
    """--tokenizer, else the tokenizer the training data recorded (its metadata.json), else None."""
    from megatron_refine.data.tokenizers import load_tokenizer, tokenizer_from_metadata

    if tokenizer:
        return load_tokenizer(tokenizer)
    metadata = Path(common.get("data_path") or "") / "metadata.json"
    if not common.get("data_path") or not metadata.is_file():
        return None
    try:
        return tokenizer_from_metadata(json.loads(metadata.read_text())["tokenizer"])
    except (ValueError, FileNotFoundError, KeyError):  # the data's tokenizer file moved or changed since
        return None


def _token_ids(tok, common: dict) -> dict:
    """config.json's special ids: an imported model's, with the EOS of the tokenizer the model was trained with."""
    ids = dict(_imported_token_ids(common) or dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")))
    if tok is not None:
        if tok.vocab_size > common["vocab_size"]:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the checkpoint's vocabulary only "
                             f"{common['vocab_size']}: pass the tokenizer the model was trained with (--tokenizer)")
        ids["eos_token_id"] = tok.eos_id
    return ids


def _write_tokenizer(save: Path, tok) -> list[str]:
    """The tokenizer's Hugging Face files: its tokenizer.json, and its folder's tokenizer configs if any."""
    if tok is None:
        print("no --tokenizer given and none recorded with the training data: no tokenizer files written", flush=True)
        return []
    if getattr(tok, "path", None) is None:
        print("the byte tokenizer has no Hugging Face tokenizer file: none written (token ids are UTF-8 bytes, "
              f"{tok.eos_id} is end-of-document)", flush=True)
        return []
    written = []
    for name in TOKENIZER_FILES:
        src = tok.path if name == "tokenizer.json" else tok.path.parent / name
        if src.is_file():
            shutil.copyfile(src, save / name)
            written.append(name)
    if "tokenizer_config.json" not in written:  # what AutoTokenizer needs to load a bare tokenizer.json
        from tokenizers import Tokenizer

        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "eos_token": Tokenizer.from_file(str(tok.path)).id_to_token(tok.eos_id)}
        (save / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def export_to_hf(load: str | Path, save: str | Path, *, iteration: int | None = None, tokenizer: str | None = None,
                 dtype: str = "fp32", max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """A Megatron checkpoint (any TP / PP / DP layout) -> a Hugging Face folder. Returns the files written.
    Needs a single-process runtime (`megatron_refine.runtime.initialize(device="cpu")`)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.training.checkpointing import load_model_weights

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = _checkpoint_folder(load, iteration)
    common = dist_checkpointing.load_common_state_dict(str(path))
    model_args = (common.get("config") or {}).get("model")
    if not model_args or "vocab_size" not in common:
        raise ValueError(f"{path} has no model config or vocab size in its common state: only checkpoints written by "
                         "megatron-refine train or convert-from-hf export")
    name, overrides = model_args["config"], dict(model_args.get("overrides") or {})
    if overrides.get("mixer", _preset_mixer(name)) != "deltanet":
        raise ValueError(f"{path} holds a LaCT model: its Hugging Face conversion is not implemented yet "
                         "(DeltaNet only)")
    saved_dtype = dist_checkpointing.load_tensors_metadata(str(path))["embedding.word_embeddings.weight"].dtype
    vocab = common["vocab_size"]
    model = _build(name, overrides, vocab, saved_dtype)
    load_model_weights(path, model)
    tok = _tokenizer(tokenizer, common)
    ids = _token_ids(tok, common)
    cfg, out_dtype = model.config, DTYPES[dtype]
    config = deltanet.hf_config(cfg, vocab, ids, out_dtype)  # refuses what fla cannot load before writing

    save = Path(save)
    save.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    get = lambda key: state.pop(key).detach().to(out_dtype)  # noqa: E731 - each tensor is mapped once
    writer = _ShardWriter(save, max_shard_bytes)
    writer.add({"model.embeddings.weight": get("embedding.word_embeddings.weight")[:vocab]})
    for i in _progress(range(cfg.num_layers), "export layers"):
        writer.add(deltanet.layer_to_hf(cfg, i, get))
    writer.add({"model.norm.weight": get("decoder.final_layernorm.weight")})
    if not cfg.tie_word_embeddings:
        writer.add({"lm_head.weight": get("output_layer.weight")[:vocab]})
    files = writer.close()

    (save / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in ids.items() if v is not None}
    generation["_from_model_config"] = True
    (save / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files += ["config.json", "generation_config.json"]
    files += _write_tokenizer(save, tok)
    return files


def _preset_mixer(name: str) -> str:
    from megatron_refine.models.config import PRESETS

    return PRESETS.get(name, {}).get("mixer", "deltanet")


class _LazyTensors:
    """The tensors of a Hugging Face folder (one file or an index), opened lazily."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        if (folder / INDEX_NAME).is_file():
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        elif (folder / WEIGHTS_NAME).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}: save the model with "
                                    "save_pretrained(..., safe_serialization=True)")
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_NAME]
        self.handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        self.where = weight_map or {k: WEIGHTS_NAME for k in self.handles[WEIGHTS_NAME].keys()}

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"the Hugging Face checkpoint lacks {name}: not a complete delta_net model")
        return self.handles[self.where[name]].get_tensor(name)


def import_from_hf(load: str | Path, save: str | Path, *, tp: int = 1, pp: int = 1) -> Path:
    """A Hugging Face `delta_net` folder -> a Megatron dist checkpoint (`iter_0000000/` + marker) and
    `model_config.yaml`. `tp` / `pp` only validate the layout (the checkpoint loads at any). Returns the
    checkpoint folder. Needs a single-process runtime (`megatron_refine.runtime.initialize(device="cpu")`)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.models import get_config
    from megatron_refine.training.checkpointing import (
        MARKER, checkpoint_dir, model_identity, start_write_results_queue)

    load, save = Path(load), Path(save)
    if not (load / "config.json").is_file():
        raise FileNotFoundError(f"{load / 'config.json'} not found: --load takes a Hugging Face model folder")
    config = json.loads((load / "config.json").read_text())
    name, overrides = deltanet.megatron_model_args(config)
    cfg = get_config(name, **overrides)
    if tp < 1 or pp < 1 or cfg.num_attention_heads % tp or cfg.num_layers % pp:
        raise ValueError(f"--tp {tp} --pp {pp} does not divide the model's {cfg.num_attention_heads} heads and "
                         f"{cfg.num_layers} layers: pick a TP size that divides the heads and a PP size that divides "
                         "the layers (the checkpoint itself loads at any such layout)")
    vocab = config.get("vocab_size", 32000)
    if (load / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokens = Tokenizer.from_file(str(load / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if tokens > vocab:
            raise ValueError(f"config.json's vocab_size {vocab} is smaller than its tokenizer's {tokens} tokens: "
                             "the checkpoint does not match its tokenizer.json")

    tensors = _LazyTensors(load)
    model = _build(name, overrides, vocab, torch.float32)
    cfg = model.config
    unexpected = tensors.names() - set(deltanet.hf_names(cfg)) - {"lm_head.weight"}
    if unexpected:
        raise ValueError(f"the Hugging Face checkpoint has tensors this config does not define: "
                         f"{sorted(unexpected)[:5]} (a config option our DeltaNet mixer lacks?)")
    params = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    # The shape each fla tensor must have: this model's own tensors mapped to fla's names, vocabulary cut.
    expected = {"model.embeddings.weight": (vocab, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,),
                "lm_head.weight": (vocab, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        expected.update({k: tuple(v.shape) for k, v in deltanet.layer_to_hf(cfg, i, params.__getitem__).items()})

    def get(name: str) -> torch.Tensor:
        value = tensors.get(name)
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, config.json asks for {expected[name]}: "
                             "the weights and config.json disagree")
        return value

    def copy(key: str, value: torch.Tensor) -> None:
        target = params[key]
        with torch.no_grad():
            target[: value.shape[0]].copy_(value)
            target[value.shape[0]:].zero_()  # padded vocabulary rows (nothing for the other tensors)

    copy("embedding.word_embeddings.weight", get("model.embeddings.weight"))
    for i in _progress(range(cfg.num_layers), "import layers"):
        for key, value in deltanet.layer_from_hf(cfg, i, get).items():
            copy(key, value)
    copy("decoder.final_layernorm.weight", get("model.norm.weight"))
    if not cfg.tie_word_embeddings:
        copy("output_layer.weight", get("lm_head.weight"))

    folder = checkpoint_dir(save, 0)
    save.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    start_write_results_queue()
    model_args = {"config": name, "overrides": overrides}
    dist_checkpointing.save({
        "model": model.sharded_state_dict(),
        "iteration": 0,
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "vocab_size": vocab,
        "model_identity": model_identity(model),
        "tokenizer_hash": None,
        "hf_token_ids": deltanet.token_ids(config),
        "config": {"model": model_args},
    }, str(folder))
    (save / MARKER).write_text("0")
    (save / "model_config.yaml").write_text(yaml.safe_dump({"model": model_args}, sort_keys=False))
    if (load / "tokenizer.json").is_file():
        shutil.copyfile(load / "tokenizer.json", save / "tokenizer.json")
    return folder
