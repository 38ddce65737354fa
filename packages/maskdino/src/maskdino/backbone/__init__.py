"""Backbones: torchvision ResNets (``resnet18/34/50/101``) and Swin (``swin_t/s/b/l``).

Every backbone maps ``(B, 3, H, W)`` to ``{"res2": ..., "res5": ...}`` and describes its outputs with
``output_shape() -> {name: ShapeSpec(channels, stride)}``.
"""

from __future__ import annotations

from torch import nn

from ..config import BackboneConfig
from .resnet import ResNetBackbone, ShapeSpec, padding_mask, valid_sizes

__all__ = ["ResNetBackbone", "ShapeSpec", "build_backbone", "padding_mask", "valid_sizes"]


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Backbone named by ``cfg.name`` (weights from the local ``cfg.weights`` file, if given)."""
    name = cfg.name.lower()
    if name.startswith("resnet"):
        depth = int(name.removeprefix("resnet"))
        return ResNetBackbone(
            depth=depth,
            out_features=cfg.out_features,
            freeze_at=cfg.freeze_at,
            norm=cfg.norm,
            weights=cfg.weights,
        )
    if name.startswith("swin"):
        from . import swin  # written alongside; imported lazily so that ResNet users never need it

        return swin.build_swin_backbone(cfg)
    raise ValueError(f"unknown backbone {cfg.name!r}")
