"""Checkpoints: the official Mask DINO key map and conversion, our weight files, and training checkpoints.

* :mod:`.official`: official (detectron2) layout -> ours, :func:`load_official_checkpoint`;
* :mod:`.convert`: :func:`convert_official_checkpoint`, a converted file that runs like the released model;
* :mod:`.weights`: :func:`read_weights` / :func:`load_model_weights` / :func:`save_weights` for every kind of file;
* :mod:`.training`: training state (optimizer, scheduler, RNG, data position) for exact resume.

Safe reading, atomic writing, key maps and strict loading are generic and live in :mod:`detr_core.checkpoint`.
"""

from detr_core.checkpoint import CheckpointError, CheckpointMismatchError, KeyMapError, LoadReport

from .convert import convert_official_checkpoint
from .official import ALIASES, convert_official_state_dict, load_official_checkpoint, official_experiment
from .weights import WeightsFile, load_model_weights, read_weights, save_weights

__all__ = [
    "ALIASES",
    "CheckpointError",
    "CheckpointMismatchError",
    "KeyMapError",
    "LoadReport",
    "WeightsFile",
    "convert_official_checkpoint",
    "convert_official_state_dict",
    "load_model_weights",
    "load_official_checkpoint",
    "official_experiment",
    "read_weights",
    "save_weights",
]
