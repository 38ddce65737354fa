"""Training, evaluation and tooling: experiment configs, optimizer/schedule, trainer, checkpoints, DDP helpers."""

from maskdino.engine.config import ExperimentConfig, apply_overrides, get_experiment, load_experiment
from maskdino.engine.trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = [
    "ExperimentConfig",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "apply_overrides",
    "get_experiment",
    "load_experiment",
    "train",
]
