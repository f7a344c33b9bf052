"""Megatron dist checkpoints <-> Hugging Face folders, in one CPU process: DeltaNet <-> fla's `delta_net`
(`deltanet.py`), Gated DeltaNet <-> fla's `gated_deltanet` (`gated_deltanet.py`), LaCT <-> the authors'
`lact_swiglu` with our modeling code shipped beside it (`lact.py`), hybrids of Gated DeltaNet and attention layers <->
transformers' `qwen3_5_text` (`qwen3_5.py`; a vision-language `qwen3_5` folder imports its language model).

Export (streamed): the model is built at TP=1 PP=1 on the meta device from the checkpoint's own config (common
state); its sharded state dict is loaded one group at a time (the embedding, each layer, the final norm, the
output layer), each from its own chunks of the checkpoint (any saved TP / PP / DP layout), mapped to the HF names
and appended to safetensors shards planned up front from the meta shapes (`model.safetensors.index.json` past
`max_shard_bytes`), padded vocabulary rows cut. Peak memory: about one layer (or the embedding) twice.
Import (streamed): config.json gives the Megatron model config; the model is built at TP=1 on the meta device,
and the dist checkpoint (`train --finetune` loads it at any layout) is planned once from its sharded state dict
as megatron-core's save would, then written group by group: each group's HF tensors are read from the
safetensors files (plain reads, no memory map), mapped to Megatron's, padded vocabulary rows zeroed, and appended
to the checkpoint's data file; the model config is written beside it (`model_config.yaml`). Peak memory: about one
layer (or the embedding) a few times.
The Megatron side is read and written through `training/checkpoint_format.py`, the one owner of that format.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from megatron_refine.models.mixers import MIXERS, get_mixer

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A Hugging Face tokenizer's files (AutoTokenizer reads those present): carried by import and export alike.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
# A format module maps one Hugging Face format: a single mixer's (its MixerSpec.hf_module, for models of that mixer
# alone) or a hybrid's (HYBRID_FORMATS, for the hybrid models its `handles(config)` accepts).
FORMATS = {name: importlib.import_module(get_mixer(name).hf_module) for name in MIXERS if get_mixer(name).hf_module}
HYBRID_FORMATS = (importlib.import_module("megatron_refine.conversion.qwen3_5"),)
# config.json model_type -> format: each format's own, and those it reads or refuses by name (`READS`).
MODEL_TYPES = {t: fmt for fmt in (*FORMATS.values(), *HYBRID_FORMATS) for t in getattr(fmt, "READS", (fmt.MODEL_TYPE,))}
# The tensors outside the layers, Megatron name -> the format's (fla's names, unless a format has `OUTER_NAMES`).
FLA_OUTER_NAMES = {"embedding.word_embeddings.weight": "model.embeddings.weight",
                   "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}


def export_format(cfg):
    """The format module that exports a model config."""
    if cfg.mixer in FORMATS:
        return FORMATS[cfg.mixer]
    for fmt in HYBRID_FORMATS:
        if fmt.handles(cfg):
            return fmt
    known = ", ".join(f"{f.MODEL_TYPE} ({f.DESCRIPTION})" for f in (*FORMATS.values(), *HYBRID_FORMATS))
    raise ValueError(f"no Hugging Face format holds a model of {'/'.join(cfg.mixers)} layers: convert-to-hf writes "
                     f"{known}")


def _outer_names(fmt) -> dict[str, str]:
    return getattr(fmt, "OUTER_NAMES", FLA_OUTER_NAMES)


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


@contextmanager
def _replacing(save: str | Path, overwrite: bool, source: Path):
    """A fresh temporary sibling of `save` to write into, which takes `save`'s place when the block succeeds: an
    error or a crash leaves `save` as it was. A `save` that holds anything is refused unless `overwrite`, and then
    replaced whole (no file of the old folder stays beside the new ones)."""
    from megatron_refine.training.checkpointing import LOCK, save_folder_holder

    save = Path(save)
    if save.exists() and not save.is_dir():
        raise ValueError(f"--save {save} is a file: pass a folder")
    held = sorted(p.name for p in save.iterdir()) if save.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"--save {save} is not empty (it holds {shown}): pick another --save, or pass --overwrite to "
                         "replace that folder whole")
    if held and (holder := save_folder_holder(save)):
        raise ValueError(f"--save {save} is in use by a training run ({holder}; lock {save / LOCK}): wait for it to "
                         "end, or pick another --save")
    if held and (source.resolve() == save.resolve() or save.resolve() in source.resolve().parents):
        raise ValueError(f"--save {save} holds --load {source}, which --overwrite would delete: pick another --save")
    save = save.absolute()  # "." has a name too
    save.parent.mkdir(parents=True, exist_ok=True)
    tmp = save.parent / f".{save.name}.{os.getpid()}.tmp"  # same file system: the renames below are atomic
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save.is_dir():
        old = tmp.with_suffix(".old")
        save.rename(old)
        tmp.rename(save)
        shutil.rmtree(old)
    else:
        tmp.rename(save)


def _checkpoint_folder(load: str | Path, iteration: int | None) -> Path:
    from megatron_refine.training.checkpoint_format import (
        MARKER, checkpoint_dir, is_checkpoint_folder, latest_iteration)

    load = Path(load)
    if is_checkpoint_folder(load) and iteration is None:
        return load
    if not load.is_dir():
        raise FileNotFoundError(f"checkpoint folder {load} not found: check --load")
    iteration = latest_iteration(load) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"no checkpoint in {load} (no {MARKER}): pass --iteration N")
    path = checkpoint_dir(load, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: check --iteration")
    return path


def _build(name: str, overrides: dict, vocab_size: int, dtype: torch.dtype, meta: bool = False):
    """The whole model at TP=1 PP=1 on this process's (CPU) runtime, without initialisation; with `meta`, on the
    meta device (no memory: shapes and sharded state dict only)."""
    from contextlib import nullcontext

    from megatron_refine.models import build_model, get_config

    layout = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False)
    config = get_config(name, **{**overrides, **layout, "use_cpu_initialization": True, "perform_initialization": False,
                                 "params_dtype": dtype, "bf16": dtype == torch.bfloat16})
    with torch.device("meta") if meta else nullcontext():
        return build_model(config, vocab_size, pre_process=True, post_process=True, use_te=False)


def _hf_tensors(cfg, vocab: int, load, out_dtype: torch.dtype, progress: bool = True):
    """The Hugging Face tensors group by group ({name: tensor} dicts, in file order); `load(prefix)` gives a group's
    Megatron tensors."""
    def getter(prefix: str):
        group = load(prefix)
        return lambda key: group.pop(key).detach().to(out_dtype)  # each tensor is mapped once

    fmt = export_format(cfg)
    outer = _outer_names(fmt)
    embedding = "embedding.word_embeddings.weight"
    yield {outer[embedding]: getter("embedding.")(embedding)[:vocab]}
    for i in _progress(range(cfg.num_layers), "export layers") if progress else range(cfg.num_layers):
        yield fmt.layer_to_hf(cfg, i, getter(f"decoder.layers.{i}."))
    norm = "decoder.final_layernorm.weight"
    yield {outer[norm]: getter("decoder.final_layernorm.")(norm)}
    if not cfg.tie_word_embeddings:
        yield {outer["output_layer.weight"]: getter("output_layer.")("output_layer.weight")[:vocab]}


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
SAFETENSORS_TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class _ShardWriter:
    """safetensors shards of at most `max_bytes` (a tensor larger than that gets a shard of its own), planned up
    front from every tensor's (name, shape, dtype) in file order, so each tensor is appended to its file as it
    comes (no shard is held in memory). The files are safetensors' format: an 8-byte little-endian header size,
    the JSON header (padded with spaces to 8 bytes), then the tensors' bytes in header order."""

    def __init__(self, save: Path, max_bytes: int, plan: list[tuple[str, tuple, torch.dtype]]):
        self.save, self.shards, size = save, [], 0
        for name, shape, dtype in plan:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if self.shards and self.shards[-1] and size + nbytes > max_bytes:
                self.shards.append([])
                size = 0
            if not self.shards:
                self.shards.append([])
            self.shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(self.shards)
        self.names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total = sum(nbytes for shard in self.shards for *_, nbytes in shard)
        self.order = [(i, entry) for i, shard in enumerate(self.shards) for entry in shard]
        self.position, self.file, self.shard = 0, None, -1

    def _open(self, i: int) -> None:
        if self.file is not None:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in self.shards[i]:
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(self.save / f"{self.names[i]}.tmp", "wb")  # noqa: SIM115 - closed in _open / close
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.shard = i

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            i, entry = self.order[self.position]
            if (name, tuple(t.shape), t.dtype) != entry[:3]:
                raise RuntimeError(f"export wrote {name} {tuple(t.shape)} {t.dtype} where {entry[:3]} was planned")
            if i != self.shard:
                self._open(i)
            self.file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy: the tensor's own bytes
            self.position += 1

    def close(self) -> list[str]:
        if self.position != len(self.order):
            raise RuntimeError(f"export wrote {self.position} of {len(self.order)} planned tensors")
        if self.file is not None:
            self.file.close()
        for name in self.names:
            (self.save / f"{name}.tmp").replace(self.save / name)
        if len(self.names) == 1:
            return [WEIGHTS_NAME]
        weight_map = {entry[0]: self.names[i] for i, entry in self.order}
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.save / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.names)


def _imported_token_ids(common: dict, hops: int = 8) -> dict | None:
    """The special ids of the Hugging Face model this checkpoint descends from: an import keeps them in its common
    state, and a run fine-tuned from it names it in its config's checkpoint.load (followed back `hops` times)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.training.checkpoint_format import checkpoint_dir, latest_iteration

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


def _write_tokenizer(save: Path, tok, ids: dict) -> list[str]:
    """The tokenizer's Hugging Face files: its tokenizer.json and its folder's other tokenizer files (configs,
    special tokens map, ...); without a tokenizer_config.json, one naming the special tokens of config.json's ids."""
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

        token = Tokenizer.from_file(str(tok.path)).id_to_token
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": token(tok.eos_id)}
        for kind in ("bos", "pad"):  # an imported model's, which config.json carries too
            if ids.get(f"{kind}_token_id") is not None and token(ids[f"{kind}_token_id"]) is not None:
                config[f"{kind}_token"] = token(ids[f"{kind}_token_id"])
        (save / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def export_to_hf(load: str | Path, save: str | Path, *, iteration: int | None = None, tokenizer: str | None = None,
                 dtype: str = "fp32", max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True,
                 overwrite: bool = False) -> list[str]:
    """A Megatron checkpoint (any TP / PP / DP layout) -> a Hugging Face folder. Returns the files written.
    Needs a single-process runtime (`megatron_refine.runtime.initialize(device="cpu")`). `progress`: a per-layer
    progress bar. A `save` folder that holds anything is refused unless `overwrite` (then replaced whole)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.training.checkpoint_format import CheckpointError, group_loader, verify_files

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = _checkpoint_folder(load, iteration)
    try:
        verify_files(path)  # a missing, truncated (or corrupt) file named before any reading
    except CheckpointError as e:
        raise CheckpointError(f"{e}: export another checkpoint (--iteration N)") from None
    common = dist_checkpointing.load_common_state_dict(str(path))
    model_args = (common.get("config") or {}).get("model")
    if not model_args or "vocab_size" not in common:
        raise ValueError(f"{path} has no model config or vocab size in its common state: only checkpoints written by "
                         "megatron-refine train or convert-from-hf export")
    name, overrides = model_args["config"], dict(model_args.get("overrides") or {})
    saved_dtype = dist_checkpointing.load_tensors_metadata(str(path))["embedding.word_embeddings.weight"].dtype
    vocab = common["vocab_size"]
    model = _build(name, overrides, vocab, saved_dtype, meta=True)  # shapes only: weights are loaded per group
    tok = _tokenizer(tokenizer, common)
    ids = _token_ids(tok, common)
    cfg, out_dtype = model.config, DTYPES[dtype]
    fmt = export_format(cfg)
    config = fmt.hf_config(cfg, vocab, ids, out_dtype)  # refuses what the format cannot express before writing

    meta = model.state_dict()
    plan = [(k, tuple(v.shape), v.dtype) for group in _hf_tensors(cfg, vocab, lambda prefix: meta, out_dtype, False)
            for k, v in group.items()]
    with _replacing(save, overwrite, Path(load)) as out:
        writer = _ShardWriter(out, max_shard_bytes, plan)
        for group in _hf_tensors(cfg, vocab, group_loader(model.sharded_state_dict(), path), out_dtype, progress):
            writer.add(group)
            del group  # or the loop variable holds this group while the next one is read
        files = writer.close()

        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in ids.items() if v is not None}
        generation["_from_model_config"] = True
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files += ["config.json", "generation_config.json"]
        for name in getattr(fmt, "REMOTE_FILES", ()):  # the modeling code config.json's auto_map names
            shutil.copyfile(fmt.REMOTE_CODE / name, out / name)
            files.append(name)
        files += _write_tokenizer(out, tok, ids)
    return files


class _LazyTensors:
    """The tensors of a Hugging Face folder (one file or an index), read one at a time. Read with plain file reads
    from the safetensors headers' byte ranges, not through safetensors' memory map: the mapped pages a read touches
    stay resident (and count in the process's RSS) until the file is closed, which would add up to the whole model."""

    def __init__(self, folder: Path):
        if (folder / INDEX_NAME).is_file():
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        elif (folder / WEIGHTS_NAME).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}: save the model with "
                                    "save_pretrained(..., safe_serialization=True)")
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_NAME]
        self.entries = {}  # name -> (file, dtype, shape, start, end): the tensor's bytes' absolute offsets
        for f in files:
            with open(folder / f, "rb") as stream:
                size = int.from_bytes(stream.read(8), "little")
                header = json.loads(stream.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_TORCH_DTYPES:
                    raise ValueError(f"{folder / f} stores {name} as {info['dtype']}: only floating-point weights "
                                     f"({', '.join(SAFETENSORS_TORCH_DTYPES)}) are read")
                begin, stop = info["data_offsets"]
                self.entries[name] = (folder / f, SAFETENSORS_TORCH_DTYPES[info["dtype"]], tuple(info["shape"]),
                                      8 + size + begin, 8 + size + stop)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.entries))
            if missing:
                raise ValueError(f"{folder / INDEX_NAME} names {missing[:3]}, which its files lack")
            self.entries = {k: v for k, v in self.entries.items() if weight_map.get(k) == v[0].name}

    def names(self) -> set[str]:
        return set(self.entries)

    def view(self, renames: dict[str, str], skipped: dict[str, str]) -> dict[str, int]:
        """Leave out the tensors under the `skipped` prefixes, then read those under a `renames` key under its
        value (a wrapper's language model as the model itself). Returns {what was skipped: tensors}."""
        left_out = {}
        for prefix, what in skipped.items():
            names = [name for name in self.entries if name.startswith(prefix)]
            for name in names:
                del self.entries[name]
            if names:
                left_out[what] = len(names)
        for old, new in renames.items():
            self.entries = {(new + k.removeprefix(old) if k.startswith(old) else k): v for k, v in self.entries.items()}
        return left_out

    def split_fused_mlp(self) -> int:
        """fla before its GatedMLP took separate weights (commit b48ca31, 2025-02-09; every release from 0.1.0 has
        them) saved each MLP as one `gate_proj` [2F, h] = cat[gate | up] (`gate, y = gate_proj(x).chunk(2, -1)`)
        and no `up_proj`: read such a tensor's two halves as gate_proj and up_proj (row ranges of its bytes).
        Returns the number of MLPs split."""
        split = 0
        for name, (path, dtype, shape, begin, end) in list(self.entries.items()):
            up = name.removesuffix("mlp.gate_proj.weight") + "mlp.up_proj.weight"
            if not name.endswith("mlp.gate_proj.weight") or up in self.entries or len(shape) != 2 or shape[0] % 2:
                continue
            half = (end - begin) // 2
            self.entries[name] = (path, dtype, (shape[0] // 2, shape[1]), begin, begin + half)
            self.entries[up] = (path, dtype, (shape[0] // 2, shape[1]), begin + half, end)
            split += 1
        return split

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise ValueError(f"the Hugging Face checkpoint lacks {name}: an incomplete model, or one whose "
                             "config.json does not describe it")
        path, dtype, shape, begin, end = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end - begin != out.numel() * out.element_size():
            raise ValueError(f"{path} holds {end - begin} bytes for {name}, its shape {shape} needs "
                             f"{out.numel() * out.element_size()}: a corrupt file")
        with open(path, "rb") as stream:
            stream.seek(begin)
            if stream.readinto(out.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path} is truncated (its tensor {name} ends past the file's end)")
        return out


def import_from_hf(load: str | Path, save: str | Path, *, tp: int = 1, pp: int = 1, overwrite: bool = False) -> Path:
    """A Hugging Face `delta_net`, `gated_deltanet`, `lact_swiglu` or `qwen3_5_text` folder (or a `qwen3_5`
    vision-language one: its language model) -> a Megatron dist checkpoint (`iter_0000000/` + marker),
    `model_config.yaml` and the folder's tokenizer files. `tp` / `pp` only validate the layout (the checkpoint loads
    at any). A `save` folder that holds anything (e.g. a training run's checkpoints) is refused unless `overwrite`
    (then replaced whole). Returns the checkpoint folder. Needs a single-process runtime
    (`megatron_refine.runtime.initialize(device="cpu")`)."""
    from megatron_refine.models import get_config
    from megatron_refine.training import checkpoint_format
    from megatron_refine.training.checkpointing import model_identity

    load, save = Path(load), Path(save)
    if not (load / "config.json").is_file():
        raise FileNotFoundError(f"{load / 'config.json'} not found: --load takes a Hugging Face model folder")
    config = json.loads((load / "config.json").read_text())
    fmt = MODEL_TYPES.get(config.get("model_type"))
    if fmt is None:
        known = ", ".join(f"{f.MODEL_TYPE!r} ({f.DESCRIPTION})" for f in dict.fromkeys(MODEL_TYPES.values()))
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}: convert-from-hf reads {known}")
    renames, skipped = {}, {}
    if hasattr(fmt, "language_model"):  # what of the folder converts (a wrapper's language model), what is left out
        config, renames, skipped, note = fmt.language_model(config)
        if note:
            print(f"{load}: {note}", flush=True)
    name, overrides = fmt.megatron_model_args(config)
    cfg = get_config(name, **overrides)
    if tp < 1 or pp < 1 or cfg.num_attention_heads % tp or cfg.num_layers % pp:
        raise ValueError(f"--tp {tp} --pp {pp} does not divide the model's {cfg.num_attention_heads} heads and "
                         f"{cfg.num_layers} layers: pick a TP size that divides the heads and a PP size that divides "
                         "the layers (the checkpoint itself loads at any such layout)")
    get_config(name, **overrides, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)  # the mixer's checks
    vocab = config.get("vocab_size", 32000)
    if (load / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokens = Tokenizer.from_file(str(load / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if tokens > vocab:
            raise ValueError(f"config.json's vocab_size {vocab} is smaller than its tokenizer's {tokens} tokens: "
                             "the checkpoint does not match its tokenizer.json")

    tensors = _LazyTensors(load)
    for what, count in tensors.view(renames, skipped).items():
        print(f"{load}: {what} left out ({count} tensors): megatron-refine's model has no such part", flush=True)
    if fused := tensors.split_fused_mlp():
        print(f"{load}: {fused} MLPs in fla's layout before 2025-02 (one gate_proj [2F, h] = [gate | up], no up_proj):"
              " read as gate_proj and up_proj", flush=True)
    model = _build(name, overrides, vocab, torch.float32, meta=True)  # shapes only: weights are written per group
    cfg = model.config
    outer = _outer_names(fmt)
    embedding, norm, head = (outer[k] for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                                "output_layer.weight"))
    unexpected = tensors.names() - set(fmt.hf_names(cfg)) - {head}  # a tied model's file may hold its head too
    if unexpected:
        raise ValueError(f"the Hugging Face checkpoint has tensors this config does not define: "
                         f"{sorted(unexpected)[:5]} (a config option our {'/'.join(cfg.mixers)} layers lack?)")
    params = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    # The shape each HF tensor must have: this model's own tensors mapped to HF names, vocabulary cut.
    expected = {embedding: (vocab, cfg.hidden_size), norm: (cfg.hidden_size,), head: (vocab, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        expected.update({k: tuple(v.shape) for k, v in fmt.layer_to_hf(cfg, i, params.__getitem__).items()})

    def get(name: str) -> torch.Tensor:
        value = tensors.get(name)
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, config.json asks for {expected[name]}: "
                             "the weights and config.json disagree")
        return value

    def padded(key: str, value: torch.Tensor) -> torch.Tensor:
        """The Megatron tensor `key` (this model's dtype and shape): `value`, padded vocabulary rows zeroed."""
        target = params[key]
        if tuple(value.shape) == tuple(target.shape):
            return value.to(target.dtype)
        out = torch.zeros(target.shape, dtype=target.dtype)
        out[: value.shape[0]].copy_(value)
        return out

    def groups():
        yield {"embedding.word_embeddings.weight": padded("embedding.word_embeddings.weight", get(embedding))}
        for i in _progress(range(cfg.num_layers), "import layers"):
            yield {k: padded(k, v) for k, v in fmt.layer_from_hf(cfg, i, get).items()}
        yield {"decoder.final_layernorm.weight": padded("decoder.final_layernorm.weight", get(norm))}
        if not cfg.tie_word_embeddings:
            yield {"output_layer.weight": padded("output_layer.weight", get(head))}

    model_args = {"config": name, "overrides": overrides}
    with _replacing(save, overwrite, load) as out:
        checkpoint_format.save_streamed_checkpoint(out, 0, model.sharded_state_dict(), {
            "iteration": 0,
            "layout": {"tp": 1, "pp": 1, "dp": 1},
            "vocab_size": vocab,
            "model_identity": model_identity(model),
            "tokenizer_hash": None,
            "hf_token_ids": fmt.token_ids(config),
            "config": {"model": model_args},
        }, groups())
        (out / "model_config.yaml").write_text(yaml.safe_dump({"model": model_args}, sort_keys=False))
        for file in TOKENIZER_FILES:
            if (load / file).is_file():
                shutil.copyfile(load / file, out / file)
    return checkpoint_format.checkpoint_dir(save, 0)

