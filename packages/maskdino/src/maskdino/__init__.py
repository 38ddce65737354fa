"""Mask DINO (Li et al., CVPR 2023) without detectron2: detection, instance, panoptic and semantic segmentation.

Main entry points (imported lazily, so ``import maskdino`` stays cheap)::

    from maskdino import build_model, get_preset
    model = build_model(get_preset("coco-instance-r50-3s-d1-2048"))
    losses = model(images, targets)              # training mode: weighted loss dict
    predictions = model.predict(images)          # list[Prediction]
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MaskDINO": "maskdino.model",
    "build_model": "maskdino.model",
    "MaskDINOConfig": "maskdino.config",
    "get_preset": "maskdino.config",
    "load_config": "maskdino.config",
    "save_config": "maskdino.config",
    "PRESETS": "maskdino.config",
    "Prediction": "maskdino.structures",
    "Instances": "maskdino.structures",
    "PanopticSegmentation": "maskdino.structures",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maskdino' has no attribute {name!r}")
