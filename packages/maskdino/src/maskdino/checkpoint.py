"""Deprecated alias of :mod:`maskdino.checkpoints` and :mod:`detr_core.checkpoint` (removed in 0.3)."""

from maskdino._deprecated import moved

moved(__name__, "maskdino.checkpoints")

from detr_core.checkpoint import (  # noqa: E402
    CheckpointMismatchError,
    LoadReport,
    load_into_model,
    load_state_dict_file,
    restricted_pickle_load,
    save_checkpoint,
)
from maskdino.checkpoints.official import (  # noqa: E402
    ALIASES,
    convert_official_state_dict,
    load_official_checkpoint,
)

__all__ = [
    "ALIASES",
    "CheckpointMismatchError",
    "LoadReport",
    "convert_official_state_dict",
    "load_into_model",
    "load_official_checkpoint",
    "load_state_dict_file",
    "restricted_pickle_load",
    "save_checkpoint",
]
