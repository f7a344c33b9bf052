"""NTP pretraining on megatron-core: config, loop, checkpoints, metrics."""

from megatron_refine.training.checkpointing import CheckpointError, latest_iteration, load_checkpoint, save_checkpoint
from megatron_refine.training.config import NAMED_CONFIGS, TrainConfig, load_config
from megatron_refine.training.trainer import (
    StepResult,
    Trainer,
    TrainingDivergedError,
    TrainResult,
    setup,
    train,
    train_step,
)

__all__ = [
    "CheckpointError",
    "NAMED_CONFIGS",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "latest_iteration",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "setup",
    "train",
    "train_step",
]
