"""The official Mask DINO checkpoints (IDEA-Research/MaskDINO, detectron2 files): key map, conversion, loading.

The key map is a :class:`detr_core.checkpoint.KeyMap` (ordered rules, applied top to bottom):

=============================================  ==============================================
official (detectron2 ``MaskDINO`` model)        ours
=============================================  ==============================================
``criterion.empty_weight``                      dropped (a constant of the CE loss)
``sem_seg_head.<rest>``                         ``<rest>`` (``pixel_decoder.*``, ``predictor.*``)
``backbone.stem.conv1.weight``                  ``backbone.conv1.weight``
``backbone.stem.conv1.norm.*``                  ``backbone.bn1.*``
``backbone.res{s}.{b}.conv{k}.weight``          ``backbone.layer{s-1}.{b}.conv{k}.weight``
``backbone.res{s}.{b}.conv{k}.norm.*``          ``backbone.layer{s-1}.{b}.bn{k}.*``
``backbone.res{s}.{b}.shortcut.weight``         ``backbone.layer{s-1}.{b}.downsample.0.weight``
``backbone.res{s}.{b}.shortcut.norm.*``         ``backbone.layer{s-1}.{b}.downsample.1.*``
``backbone.*`` (Swin)                           unchanged (same layout)
``predictor._bbox_embed.*``                     ``predictor.bbox_embed.*``
``predictor.bbox_embed.{i}.*``                  tied to ``_bbox_embed`` (checked equal)
``predictor.decoder.bbox_embed.{i}.*``          tied to ``_bbox_embed`` (checked equal)
``predictor.decoder.norm.*``                    tied to ``predictor.decoder_norm.*`` (checked equal)
=============================================  ==============================================

In the official model one box MLP (``_bbox_embed``) is shared by all decoder layers and the encoder head, and the
decoder's final LayerNorm is the head's ``decoder_norm``; its state dict repeats them under 9 + 9 + 1 and 2 names
(110 alias keys). Our model shares the same objects but registers them once per owning module
(``predictor.bbox_embed`` = ``predictor.decoder.bbox_embed``, ``predictor.decoder_norm`` = ``predictor.decoder.norm``):
:data:`ALIASES`.

A converted checkpoint records how the released model must be run (:func:`official_experiment`): padding treated as
image content (``padding_mode="official"``) and the official test-time resize; so that ``maskdino predict/eval`` on
the converted file reproduce the official outputs with no flag.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import Tensor, nn

from detr_core.checkpoint import (
    CheckpointMismatchError,
    KeyMap,
    KeyMapError,
    LoadReport,
    load_into_model,
    load_state_dict_file,
    match_aliases,
)

__all__ = [
    "ALIASES",
    "OFFICIAL_KEY_MAP",
    "CheckpointMismatchError",
    "KeyMapError",
    "LoadReport",
    "convert_official_state_dict",
    "is_official_layout",
    "load_official_checkpoint",
    "official_experiment",
]


def _resnet_block(kind: str):
    def repl(m: re.Match[str]) -> str:
        stage, block = int(m.group(1)), m.group(2)
        layer = f"backbone.layer{stage - 1}.{block}."
        if kind == "shortcut":
            return layer + "downsample.0."
        if kind == "shortcut.norm":
            return layer + "downsample.1."
        conv = m.group(3)
        return layer + (f"bn{conv}." if kind == "conv.norm" else f"conv{conv}.")

    return repl


#: detectron2 Mask DINO names -> ours (see the module docstring).
OFFICIAL_KEY_MAP = KeyMap(
    [
        (r"^criterion\.", None),  # empty_weight: a loss constant rebuilt from the config
        (r"^sem_seg_head\.", ""),
        (r"^backbone\.stem\.conv1\.norm\.", "backbone.bn1."),
        (r"^backbone\.stem\.conv1\.", "backbone.conv1."),
        (r"^backbone\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.", _resnet_block("conv.norm")),
        (r"^backbone\.res([2-5])\.(\d+)\.conv([1-3])\.", _resnet_block("conv")),
        (r"^backbone\.res([2-5])\.(\d+)\.shortcut\.norm\.", _resnet_block("shortcut.norm")),
        (r"^backbone\.res([2-5])\.(\d+)\.shortcut\.", _resnet_block("shortcut")),
        (r"^predictor\._bbox_embed\.", "predictor.bbox_embed."),
        (r"^predictor\.(decoder\.)?bbox_embed\.\d+\.", "predictor.bbox_embed."),
        (r"^predictor\.decoder\.norm\.", "predictor.decoder_norm."),
    ]
)

#: alias key prefixes of shared modules in our model -> canonical prefix.
ALIASES: dict[str, str] = {
    "predictor.decoder.bbox_embed.": "predictor.bbox_embed.",
    "predictor.decoder.norm.": "predictor.decoder_norm.",
}


def is_official_layout(sd: Mapping[str, Tensor]) -> bool:
    """True for a state dict in the official (detectron2) layout: its head lives under ``sem_seg_head.``."""
    return any(k.startswith("sem_seg_head.") for k in sd)


def convert_official_state_dict(sd: Mapping[str, Tensor], backbone: str | None = None) -> dict[str, Tensor]:
    """Official (detectron2) Mask DINO state dict -> ours (see the module docstring for the table).

    Args:
        sd: the official ``model`` state dict (``backbone.*``, ``sem_seg_head.*``, ``criterion.*``).
        backbone: ``"resnet"``, ``"swin"`` or None (the ResNet rules only match detectron2 ResNet keys, so both
            layouts convert with the same map; the argument is checked for compatibility).

    Returns:
        A new dict with every key of our model's state dict (alias names of shared modules included); tensors are
        shared with ``sd`` (not copied). Keys the table does not cover pass through unchanged, so that loading
        reports them.

    Raises:
        KeyMapError: aliases of a shared module whose values differ. ValueError: an unknown ``backbone``.
    """
    if backbone not in (None, "resnet", "swin"):
        raise ValueError(f"backbone must be 'resnet' or 'swin', got {backbone!r}")
    out = OFFICIAL_KEY_MAP.convert(sd)
    for key in list(out):
        for alias, canonical in ALIASES.items():
            if key.startswith(canonical):
                out.setdefault(alias + key.removeprefix(canonical), out[key])
    return out


def load_official_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    strict: bool = True,
    backbone: str | None = None,
) -> dict[str, Tensor]:
    """Read an official Mask DINO checkpoint (``.pth``/``.pkl``) and convert it to our names.

    Args:
        path: the released detectron2 checkpoint (``{"model": state_dict, ...}``).
        model: if given, the converted weights are loaded into it (alias names matched to its state dict). Build it
            with :func:`official_experiment`'s model config (``padding_mode="official"``) to get the official
            outputs.
        strict: with a model: raise :class:`CheckpointMismatchError` listing every missing, unexpected and
            shape-mismatched key instead of loading partially.
        backbone: ``resnet`` / ``swin`` / None (detect).

    Returns:
        The converted state dict (for ``model``'s names when a model is given).
    """
    sd = convert_official_state_dict(load_state_dict_file(path), backbone=backbone)
    if model is not None:
        sd = match_aliases(sd, model.state_dict().keys(), ALIASES)
        load_into_model(model, sd, strict=strict)
    return sd


def official_experiment(preset: str):
    """The experiment config a converted official checkpoint of ``preset`` runs with: the preset's model in
    ``padding_mode="official"`` (padding is image content, as in the released code) and the official test-time
    resize (PIL bilinear on uint8 images, shortest edge / max size of the preset's recipe).

    Returns:
        :class:`maskdino.config.ExperimentConfig`.
    """
    from ..config import get_experiment, get_preset

    cfg = get_experiment(preset)
    cfg.model = get_preset(preset)  # the preset's own model (the "tiny" demo experiment changes its classes)
    cfg.model.padding_mode = "official"
    cfg.data.test_resize = "pil"
    cfg.validate()
    return cfg
