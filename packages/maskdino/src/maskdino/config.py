"""Typed configuration of Mask DINO and the presets that match the official yaml files.

Every field has the official default of the released COCO instance R50 ``3s_dowsample1_2048`` model
unless its comment says otherwise. The official config key each field comes from is given in the
field comments (``SEM_SEG_HEAD.*`` / ``MaskDINO.*``) so that a user of the official repository can
translate a yaml file by hand.

Serialisation: :meth:`MaskDINOConfig.to_dict` / :meth:`MaskDINOConfig.from_dict` (strict: an unknown
key raises :class:`ConfigError` naming the full dotted key), :func:`load_config` / :func:`save_config`
for YAML (``.yaml``/``.yml``) and JSON (``.json``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

# ConfigError lives with the shared (de)serialisation helpers; re-exported here as part of the public API.
from maskdino._dataclass_io import ConfigError, DictConfig, read_config_file, write_config_file

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "ConfigError",
    "DecoderConfig",
    "InferenceConfig",
    "LossConfig",
    "MaskDINOConfig",
    "PixelDecoderConfig",
    "get_preset",
    "load_config",
    "save_config",
]

_RES = ["res2", "res3", "res4", "res5"]


@dataclass
class BackboneConfig:
    """Backbone. ``name``: ``resnet18 | resnet34 | resnet50 | resnet101 | swin_t | swin_s | swin_b | swin_l``."""

    name: str = "resnet50"
    #: local file with ImageNet weights (torchvision ``.pth`` for ResNets); None = random init. Never downloaded.
    weights: str | None = None
    #: features returned to the pixel decoder (MODEL.RESNETS.OUT_FEATURES).
    out_features: list[str] = field(default_factory=lambda: list(_RES))
    #: detectron2 FREEZE_AT: 0 = train everything, 1 = freeze the stem, k = stem + res2..res{k}.
    freeze_at: int = 0
    #: Swin only: stochastic depth rate (MODEL.SWIN.DROP_PATH_RATE).
    drop_path_rate: float = 0.3
    #: ResNet only: ``FrozenBN`` (official; exact under padding) or ``BN`` (trainable BatchNorm for training
    #: from scratch; batch statistics include the padding, so padding invariance is lost in training mode).
    norm: str = "FrozenBN"


@dataclass
class PixelDecoderConfig:
    """The multi-scale deformable encoder + 1/4 mask features (official ``MaskDINOEncoder``)."""

    conv_dim: int = 256  # SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # SEM_SEG_HEAD.MASK_DIM
    num_encoder_layers: int = 6  # SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    dim_feedforward: int = 2048  # SEM_SEG_HEAD.DIM_FEEDFORWARD
    nheads: int = 8  # MaskDINO.NHEADS (shared with the decoder in the official code)
    n_points: int = 4  # SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS
    dropout: float = 0.0  # MaskDINO.DROPOUT
    num_feature_levels: int = (
        3  # SEM_SEG_HEAD.NUM_FEATURE_LEVELS (kept for parity; unused by the official code)
    )
    in_features: list[str] = field(default_factory=lambda: list(_RES))  # SEM_SEG_HEAD.IN_FEATURES
    #: SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES
    transformer_in_features: list[str] = field(default_factory=lambda: ["res3", "res4", "res5"])
    #: encoder levels incl. the extra stride-2 levels made from the lowest-resolution input.
    total_num_feature_levels: int = 4
    common_stride: int = 4
    #: ``low2high`` ([1/8, 1/16, 1/32, 1/64]) or ``high2low`` (reversed) token order in the encoder.
    feature_order: str = "low2high"
    norm: str = "GN"


@dataclass
class DecoderConfig:
    """The Mask DINO transformer decoder (official ``MaskDINODecoder``)."""

    hidden_dim: int = 256
    num_queries: int = 300
    nheads: int = 8
    dec_layers: int = 9
    dim_feedforward: int = 2048
    dec_n_points: int = 4
    dropout: float = 0.0
    two_stage: bool = True
    #: mask-enhanced anchor box init: ``no | bitmask | mask2box``.
    initialize_box_type: str = "mask2box"
    initial_pred: bool = True
    learn_tgt: bool = False
    #: denoising: ``no | seg`` (``seg`` = labels, boxes and masks of DN queries are supervised).
    dn: str = "seg"
    dn_num: int = 100
    noise_scale: float = 0.4
    #: softmax CE classification over C+1 classes (ADE20K semantic); otherwise sigmoid focal.
    semantic_ce_loss: bool = False
    #: add a 1x1 conv between pixel decoder and decoder even if the channels match (ENFORCE_INPUT_PROJ).
    enforce_input_proj: bool = False


@dataclass
class LossConfig:
    """Loss and matching weights (MaskDINO.*_WEIGHT, COST_*_WEIGHT) and point sampling."""

    class_weight: float = 4.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    cost_class_weight: float = 4.0
    cost_mask_weight: float = 5.0
    cost_dice_weight: float = 5.0
    cost_box_weight: float = 5.0
    cost_giou_weight: float = 2.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
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
    test_topk_per_image: int = 100
    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    temperature: float = 0.06
    #: contiguous class ids that are "things" (panoptic merge; instance output of panoptic models).
    thing_classes: list[int] = field(default_factory=list)


@dataclass
class MaskDINOConfig(DictConfig):
    """Whole-model configuration; ``to_dict`` / strict ``from_dict`` come from :class:`DictConfig`."""

    num_classes: int = 80
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    #: ``aware`` (default): padding masks flow through backbone, pixel decoder and decoder so that an image
    #: padded inside a batch gets the same prediction as alone. ``official``: as the released code, padding is
    #: treated as image content (needed to reproduce official outputs bit for bit on non-multiple-of-32 inputs).
    padding_mode: str = "aware"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent values."""
        choices = {
            "padding_mode": (self.padding_mode, {"aware", "official"}),
            "decoder.initialize_box_type": (self.decoder.initialize_box_type, {"no", "bitmask", "mask2box"}),
            "decoder.dn": (self.decoder.dn, {"no", "seg"}),
            "pixel_decoder.feature_order": (self.pixel_decoder.feature_order, {"low2high", "high2low"}),
            "pixel_decoder.norm": (self.pixel_decoder.norm, {"GN"}),
            "backbone.norm": (self.backbone.norm, {"FrozenBN", "BN"}),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key} = {value!r}; expected one of {sorted(allowed)}")
        if self.decoder.initialize_box_type != "no" and not (
            self.decoder.two_stage and self.decoder.initial_pred
        ):
            raise ConfigError("decoder.initialize_box_type needs decoder.two_stage and decoder.initial_pred")
        pd = self.pixel_decoder
        if pd.total_num_feature_levels < len(pd.transformer_in_features):
            raise ConfigError(
                "pixel_decoder.total_num_feature_levels < len(pixel_decoder.transformer_in_features)"
            )
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ConfigError("pixel_mean and pixel_std need 3 values")
        if self.num_classes < 1:
            raise ConfigError("num_classes must be >= 1")


def load_config(path: str | Path) -> MaskDINOConfig:
    """Read a config from ``.yaml``/``.yml`` or ``.json`` (strict, see :meth:`MaskDINOConfig.from_dict`)."""
    return MaskDINOConfig.from_dict(read_config_file(path))


def save_config(cfg: MaskDINOConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML or JSON (by suffix)."""
    write_config_file(cfg.to_dict(), path)


# ---------------------------------------------------------------------------------------------- presets
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


PRESETS = {
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
