"""The official DINO checkpoint layout (IDEA-Research/DINO ``main.py``: ``{"model": state_dict, "args": Namespace,
...}``) <-> this example's module names, with detr-core's key-map machinery.

=====================================================  ==========================================
official                                               ours
=====================================================  ==========================================
``backbone.0.body.<torchvision ResNet names>``         ``backbone.<the same>``
``bbox_embed.{i}.*``, ``transformer.decoder.bbox_embed.{i}.*``     ``bbox_embed.*`` (12 tied copies)
``class_embed.{i}.*``, ``transformer.decoder.class_embed.{i}.*``   ``class_embed.*`` (12 tied copies)
``transformer.enc_out_{class,bbox}_embed.*``           ``enc_{class,bbox}_embed.*``
``transformer.enc_output{,_norm}.*``                   ``query_selection.enc_output{,_norm}.*``
``transformer.<rest>`` (encoder, decoder, level_embed, tgt_embed)   ``<rest>``
``input_proj.*``, ``label_enc.*``                      unchanged
=====================================================  ==========================================

Our model registers its shared box head twice (``bbox_embed`` and ``decoder.bbox_embed``): :data:`ALIASES`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_core.checkpoint import KeyMap, load_foreign_checkpoint

__all__ = [
    "ALIASES",
    "LAYOUTS",
    "OFFICIAL_KEY_MAP",
    "layout_state_dict",
    "load_official_checkpoint",
    "read_layout",
    "to_official",
]

OFFICIAL_KEY_MAP = KeyMap(
    [
        (r"^backbone\.0\.body\.", "backbone."),
        (r"^(transformer\.decoder\.)?(bbox|class)_embed\.\d+\.", r"\2_embed."),
        (r"^transformer\.enc_out_(bbox|class)_embed\.", r"enc_\1_embed."),
        (r"^transformer\.(enc_output)", r"query_selection.\1"),
        (r"^transformer\.", ""),
    ],
    name="DINO (IDEA-Research/DINO)",
    # a Deformable DETR file has the first two but neither the learned queries nor the denoising label embedding
    signature=[
        r"^transformer\.decoder\.layers\.",
        r"^backbone\.0\.body\.",
        r"^transformer\.tgt_embed\.",
        r"^label_enc\.",
    ],
)

ALIASES = {"decoder.bbox_embed.": "bbox_embed."}

#: The recorded official layouts (names and shapes of ``model.state_dict()`` in order, no values).
LAYOUTS = {
    name: Path(__file__).with_name("layouts") / f"{name}.txt" for name in ("dino-4scale-r50", "dino-tiny")
}


def load_official_checkpoint(
    path: str | os.PathLike, model: nn.Module, ema: bool = False, strict: bool = True
) -> dict[str, Tensor]:
    """Load an official DINO checkpoint (``model``, or ``ema_model`` with ``ema``; ``module.`` stripped) into
    ``model``: every key mapped, tied copies checked equal, names and shapes checked strictly.

    Raises:
        detr_core.checkpoint.ForeignLayoutError: not a DINO file; KeyMapError: untied copies;
        CheckpointMismatchError: missing, unexpected or shape-mismatched keys (all listed); CheckpointError:
        unreadable or unsafe file.
    """
    return load_foreign_checkpoint(
        path, OFFICIAL_KEY_MAP, model, ALIASES, key="ema_model" if ema else None, strict=strict
    )


def to_official(sd: Mapping[str, Tensor], official_keys: Iterable[str]) -> dict[str, Tensor]:
    """Our state dict in the official names (every copy of a shared head filled), for ``official_keys``."""
    return OFFICIAL_KEY_MAP.to_source(sd, official_keys)


def read_layout(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a recorded layout file (lines ``name (d0,d1,...) dtype``, ``#`` comments)."""
    out: dict[str, tuple[int, ...]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape, _dtype = line.split()
            out[name] = tuple(int(d) for d in shape.strip("()").split(",") if d)
    return out


def layout_state_dict(layout: Mapping[str, tuple[int, ...]], device: str = "meta") -> dict[str, Tensor]:
    """Tensors of the layout's shapes (``meta``: no memory; key and shape checks only)."""
    return {k: torch.empty(shape, device=device) for k, shape in layout.items()}
