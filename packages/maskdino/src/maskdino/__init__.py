"""Mask DINO (Li et al., CVPR 2023) without detectron2: detection, instance, panoptic and semantic segmentation.

Main entry points (imported lazily, so ``import maskdino`` stays cheap)::

    from maskdino import build_model, get_preset
    model = build_model(get_preset("coco-instance-r50-3s-d1-2048"))
    losses = model(images, targets)              # training mode: weighted loss dict
    predictions = model.predict(images)          # list[Prediction]

    from maskdino import load_model              # a weights file with its embedded config
    loaded = load_model("model_final.pth")       # .model, .config, .metadata

Package layout: ``config`` (typed configs, presets), ``modeling`` (the model, one module per paper concept),
``checkpoints`` (official key map, conversion, weight files, training state), ``data``, ``engine`` (training,
evaluation), ``inference`` (image predictor, drawing), ``cli``, ``cpu_inference`` (CPU speed helpers).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "MaskDINO": "maskdino.modeling.model",
    "build_model": "maskdino.modeling.model",
    "MaskDINOConfig": "maskdino.config",
    "ExperimentConfig": "maskdino.config",
    "ConfigError": "maskdino.config",
    "get_preset": "maskdino.config",
    "get_experiment": "maskdino.config",
    "load_config": "maskdino.config",
    "save_config": "maskdino.config",
    "PRESETS": "maskdino.config",
    "Prediction": "maskdino.structures",
    "Instances": "maskdino.structures",
    "PanopticSegmentation": "maskdino.structures",
    "load_model": "maskdino.inference.predictor",
    "ImagePredictor": "maskdino.inference.predictor",
    "load_official_checkpoint": "maskdino.checkpoints",
    "convert_official_checkpoint": "maskdino.checkpoints",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maskdino' has no attribute {name!r}")
