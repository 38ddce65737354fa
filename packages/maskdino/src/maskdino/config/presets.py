"""Model presets: the official Mask DINO configurations (one per released yaml file) and the tiny CPU model.

``get_preset(name)`` returns a fresh, validated :class:`~maskdino.config.model.MaskDINOConfig`; the comment above each
builder names the official yaml file it reproduces.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from .model import (
    _RES,
    BackboneConfig,
    ConfigError,
    DecoderConfig,
    InferenceConfig,
    LossConfig,
    MaskDINOConfig,
    PixelDecoderConfig,
)

__all__ = ["PRESETS", "get_preset"]


def _coco_instance_r50_3s_d1_2048() -> MaskDINOConfig:
    # configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml (46.3 AP)
    return MaskDINOConfig()


def _coco_instance_r50_4s() -> MaskDINOConfig:
    # maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml: res2-res5 in the encoder, no extra level, no box init
    cfg = MaskDINOConfig()
    cfg.pixel_decoder.transformer_in_features = list(_RES)
    cfg.decoder.initialize_box_type = "no"
    return cfg


def _coco_instance_r50_3s_hid1024() -> MaskDINOConfig:
    # maskdino_R50_bs16_50ep_3s.yaml (46.1 AP): encoder FFN 1024, 3 levels, default high2low order, bitmask
    cfg = MaskDINOConfig()
    cfg.pixel_decoder.dim_feedforward = 1024
    cfg.pixel_decoder.total_num_feature_levels = 3
    cfg.pixel_decoder.feature_order = "high2low"
    cfg.decoder.initialize_box_type = "bitmask"
    return cfg


def _coco_panoptic_r50() -> MaskDINOConfig:
    # configs/coco/panoptic-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml (53.0 PQ)
    cfg = MaskDINOConfig(num_classes=133)
    cfg.decoder.initialize_box_type = "no"
    cfg.inference = InferenceConfig(
        instance_on=True, panoptic_on=True, semantic_on=True, thing_classes=list(range(80))
    )
    return cfg


def _ade20k_semantic_r50() -> MaskDINOConfig:
    # configs/ade20k/semantic-segmentation/maskdino_R50_bs16_160k_steplr.yaml (48.7 mIoU)
    cfg = MaskDINOConfig(num_classes=150)
    cfg.pixel_decoder.dim_feedforward = 1024
    cfg.pixel_decoder.total_num_feature_levels = 3
    cfg.pixel_decoder.feature_order = "high2low"
    cfg.decoder.num_queries = 100
    cfg.decoder.two_stage = False
    cfg.decoder.initialize_box_type = "no"
    cfg.decoder.semantic_ce_loss = True
    cfg.inference = InferenceConfig(
        instance_on=False, panoptic_on=False, semantic_on=True, object_mask_threshold=0.8
    )
    return cfg


def _swin_l(cfg: MaskDINOConfig) -> MaskDINOConfig:
    # swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml: Swin-L 384 window 12, res2-res5 + one extra level
    cfg.backbone = BackboneConfig(name="swin_l", drop_path_rate=0.3)
    cfg.pixel_decoder.transformer_in_features = list(_RES)
    cfg.pixel_decoder.num_feature_levels = 4
    cfg.pixel_decoder.total_num_feature_levels = 5
    return cfg


def _coco_instance_swinl() -> MaskDINOConfig:
    cfg = _swin_l(MaskDINOConfig())
    cfg.decoder.initialize_box_type = "bitmask"
    return cfg


def _coco_panoptic_swinl() -> MaskDINOConfig:
    return _swin_l(_coco_panoptic_r50())


def _tiny() -> MaskDINOConfig:
    """A few-hundred-thousand-parameter model for tests and the CPU demo (ResNet-18, hidden 64)."""
    cfg = MaskDINOConfig()
    cfg.backbone = BackboneConfig(name="resnet18")
    cfg.pixel_decoder = PixelDecoderConfig(
        conv_dim=64,
        mask_dim=64,
        num_encoder_layers=2,
        dim_feedforward=128,
        nheads=2,
        n_points=2,
        total_num_feature_levels=3,
    )
    cfg.decoder = DecoderConfig(
        hidden_dim=64,
        num_queries=50,
        nheads=2,
        dec_layers=3,
        dim_feedforward=128,
        dec_n_points=2,
        dn_num=20,
    )
    cfg.loss = LossConfig(train_num_points=1024)
    return cfg


PRESETS: dict[str, Callable[[], MaskDINOConfig]] = {
    "tiny": _tiny,
    "coco-instance-r50-3s-d1-2048": _coco_instance_r50_3s_d1_2048,
    "coco-instance-r50-4s": _coco_instance_r50_4s,
    "coco-instance-r50-3s-hid1024": _coco_instance_r50_3s_hid1024,
    "coco-panoptic-r50": _coco_panoptic_r50,
    "ade20k-semantic-r50": _ade20k_semantic_r50,
    "coco-instance-swinl": _coco_instance_swinl,
    "coco-panoptic-swinl": _coco_panoptic_swinl,
}


def get_preset(name: str) -> MaskDINOConfig:
    """A fresh copy of a named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name]())
    cfg.validate()
    return cfg
