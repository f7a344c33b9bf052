"""A trained model from its checkpoint folder, for evaluation and test-time training: the model section of its
training config, the dtype it trained in, its tokenizer, and the model itself on the current parallel layout.

The tensor-parallel size comes from the initialized process groups, not from a user value: megatron-core's layers
split their weights by the groups' size (`parallel_state`), and the model config's `tensor_model_parallel_size`
is the copy its checks read, so `load_model` sets it from the groups, the one source of truth.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_refine.models import build_model, get_config
from megatron_refine.training.checkpointing import (
    checkpoint_dir,
    latest_iteration,
    load_checkpoint,
    tokenizer_or_saved,
)


def checkpoint_model(load: str | Path) -> tuple[dict, dict]:
    """The newest checkpoint of `load`: its common state and the model section of its training config."""
    iteration = latest_iteration(load)
    if iteration is None:
        raise FileNotFoundError(f"no checkpoint in {load} (no latest_checkpointed_iteration.txt): check --load")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(load, iteration)))
    model_args = (common.get("config") or {}).get("model")
    if not model_args:
        raise ValueError(f"{load} has no model config in its checkpoint: only megatron-refine checkpoints evaluate")
    return common, model_args


def checkpoint_bf16(common: dict, cuda: bool) -> bool:
    """Whether to evaluate in bf16: on CUDA the dtype the checkpoint trained in (its `bf16`, which defaults to on
    there, as the trainer's), so fla's kernels run and `eval --ttt`'s model is the same; fp32 on a CPU."""
    saved = (common.get("config") or {}).get("bf16")
    return cuda and (saved is None or bool(saved))


def load_model(load: str | Path, tokenizer: str | None = None, sequence_parallel: bool = False):
    """The newest checkpoint of `load` on the current parallel layout (any saved layout), and its tokenizer:
    `tokenizer` ("byte" or a tokenizer.json), else the one its training data recorded."""
    common, model_args = checkpoint_model(load)
    cuda = torch.distributed.get_backend() == "nccl"
    dtype = dict(params_dtype=torch.bfloat16, bf16=True) if checkpoint_bf16(common, cuda) else {}
    config = get_config(model_args["config"], **{
        **model_args.get("overrides", {}), "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "sequence_parallel": sequence_parallel, "use_cpu_initialization": not cuda, "perform_initialization": False,
        **dtype})
    model = build_model(config, common["vocab_size"])
    if cuda:
        model.cuda()
    load_checkpoint(load, model)
    return model, checkpoint_tokenizer(load, tokenizer)


def checkpoint_tokenizer(load: str | Path, tokenizer: str | None = None):
    """`tokenizer` ("byte" or a tokenizer.json) when given, else the one the checkpoint was trained with."""
    found = tokenizer_or_saved(tokenizer, load)
    if found is None:
        raise ValueError(f"{load} does not record its training data's tokenizer: pass --tokenizer (byte, or a "
                         "tokenizer.json)")
    return found


__all__ = ["checkpoint_bf16", "checkpoint_model", "checkpoint_tokenizer", "load_model"]
