"""Mask DINO's pixel decoder: a multi-scale deformable encoder plus 1/4-resolution mask features.

Official ``MaskDINOEncoder`` (``maskdino/modeling/pixel_decoder/maskdino_encoder.py``), rewritten:

* encoder inputs ``transformer_in_features`` (e.g. res3-res5) each go through ``input_proj[i]`` = Conv1x1
  (+bias) + GroupNorm(32); ``total - len(inputs)`` extra levels are made by Conv3x3 stride 2 + GN, the first
  one on the RAW lowest-resolution backbone map;
* ``feature_order="low2high"``: encoder levels ``[1/8, 1/16, 1/32, 1/64]`` (``input_proj[0]`` = res3);
  ``"high2low"``: ``[1/64, 1/32, 1/16, 1/8]`` (``input_proj[0]`` = res5, extra levels last in ``input_proj``);
* each level's tokens get a sine position embedding (of that level's map) + ``level_embed[lvl]``;
* under autocast the encoder runs in the autocast dtype, the deformable attention with a 16-bit value and float32
  sampling locations (the op's own autocast rule); the official code runs the encoder in float32;
* mask features: ``adapter_1(res2)`` (Conv1x1 no bias + GN) + bilinear upsample of the encoder's 1/8 map,
  ``layer_1`` (Conv3x3 no bias + GN + ReLU), ``mask_features`` (Conv1x1 + bias).

Padding (deviation from the official code, switchable): the official head passes no padding mask, so the
padding of a batch is image content. For a masked :class:`~detr_core.padding.PaddedBatch`, masked tokens and valid
ratios go to the encoder, the sine embedding is normalised by each image's valid extent, GroupNorm statistics are taken over
valid positions only, convolutions see zeros outside the valid region and the 1/8 map is edge-replicated
before upsampling; an image then gets the same features inside its valid region whatever the padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_core.backbone import ShapeSpec
from detr_core.encoder import DeformableEncoder, flatten_levels
from detr_core.layers import xavier_init_deformable_
from detr_core.neck import InputProjection, masked_group_norm
from detr_core.padding import PaddedBatch
from detr_core.position_encoding import PositionEmbeddingSine

from ..config.model import PixelDecoderConfig
from ..cpu_inference.winograd import conv2d_inference

__all__ = [
    "ConvNorm",
    "EncoderOnly",
    "MaskDINOPixelDecoder",
    "PixelDecoderOutput",
    "c2_xavier_fill",
    "masked_group_norm",
]


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    # detectron2's c2_xavier_fill: kaiming_uniform with a=1 (Caffe2 "XavierFill"), zero bias
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvNorm(nn.Conv2d):
    """``Conv2d`` with a child ``norm`` (GroupNorm) and an optional ReLU, like detectron2's ``Conv2d``:
    its own ``weight`` is the conv weight and ``norm.weight``/``norm.bias`` the GroupNorm's."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int, relu: bool = False
    ):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        self.relu = relu
        c2_xavier_fill(self)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        """``x (B, Cin, H, W)`` -> ``(B, Cout, H, W)``; ``pad (B, H, W)`` restricts GN statistics."""
        y = masked_group_norm(conv2d_inference(self, x), self.norm, pad)
        return F.relu(y) if self.relu else y


class EncoderOnly(nn.Module):
    """``level_embed (L, C)`` + ``encoder`` (detr_core ``DeformableEncoder``): the official
    ``MSDeformAttnTransformerEncoderOnly`` key layout (``transformer.level_embed``, ``transformer.encoder.layers``)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        d_ffn: int,
        dropout: float,
        n_levels: int,
        n_points: int,
    ):
        super().__init__()
        self.encoder = DeformableEncoder(
            num_layers=num_layers,
            d_model=d_model,
            d_ffn=d_ffn,
            dropout=dropout,
            activation="relu",
            n_levels=n_levels,
            n_heads=nhead,
            n_points=n_points,
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        xavier_init_deformable_(self)
        nn.init.normal_(self.level_embed)


@dataclass
class PixelDecoderOutput:
    """Outputs of :class:`MaskDINOPixelDecoder`.

    Attributes:
        mask_features: ``(B, mask_dim, H/4, W/4)`` (channels-last strided in CPU inference).
        multi_scale_features: ``L`` maps ``(B, conv_dim, H_l, W_l)`` in the encoder's level order.
        strides: the stride of each of those maps (for their padding masks: ``batch.padding_mask(shape, stride)``).
        mask_stride: the stride of ``mask_features`` (the common stride, 4).
    """

    mask_features: Tensor
    multi_scale_features: list[Tensor]
    strides: list[int]
    mask_stride: int


class MaskDINOPixelDecoder(nn.Module):
    """Multi-scale deformable encoder + mask features.

    Args:
        input_shape: ``{name: ShapeSpec}`` of the backbone outputs.
        in_features: backbone features used (SEM_SEG_HEAD.IN_FEATURES), e.g. ``res2..res5``.
        transformer_in_features: those that enter the encoder, e.g. ``res3..res5``.
        total_num_feature_levels: encoder levels including the extra stride-2 levels.
        conv_dim: width of the encoder and the mask features' convolutions. mask_dim: channels of the mask features.
        num_encoder_layers, dim_feedforward, nheads, n_points, dropout: of the deformable encoder.
        common_stride: stride of the mask features (4).
        feature_order: ``low2high`` ([1/8, ..., 1/64]) or ``high2low`` token order in the encoder.
    """

    def __init__(
        self,
        input_shape: Mapping[str, ShapeSpec],
        *,
        in_features: Sequence[str],
        transformer_in_features: Sequence[str],
        total_num_feature_levels: int,
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 2048,
        nheads: int = 8,
        n_points: int = 4,
        dropout: float = 0.0,
        common_stride: int = 4,
        feature_order: Literal["low2high", "high2low"] = "low2high",
    ):
        super().__init__()
        shapes = {k: v for k, v in input_shape.items() if k in in_features}
        missing = set(in_features) - set(shapes)
        if missing:
            raise ValueError(f"pixel decoder needs backbone features {sorted(missing)}")
        self.in_features = sorted(shapes, key=lambda k: shapes[k].stride)  # res2 .. res5
        self.feature_strides = [shapes[k].stride for k in self.in_features]
        self.feature_channels = [shapes[k].channels for k in self.in_features]
        self.feature_order = feature_order
        self.common_stride = common_stride
        groups = 32 if conv_dim % 32 == 0 else math.gcd(conv_dim, 32)

        # Encoder inputs in the ENCODER's level order before any extra level: high->low resolution for
        # low2high (res3, res4, res5), low->high for high2low (res5, res4, res3).
        trans = [k for k in self.in_features if k in transformer_in_features]
        if len(trans) != len(transformer_in_features):
            raise ValueError("transformer_in_features must be a subset of in_features")
        self.transformer_in_features = trans if self.feature_order == "low2high" else trans[::-1]
        self.transformer_strides = [shapes[k].stride for k in self.transformer_in_features]
        self.num_inputs = len(trans)
        self.total_num_feature_levels = total_num_feature_levels
        self.num_extra = self.total_num_feature_levels - self.num_inputs
        lowest = max(trans, key=lambda k: shapes[k].stride)
        self.lowest_feature = lowest

        self.input_proj = InputProjection(
            [shapes[k] for k in self.transformer_in_features], conv_dim, self.num_extra, groups
        )

        # strides of the encoder levels in their token order
        extra_strides = [shapes[lowest].stride * 2 ** (i + 1) for i in range(self.num_extra)]
        if self.feature_order == "low2high":
            self.level_strides = self.transformer_strides + extra_strides
        else:
            self.level_strides = extra_strides[::-1] + self.transformer_strides

        self.transformer = EncoderOnly(
            d_model=conv_dim,
            nhead=nheads,
            num_layers=num_encoder_layers,
            d_ffn=dim_feedforward,
            dropout=dropout,
            n_levels=self.total_num_feature_levels,
            n_points=n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

        self.num_fpn_levels = max(
            int(math.log2(min(self.transformer_strides)) - math.log2(self.common_stride)), 1
        )
        self.fpn_features = self.in_features[: self.num_fpn_levels]
        for i, ch in enumerate(self.feature_channels[: self.num_fpn_levels]):
            self.add_module(f"adapter_{i + 1}", ConvNorm(ch, conv_dim, 1, groups))
            self.add_module(f"layer_{i + 1}", ConvNorm(conv_dim, conv_dim, 3, groups, relu=True))
        # index of the 1/8 (highest-resolution) encoder level in the level list
        self.high_resolution_index = (
            0 if self.feature_order == "low2high" else self.total_num_feature_levels - 1
        )

    @classmethod
    def from_config(
        cls, input_shape: Mapping[str, ShapeSpec], cfg: PixelDecoderConfig
    ) -> MaskDINOPixelDecoder:
        """Built from a :class:`~maskdino.config.PixelDecoderConfig` (every field has the official default)."""
        return cls(
            input_shape,
            in_features=cfg.in_features,
            transformer_in_features=cfg.transformer_in_features,
            total_num_feature_levels=cfg.total_num_feature_levels,
            conv_dim=cfg.conv_dim,
            mask_dim=cfg.mask_dim,
            num_encoder_layers=cfg.num_encoder_layers,
            dim_feedforward=cfg.dim_feedforward,
            nheads=cfg.nheads,
            n_points=cfg.n_points,
            dropout=cfg.dropout,
            common_stride=cfg.common_stride,
            feature_order=cfg.feature_order,
        )

    def output_strides(self) -> list[int]:
        """Stride of every multi-scale feature level, in the encoder's (= output list) order."""
        return list(self.level_strides)

    def forward(self, features: Mapping[str, Tensor], batch: PaddedBatch) -> PixelDecoderOutput:
        """
        Args:
            features: backbone maps ``{name: (B, C, H_s, W_s)}``.
            batch: the padded input batch (only its padding is used: masked or treated as content).

        Returns:
            :class:`PixelDecoderOutput`.
        """
        # Under autocast the encoder's matrix products run in the autocast dtype and the deformable attention op
        # casts its own inputs (a 16-bit value, float32 locations and weights: deform_attn's Autocast kernel).
        return self._forward(features, batch)

    def _forward(self, features: Mapping[str, Tensor], batch: PaddedBatch) -> PixelDecoderOutput:
        levels = self.input_proj([features[k] for k in self.transformer_in_features], batch)
        masks = [batch.padding_mask(y.shape[-2:], st) for y, st in zip(levels, self.input_proj.strides)]
        srcs, extra = levels[: self.num_inputs], levels[self.num_inputs :]
        pads, extra_pads = masks[: self.num_inputs], masks[self.num_inputs :]
        if self.feature_order == "low2high":
            srcs, pads = srcs + extra, pads + extra_pads
        else:
            srcs, pads = extra[::-1] + srcs, extra_pads[::-1] + pads

        flat = flatten_levels(srcs, pads)
        shapes = flat.shapes
        areas = [h * w for h, w in shapes]
        # each level's sine embedding (of that level's map and padding) + its level embedding
        pos_flat = torch.cat(
            [
                self.pe_layer(src, pad).flatten(2).transpose(1, 2)
                + self.transformer.level_embed[lvl].view(1, 1, -1)
                for lvl, (src, pad) in enumerate(zip(srcs, pads))
            ],
            1,
        )
        # the level shapes as Python ints: read back from the tensor they would be data-dependent under torch.export
        memory = self.transformer.encoder(
            flat.tokens,
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            pos=pos_flat,
            padding_mask=flat.padding_mask,
            spatial_shapes_list=shapes,
        )

        # (B, h*w, C) tokens viewed as channels-last (B, C, h, w) maps: no copy, and the layout the following
        # convolutions, the bilinear upsampling and the decoder's re-flattening all want
        out = [
            z.unflatten(1, (h, w)).permute(0, 3, 1, 2)
            for z, (h, w) in zip(memory.split(areas, dim=1), shapes)
        ]
        multi_scale = out[: self.total_num_feature_levels]
        high = batch.replicate_padding(
            out[self.high_resolution_index], self.level_strides[self.high_resolution_index]
        )
        y = high
        for i, name in reversed(list(enumerate(self.fpn_features))):
            x = features[name]
            stride = self.feature_strides[i]
            fpn_pad = batch.padding_mask(x.shape[-2:], stride)
            lateral = getattr(self, f"adapter_{i + 1}")(x, fpn_pad)
            # official quirk: every FPN level upsamples the encoder's highest-resolution map
            y = lateral + F.interpolate(high, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = getattr(self, f"layer_{i + 1}")(batch.zero_padding(y, stride), fpn_pad)
        return PixelDecoderOutput(
            mask_features=self.mask_features(y),
            multi_scale_features=multi_scale,
            strides=list(self.level_strides),
            mask_stride=self.feature_strides[0],
        )
