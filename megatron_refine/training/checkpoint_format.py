"""The on-disk format of a checkpoint folder, and its one owner: the trainer's save and load
(`checkpointing.py`) and the Hugging Face converters (`conversion/hf.py`) write, read, stream, verify and mark
checkpoints only through this module.

    iter_0000100/                       a complete checkpoint: megatron-core's torch_dist format (metadata.json,
        checksums.sha256                the DCP `.metadata` index and `.distcp` data, common.pt) plus the sha256
                                        of each of its files (`sha256sum -c checksums.sha256` reads it)
    iter_0000200.tmp/                   one being written: renamed into place once whole, ignored until then
    latest_checkpointed_iteration.txt   the iteration to resume from, replaced atomically after the rename

Streaming (`group_loader`, `save_streamed`): one group of tensors (the embedding, a layer, ...) at a time, for the
converters, whose peak memory must stay about one layer whatever the model's size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron_refine.data.shards import file_sha256
from megatron_refine.megatron_compat import (
    COMMON_STATE_FILE, COMMON_STATE_KEY, common_state_object, write_common_state_file)

MARKER = "latest_checkpointed_iteration.txt"
CHECKSUMS = "checksums.sha256"


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (a missing, corrupt or unreadable file, non-finite weights), or a save
    folder that cannot take one (locked by another run, not writable, full)."""


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the marker names; without a marker (removed, or a crash between a checkpoint's rename and
    the marker's), the newest complete checkpoint's; None when there is none."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return next((i for i in reversed(saved_iterations(root)) if _complete(checkpoint_dir(root, i))), None)
    text = marker.read_text().strip()
    if not text.isdigit() or not checkpoint_dir(root, int(text)).is_dir():
        raise CheckpointError(f"{marker} says {text!r}, which is not a complete checkpoint in {root}: fix or remove the "
                              "marker (without it the newest complete checkpoint is used)")
    return int(text)


def saved_iterations(root: str | Path) -> list[int]:
    """The iterations of the checkpoint folders in `root` (renamed into place: written in full), ascending."""
    return sorted(int(p.name[5:]) for p in Path(root).glob("iter_???????") if p.is_dir() and p.name[5:].isdigit())


def _complete(path: Path) -> bool:
    try:
        verify_files(path, checksums=False)
    except CheckpointError:
        return False
    return True


def prune(root: Path, iteration: int, keep_last: int) -> None:
    """After `iteration` was saved (and the marker names it): keep it and the `keep_last - 1` highest complete
    iterations below it; remove the rest below it, and every checkpoint above it: those are a run's this one
    overwrote (or fell back past), which a resume must never mistake for its own."""
    saved = saved_iterations(root)
    older, above = [i for i in saved if i < iteration], [i for i in saved if i > iteration]
    kept = [i for i in reversed(older) if _complete(checkpoint_dir(root, i))][: keep_last - 1]
    for i in [i for i in older if i not in kept] + above:
        shutil.rmtree(checkpoint_dir(root, i))
    if above:
        print(f"removed {', '.join(checkpoint_dir(root, i).name for i in above)} from {root}: checkpoints above "
              f"iter {iteration}, the one just saved, left by a run this one overwrote", flush=True)


def _my_files(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's share of a checkpoint's files to hash: the `__R_I.distcp` files rank R wrote (still in its page
    cache after a save), the rest on rank 0."""
    def owner(name: str) -> int:
        head = name.split("_")[2] if name.startswith("__") and name.count("_") >= 3 else ""
        return int(head) % world if head.isdigit() else 0
    return [n for n in names if owner(n) == rank]


def write_checksums(tmp: Path) -> None:
    """Collective: each rank hashes its share of the files in `tmp`, rank 0 writes CHECKSUMS. sha256 (as the data
    shards'), streamed from the files just written (page cache): 1-2 s a GB, the ranks in parallel."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != CHECKSUMS)
    mine = {n: file_sha256(tmp / n) for n in _my_files(names, rank, world)}
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    if rank == 0:
        digests = {n: d for part in every for n, d in part.items()}
        (tmp / CHECKSUMS).write_text("".join(f"{digests[n]}  {n}\n" for n in sorted(digests)))


def _read_checksums(path: Path) -> dict[str, str] | None:
    """{file name: sha256} as CHECKSUMS records it; None for a checkpoint written before checksums."""
    file = path / CHECKSUMS
    if not file.is_file():
        return None
    digests = {}
    for line in file.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise CheckpointError(f"{file} is unreadable (line {line[:80]!r})")
        digests[name] = digest
    return digests


def verify_files(path: Path, checksums: bool = True, rank: int = 0, world: int = 1) -> None:
    """Every file the checkpoint's index names is there and holds the bytes it should: else a CheckpointError
    naming the file (the torch_dist format: `.metadata` maps each tensor to a byte range of a `.distcp` file).
    With `checksums`, this rank's share (of `world`) of the files CHECKSUMS lists must match their sha256."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("metadata.json", ".metadata"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to parse the index means it is unreadable
        raise CheckpointError(f"{path / '.metadata'} is unreadable ({type(e).__name__})") from None
    if not (path / COMMON_STATE_FILE).is_file() and not any(
            key.startswith(COMMON_STATE_KEY) for key in index.state_dict_metadata):
        raise CheckpointError(f"{path / COMMON_STATE_FILE} is missing")
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated ({file.stat().st_size} of {size} bytes)")
    digests = _read_checksums(path) if checksums else None
    for name in _my_files(sorted(digests or {}), rank, world):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file_sha256(file) != digests[name]:
            raise CheckpointError(f"{file} is corrupt: its sha256 differs from the one {CHECKSUMS} recorded at save")


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether `path` is one checkpoint (an iter_NNNNNNN folder) rather than a save folder holding them."""
    return (Path(path) / "metadata.json").is_file()


def staging_dir(root: str | Path, iteration: int) -> Path:
    """Where `iteration` is written before it is whole (`iter_NNNNNNN.tmp`): loading never looks there."""
    return checkpoint_dir(root, iteration).with_suffix(".tmp")


def begin_write(root: str | Path, iteration: int) -> Path:
    """An empty staging folder for `iteration` (one a crashed save left is cleared). One process calls this."""
    tmp = staging_dir(root, iteration)
    Path(root).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def abandon_write(root: str | Path, iteration: int) -> None:
    """Remove a failed save's staging folder (the space it took); older checkpoints and the marker stay."""
    shutil.rmtree(staging_dir(root, iteration), ignore_errors=True)


def publish(root: str | Path, iteration: int) -> Path:
    """Rename the staged, whole `iteration` into place (replacing a folder of that iteration), then name it in
    the marker: a crash in between leaves the marker naming the previous checkpoint, which a resume then uses.
    One process calls this, after every rank has written."""
    final = checkpoint_dir(root, iteration)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging_dir(root, iteration), final)
    mark_latest(root, iteration)
    return final


def mark_latest(root: str | Path, iteration: int) -> None:
    """Point the marker at `iteration`, atomically (a reader sees the old marker or the new one)."""
    marker_tmp = Path(root) / (MARKER + ".tmp")
    marker_tmp.write_text(str(iteration))
    os.replace(marker_tmp, Path(root) / MARKER)


def group_loader(sharded: dict, path: Path):
    """`load(prefix)`: the checkpoint's tensors whose state dict key starts with `prefix` (one layer, the
    embedding, ...), as a {key: whole TP=1 tensor} dict. Only that group's entries of the (meta) model's sharded
    state dict get real CPU buffers, and only their chunks of the checkpoint are read: torch.distributed.checkpoint
    with a planner asking for each ShardedTensor's own chunk (a layer of a layer-stacked tensor; megatron-core's
    load cannot ask for a part of a stacked tensor in one process), which reshards any saved TP / PP layout. The
    fused projections' factories are built and merged as dist_checkpointing.load does."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import (
        dict_list_map_inplace, extract_matching_values, nested_values)
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor, ShardedTensorFactory, apply_factories, apply_factory_merges)


    try:
        reader = ChunkReader(path)
    except Exception as e:  # noqa: BLE001 - an unreadable index: the checkpoint is unusable
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {str(e).strip()[:300]})") from e

    def load(prefix: str) -> dict[str, torch.Tensor]:
        template = {}
        for key, value in sharded.items():
            if not key.startswith(prefix):
                continue
            if isinstance(value, ShardedTensor):
                template[key] = replace(value, data=torch.empty(value.local_shape, dtype=value.dtype))
            elif isinstance(value, ShardedTensorFactory):
                template[key] = replace(value, data=torch.empty(value.data.shape, dtype=value.data.dtype))
            # ShardedObjects (_extra_state) carry no weights
        factories, _ = extract_matching_values(template, lambda x: isinstance(x, ShardedTensorFactory),
                                               return_lists_as_dicts=True)
        apply_factories(template)
        reader.read([t for t in nested_values(template) if isinstance(t, ShardedTensor)])
        dict_list_map_inplace(lambda t: t.data if isinstance(t, ShardedTensor) else t, template)
        loaded = apply_factory_merges(template, factories)
        nonfinite = [k for k, t in loaded.items() if not _finite(t)]
        if nonfinite:
            raise CheckpointError(f"{path} holds non-finite weights (NaN/Inf: {', '.join(nonfinite[:3])})")
        return loaded

    return load


def _finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """No NaN / Inf in `t`, checked a block at a time: isfinite over a whole embedding table takes temporaries
    of nearly twice its size."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + block]).all()) for i in range(0, flat.numel(), block))


class ChunkReader:
    """Reads megatron-core ShardedTensors (their `data` filled in place) from a torch_dist checkpoint folder."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = path
        self.metadata = FileSystemReader(str(path)).read_metadata()

    def read(self, tensors: list) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


        saved = self.metadata.state_dict_metadata
        absent = sorted({t.key for t in tensors if t.key not in saved or tuple(getattr(saved[t.key], "size", ()))
                         != tuple(t.global_shape)})
        if absent:  # a missing tensor, or one of another shape: its chunks would not cover the buffer
            raise ValueError(f"{self.path} lacks {absent[:5]} (or holds them in another shape: a different model "
                             "config?): check the checkpoint's model config")
        tensors = self._read_whole_chunks(tensors)
        # Each ShardedTensor's place in its global tensor (prepended axes, e.g. the layer, included).
        targets = {}
        for t in tensors:
            sizes = (1,) * t.prepend_axis_num + tuple(t.local_shape)
            targets[(t.key, tuple(t.global_offset))] = (t.data.view(sizes), sizes)
        metadata = self.metadata

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self) -> LoadPlan:
                items = []
                for (key, offsets), (_, sizes) in targets.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                    items += create_read_items_for_chunk_list(key, metadata.state_dict_metadata[key], [chunk])
                return LoadPlan(items)

            def lookup_tensor(self, index):
                return targets[(index.fqn, tuple(index.offset))][0]

        if not targets:
            return
        try:
            dcp.load({key: target for (key, _), (target, _) in targets.items()},
                     storage_reader=dcp.FileSystemReader(str(self.path)),
                     planner=Planner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
        except Exception as e:  # noqa: BLE001 - a file that cannot be read or decoded: the checkpoint is unusable
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"{self.path} could not be read ({type(e).__name__}: {first})") from e
        finally:
            targets.clear()  # the Planner class lives on until a cyclic collection: let it hold no tensors

    def _read_whole_chunks(self, tensors: list) -> list:
        """Read the tensors that are exactly one saved chunk (a layout saved at the same TP as this one's, e.g. every
        tensor of a TP=1 checkpoint) straight from their file into their `data`; return the others. torch DCP would
        load the chunk and copy it into the target, holding both at once: for the 1.3B preset's embedding table
        that is 0.5 GiB instead of 0.25."""
        from torch.distributed.checkpoint.filesystem import _create_file_view
        from torch.distributed.checkpoint.metadata import MetadataIndex


        rest = []
        for t in tensors:
            offsets = torch.Size(t.global_offset)
            sizes = torch.Size((1,) * t.prepend_axis_num + tuple(t.local_shape))
            info = self.metadata.storage_data.get(MetadataIndex(t.key, offsets))
            whole = info is not None and info.transform_descriptors is None and any(
                c.offsets == offsets and c.sizes == sizes for c in self.metadata.state_dict_metadata[t.key].chunks)
            if not whole:
                rest.append(t)
                continue
            try:
                with open(self.path / info.relative_path, "rb") as f:
                    chunk = torch.load(_create_file_view(f, info.offset, info.length), map_location="cpu",
                                       weights_only=True)
            except Exception as e:  # noqa: BLE001 - bytes that do not decode: the file is damaged
                raise CheckpointError(f"{self.path / info.relative_path} could not be read ({type(e).__name__} in "
                                      f"{t.key}'s bytes): a damaged checkpoint; export another (--iteration N)") from e
            if chunk.dtype != t.data.dtype or chunk.shape != sizes:
                rest.append(t)  # not what the index promised: let DCP's own checks report it
                continue
            if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
                chunk = chunk.clone()  # a view saved with its whole storage: keep the chunk's bytes only
            t.data = chunk.view(t.local_shape)
        return rest


def save_streamed_checkpoint(root: str | Path, iteration: int, sharded: dict, common: dict, groups) -> Path:
    """A whole checkpoint of `iteration` in the fresh folder `root`, its weights streamed from `groups` (see
    `save_streamed`), its checksums recorded as a training save's, and the marker naming it. The caller makes
    `root` appear whole (the converters write into a temporary folder they rename)."""
    folder = checkpoint_dir(root, iteration)
    folder.mkdir()
    save_streamed(sharded, common, groups, folder)
    write_checksums(folder)  # what a training save records, so a load verifies these files too
    mark_latest(root, iteration)
    return folder


def save_streamed(sharded: dict, common: dict, groups, folder: Path) -> None:
    """What `dist_checkpointing.save({"model": sharded, **common}, folder)` writes (torch_dist: metadata.json,
    the DCP `.metadata` and its `.distcp` data, the common state in common.pt, and on megatron-core 0.19 inside
    the DCP files too: as save_checkpoint leaves it on every release), with the (meta) model's `sharded` state dict's
    weights given group by group: `groups` yields {state dict key: whole TP=1 tensor} dicts, each held only while
    its tensors are written. The plan and the index are megatron-core's and torch's, made once from the meta
    shapes (every ShardedTensor, the fused projections' factory pieces, the ShardedObjects); each group's chunks are
    then appended to one `.distcp` file with torch's own item writer, and the index names each one's byte range."""
    from dataclasses import replace

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint.filesystem import _write_item
    from torch.distributed.checkpoint.planner import WriteItemType


    strategy = get_default_save_sharded_strategy()
    # dist_checkpointing.save's own preprocessing (factories applied, sharding validated) on the meta tensors
    meta_part, common_state = save_preprocess({"model": dict(sharded), **common})
    write_common_state_file(folder, common_state)  # what save_checkpoint leaves on every release
    if (embedded := common_state_object(common_state)) is not None:
        meta_part[COMMON_STATE_KEY] = embedded
    meta_part, _, _ = _replace_state_dict_keys_with_sharded_keys(meta_part, strategy.keep_only_main_replica)
    planner = MCoreSavePlanner(dedup_replicated_tensors=not strategy.keep_only_main_replica, flatten_state_dict=False)
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=False, thread_count=1)
    writer.set_up_storage_writer(True)
    planner.set_up_planner(mcore_to_pyt_state_dict(meta_part, False), writer.storage_meta(), True)
    local_plan = writer.prepare_local_plan(planner.create_local_plan())
    global_plans, metadata = planner.create_global_plan([local_plan])
    metadata.all_local_plans = [local_plan]  # as megatron-core's saver records it
    plan = planner.finish_plan(writer.prepare_global_plan(global_plans)[0])

    file_name = f"{plan.storage_data.prefix}0.distcp"
    pending = {(item.index.fqn, tuple(item.index.offset)): item for item in plan.items
               if item.type != WriteItemType.BYTE_IO}
    results = []
    with open(folder / file_name, "wb") as stream:  # noqa: SIM115 - closed below
        for item in plan.items:  # ShardedObjects (the layers' empty _extra_state): no weights, known up front
            if item.type == WriteItemType.BYTE_IO:
                results.append(_write_item(writer.transforms, stream, planner.resolve_data(item), item, file_name,
                                           writer.serialization_format))
        for group in groups:
            template = {}
            for key, value in group.items():
                meta = sharded.get(key)
                if not isinstance(meta, (ShardedTensor, ShardedTensorFactory)):
                    raise RuntimeError(f"import produced {key}, which the model does not save")
                template[key] = replace(meta, data=value)
            apply_factories(template)
            for t in nested_values(template):
                item = pending.pop((t.key, tuple(t.global_offset)), None)
                if item is None:
                    raise RuntimeError(f"import wrote {t.key} at {tuple(t.global_offset)} twice, or it is not planned")
                data = t.data.reshape(item.tensor_data.chunk.sizes)
                if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                    data = data.clone()  # torch.save writes a view's whole storage: write the chunk's bytes only
                results.append(_write_item(writer.transforms, stream, data, item, file_name,
                                           writer.serialization_format))
            del template, group
    if pending:
        raise RuntimeError(f"import wrote no {sorted(k for k, _ in pending)[:3]}")
    writer.finish(metadata, [results])
    save_config(CheckpointingConfig(strategy.backend, strategy.version), folder)
