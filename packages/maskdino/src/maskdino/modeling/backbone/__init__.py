"""Backbones of Mask DINO: torchvision ResNets (``resnet18/34/50/101``, from detr-core) and Swin (``swin_t/s/b/l``).

Every backbone implements :class:`detr_core.backbone.Backbone`: a :class:`~detr_core.padding.PaddedBatch` in,
``{"res2": ..., "res5": ...}`` out, described by ``output_shape() -> {name: ShapeSpec(channels, stride)}``. To add a
backbone, implement that protocol and return it from :func:`build_backbone`.
"""

from __future__ import annotations

from torch import nn

from detr_core.backbone import Backbone, ResNetBackbone, ShapeSpec

from ...config.model import BackboneConfig

__all__ = ["Backbone", "ResNetBackbone", "ShapeSpec", "build_backbone"]


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Backbone named by ``cfg.name`` (weights from the local ``cfg.weights`` file, if given)."""
    name = cfg.name.lower()
    if name.startswith("resnet"):
        return ResNetBackbone(
            depth=int(name.removeprefix("resnet")),
            out_features=cfg.out_features,
            freeze_at=cfg.freeze_at,
            norm=cfg.norm,
            weights=cfg.weights,
        )
    if name.startswith("swin"):
        from .swin import build_swin_backbone  # imported lazily so that ResNet users never load it

        return build_swin_backbone(cfg)
    raise ValueError(f"unknown backbone {cfg.name!r}")
