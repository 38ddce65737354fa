"""Convert an official Mask DINO checkpoint into a self-contained weights file of this package."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from detr_core.checkpoint import load_into_model, load_state_dict_file, match_aliases

from .official import ALIASES, convert_official_state_dict, official_experiment
from .weights import save_weights

__all__ = ["ConversionResult", "convert_official_checkpoint"]


@dataclass
class ConversionResult:
    source_keys: int
    converted_keys: int
    preset: str | None
    output: Path


def convert_official_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    preset: str | None = None,
    backbone: str | None = None,
) -> ConversionResult:
    """Official checkpoint ``src`` -> our weights file ``dst`` (``.safetensors``, or ``.pth``/``.pt``).

    With ``preset`` (e.g. ``coco-instance-r50-3s-d1-2048``) the converted weights are first loaded strictly into the
    model of that preset (a mismatch names every key), and the file embeds the experiment config the released model
    runs with (:func:`~maskdino.checkpoints.official.official_experiment`: ``padding_mode="official"``, the official
    test resize) and, for COCO presets, the COCO class names, so ``maskdino predict/eval --weights dst`` needs no
    other argument and reproduces the official outputs.

    Raises:
        FileNotFoundError, CheckpointError: ``src`` is missing or not a checkpoint.
        KeyMapError, CheckpointMismatchError: it is not (this preset's) Mask DINO checkpoint.
    """
    raw = load_state_dict_file(src)
    sd = convert_official_state_dict(raw, backbone=backbone)
    config = metadata = None
    if preset is not None:
        from ..modeling import build_model

        exp = official_experiment(preset)
        model = build_model(exp.model)
        sd = match_aliases(sd, model.state_dict().keys(), ALIASES)
        load_into_model(model, sd, strict=True)
        config = exp.to_dict()
        metadata = _dataset_metadata(preset)
    dst = Path(dst)
    save_weights(dst, sd, config=config, metadata=metadata, source=Path(src).name)
    return ConversionResult(len(raw), len(sd), preset, dst)


def _dataset_metadata(preset: str) -> dict | None:
    from ..data.coco_categories import coco_metadata

    if preset.startswith("coco-instance"):
        return coco_metadata(panoptic=False).to_dict()
    if preset.startswith("coco-panoptic"):
        return coco_metadata(panoptic=True).to_dict()
    return None
