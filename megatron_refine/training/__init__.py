"""NTP pretraining on megatron-core: config, loop, checkpoints, metrics."""

from megatron_refine.training.checkpointing import latest_iteration, load_checkpoint, save_checkpoint
from megatron_refine.training.config import NAMED_CONFIGS, TrainConfig, load_config
from megatron_refine.training.trainer import StepResult, Trainer, TrainResult, setup, train, train_step

__all__ = [
    "NAMED_CONFIGS",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "latest_iteration",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "setup",
    "train",
    "train_step",
]
