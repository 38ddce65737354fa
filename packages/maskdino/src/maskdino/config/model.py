"""Typed configuration of Mask DINO and the presets that match the official yaml files.

Every field has the official default of the released COCO instance R50 ``3s_dowsample1_2048`` model
unless its comment says otherwise. The official config key each field comes from is given in the
field comments (``SEM_SEG_HEAD.*`` / ``MaskDINO.*``) so that a user of the official repository can
translate a yaml file by hand.

Serialisation: :meth:`MaskDINOConfig.to_dict` / :meth:`MaskDINOConfig.from_dict` (strict: an unknown
key raises :class:`ConfigError` naming the full dotted key), :func:`load_config` / :func:`save_config`
for YAML (``.yaml``/``.yml``) and JSON (``.json``). Choice fields are ``Literal`` types and numeric fields declare
their range in the field metadata: both are checked once, when a config is built from a dict
(:func:`maskdino.config.io.dataclass_from_dict`) or validated (:meth:`MaskDINOConfig.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .io import ConfigError, DictConfig, check_ranges, read_config_file, write_config_file

__all__ = [
    "BackboneConfig",
    "ConfigError",
    "DecoderConfig",
    "InferenceConfig",
    "LossConfig",
    "MaskDINOConfig",
    "PaddingMode",
    "PixelDecoderConfig",
    "load_config",
    "save_config",
]

PaddingMode = Literal["aware", "official"]
BoxInitType = Literal["no", "bitmask", "mask2box"]

# field metadata: value ranges checked by maskdino.config.io
NONNEG = {"min": 0}
POS = {"gt": 0}
PROB = {"min": 0, "max": 1}


_N = TypeVar("_N", int, float)


def _pos(default: _N) -> _N:
    """A field that must be > 0."""
    out: Any = field(default=default, metadata=POS)
    return out


def _nonneg(default: _N) -> _N:
    """A field that must be >= 0."""
    out: Any = field(default=default, metadata=NONNEG)
    return out


FeatureName = Literal["res2", "res3", "res4", "res5"]

_RES: list[FeatureName] = ["res2", "res3", "res4", "res5"]


@dataclass
class BackboneConfig:
    """Backbone. ``name``: ``resnet18 | resnet34 | resnet50 | resnet101 | swin_t | swin_s | swin_b | swin_l``."""

    name: Literal["resnet18", "resnet34", "resnet50", "resnet101", "swin_t", "swin_s", "swin_b", "swin_l"] = (
        "resnet50"
    )
    #: local file with ImageNet weights (torchvision ``.pth`` for ResNets); None = random init. Never downloaded.
    weights: str | None = None
    #: features returned to the pixel decoder (MODEL.RESNETS.OUT_FEATURES).
    out_features: list[FeatureName] = field(default_factory=lambda: list(_RES))
    #: detectron2 FREEZE_AT: 0 = train everything, 1 = freeze the stem, k = stem + res2..res{k}.
    freeze_at: int = field(default=0, metadata={"min": 0, "max": 5})
    #: Swin only: stochastic depth rate (MODEL.SWIN.DROP_PATH_RATE).
    drop_path_rate: float = field(default=0.3, metadata=PROB)
    #: ResNet only: ``FrozenBN`` (official; exact under padding) or ``BN`` (trainable BatchNorm for training
    #: from scratch; batch statistics include the padding, so padding invariance is lost in training mode).
    norm: Literal["FrozenBN", "BN"] = "FrozenBN"


@dataclass
class PixelDecoderConfig:
    """The multi-scale deformable encoder + 1/4 mask features (official ``MaskDINOEncoder``)."""

    conv_dim: int = _pos(256)  # SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = _pos(256)  # SEM_SEG_HEAD.MASK_DIM
    num_encoder_layers: int = _nonneg(6)  # SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    dim_feedforward: int = _pos(2048)  # SEM_SEG_HEAD.DIM_FEEDFORWARD
    nheads: int = _pos(
        8
    )  # MaskDINO.NHEADS (the official encoder reads it; its decoder layers always use 8 heads)
    n_points: int = _pos(4)  # the official encoder hard-codes 4 (it ignores ..._ENCODER_N_POINTS)
    dropout: float = field(default=0.0, metadata=PROB)  # MaskDINO.DROPOUT
    #: SEM_SEG_HEAD.NUM_FEATURE_LEVELS (kept for parity; unused by the official code)
    num_feature_levels: int = _pos(3)
    in_features: list[FeatureName] = field(default_factory=lambda: list(_RES))  # SEM_SEG_HEAD.IN_FEATURES
    #: SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES
    transformer_in_features: list[FeatureName] = field(default_factory=lambda: ["res3", "res4", "res5"])
    #: encoder levels incl. the extra stride-2 levels made from the lowest-resolution input.
    total_num_feature_levels: int = _pos(4)
    common_stride: int = _pos(4)
    #: ``low2high`` ([1/8, 1/16, 1/32, 1/64]) or ``high2low`` (reversed) token order in the encoder.
    feature_order: Literal["low2high", "high2low"] = "low2high"
    norm: Literal["GN"] = "GN"


@dataclass
class DecoderConfig:
    """The Mask DINO transformer decoder (official ``MaskDINODecoder``)."""

    hidden_dim: int = _pos(256)
    num_queries: int = _pos(300)
    nheads: int = _pos(8)
    dec_layers: int = _pos(9)
    dim_feedforward: int = _pos(2048)
    dec_n_points: int = _pos(4)
    dropout: float = field(default=0.0, metadata=PROB)
    two_stage: bool = True
    #: mask-enhanced anchor box init: ``no | bitmask | mask2box``.
    initialize_box_type: BoxInitType = "mask2box"
    initial_pred: bool = True
    learn_tgt: bool = False
    #: denoising: ``no | seg`` (``seg`` = labels, boxes and masks of DN queries are supervised).
    dn: Literal["no", "seg"] = "seg"
    dn_num: int = _nonneg(100)
    noise_scale: float = _nonneg(0.4)
    #: softmax CE classification over C+1 classes (ADE20K semantic); otherwise sigmoid focal.
    semantic_ce_loss: bool = False
    #: add a 1x1 conv between pixel decoder and decoder even if the channels match (ENFORCE_INPUT_PROJ).
    enforce_input_proj: bool = False


@dataclass
class LossConfig:
    """Loss and matching weights (MaskDINO.*_WEIGHT, COST_*_WEIGHT) and point sampling."""

    class_weight: float = _nonneg(4.0)
    mask_weight: float = _nonneg(5.0)
    dice_weight: float = _nonneg(5.0)
    box_weight: float = _nonneg(5.0)
    giou_weight: float = _nonneg(2.0)
    cost_class_weight: float = _nonneg(4.0)
    cost_mask_weight: float = _nonneg(5.0)
    cost_dice_weight: float = _nonneg(5.0)
    cost_box_weight: float = _nonneg(5.0)
    cost_giou_weight: float = _nonneg(2.0)
    no_object_weight: float = _nonneg(0.1)
    train_num_points: int = _pos(12544)
    oversample_ratio: float = field(default=3.0, metadata={"min": 1})
    importance_sample_ratio: float = field(default=0.75, metadata=PROB)
    focal_alpha: float = field(default=0.25, metadata=PROB)
    focal_gamma: float = _nonneg(2.0)
    deep_supervision: bool = True
    box_loss: bool = True
    #: box losses only on thing classes (official PANO_BOX_LOSS; False in every released config).
    pano_box_loss: bool = False


@dataclass
class InferenceConfig:
    """Which tasks ``predict`` runs by default and their thresholds (MaskDINO.TEST.*)."""

    instance_on: bool = True
    panoptic_on: bool = False
    semantic_on: bool = False
    test_topk_per_image: int = _pos(100)
    object_mask_threshold: float = field(default=0.25, metadata=PROB)
    overlap_threshold: float = field(default=0.8, metadata=PROB)
    temperature: float = _pos(0.06)
    #: contiguous class ids that are "things" (panoptic merge; instance output of panoptic models).
    thing_classes: list[int] = field(default_factory=list, metadata=NONNEG)
    #: ``fp32``, or ``bf16``: the network under bfloat16 autocast, every decision in float32 (``--precision``).
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class MaskDINOConfig(DictConfig):
    """Whole-model configuration; ``to_dict`` / strict ``from_dict`` come from :class:`DictConfig`."""

    num_classes: int = _pos(80)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375], metadata=POS)
    size_divisibility: int = _nonneg(32)
    #: ``aware`` (default for models trained here): padding masks flow through backbone, pixel decoder and
    #: decoder so that an image padded inside a batch gets the same prediction as alone. ``official``: as the
    #: released code, padding is treated as image content; converted official checkpoints record it, since their
    #: published accuracy was obtained that way.
    padding_mode: PaddingMode = "aware"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on invalid or inconsistent values (choices, ranges, combinations)."""
        check_ranges(self)
        if self.decoder.initialize_box_type != "no" and not (
            self.decoder.two_stage and self.decoder.initial_pred
        ):
            raise ConfigError("decoder.initialize_box_type needs decoder.two_stage and decoder.initial_pred")
        pd = self.pixel_decoder
        if pd.total_num_feature_levels < len(pd.transformer_in_features):
            raise ConfigError(
                "pixel_decoder.total_num_feature_levels < len(pixel_decoder.transformer_in_features)"
            )
        if not set(pd.transformer_in_features) <= set(pd.in_features):
            raise ConfigError(
                "pixel_decoder.transformer_in_features must be a subset of pixel_decoder.in_features"
            )
        if not set(pd.in_features) <= set(self.backbone.out_features):
            raise ConfigError("pixel_decoder.in_features must be a subset of backbone.out_features")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ConfigError("pixel_mean and pixel_std need 3 values")
        if pd.conv_dim % 2 or self.decoder.hidden_dim % 2:
            raise ConfigError("pixel_decoder.conv_dim and decoder.hidden_dim must be even (sine embeddings)")
        for key, width, heads in (
            ("pixel_decoder", pd.conv_dim, pd.nheads),
            ("decoder", self.decoder.hidden_dim, self.decoder.nheads),
        ):
            if width % heads:
                raise ConfigError(f"{key}: the width ({width}) must be divisible by nheads ({heads})")
        bad = [c for c in self.inference.thing_classes if c >= self.num_classes]
        if bad:
            raise ConfigError(f"inference.thing_classes {bad} are not < num_classes ({self.num_classes})")


def load_config(path: str | Path) -> MaskDINOConfig:
    """Read a config from ``.yaml``/``.yml`` or ``.json`` (strict, see :meth:`MaskDINOConfig.from_dict`)."""
    return MaskDINOConfig.from_dict(read_config_file(path))


def save_config(cfg: MaskDINOConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML or JSON (by suffix)."""
    write_config_file(cfg.to_dict(), path)
