"""The input projections of Deformable DETR, DINO and Mask DINO: backbone maps -> ``d_model``-channel levels.

Each backbone level goes through ``Conv1x1 (+bias) + GroupNorm``; ``num_extra_levels`` further levels are made by
``Conv3x3 stride 2 (+bias) + GroupNorm``, the first one from the RAW backbone map of the lowest resolution (its
``C`` channels, not the projected level), each later one from the previous extra level. Submodule ``i`` is an
``nn.Sequential(conv, norm)``, so the state-dict keys are ``{i}.0.*`` / ``{i}.1.*`` as in the official checkpoints
(``input_proj.{i}.{0,1}``); projections are numbered inputs first, extra levels after them.

Padding (optional): given a masked :class:`~detr_core.padding.PaddedBatch`, the GroupNorm statistics are taken over
the valid positions only and each strided convolution reads zeros outside the valid region, so an image gets the
same levels inside its valid region whatever the padding. Without a batch (or unmasked) the padding is image
content, as in the official DETR-family code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .backbone import ShapeSpec
from .padding import PaddedBatch

__all__ = ["InputProjection", "masked_group_norm"]


def masked_group_norm(x: Tensor, gn: nn.GroupNorm, pad: Tensor | None) -> Tensor:
    """GroupNorm whose statistics use only unpadded positions.

    Args:
        x: ``(B, C, H, W)``. gn: the module holding ``num_groups``, ``eps`` and the affine parameters.
        pad: ``(B, H, W)`` bool True=padding, or None (plain ``gn(x)``).

    Returns:
        ``(B, C, H, W)``; values at padded positions are normalised with the same statistics (not zeroed).
    """
    if pad is None:
        return gn(x)
    x = x.float()  # statistics in float32, also under autocast
    b, c, h, w = x.shape
    g = gn.num_groups
    cg = c // g
    valid = (~pad).to(x.dtype).reshape(b, h * w, 1)  # (B, HW, 1)
    count = valid.sum(dim=(1, 2)).clamp(min=1.0) * cg  # (B,) values per group
    channels_last = (
        x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    )

    def masked_channel_sums(t: Tensor) -> Tensor:
        # (B, C): the sum of t over the valid positions as one batched matrix product, in t's own layout (no
        # copy for channels-last maps); shapes stay symbolic, so tracing and export see no data-dependent size
        if channels_last:
            return torch.bmm(valid.transpose(1, 2), t.permute(0, 2, 3, 1).reshape(b, h * w, c)).squeeze(1)
        return torch.bmm(t.reshape(b, c, h * w), valid).squeeze(2)

    def per_channel(group_sums: Tensor) -> Tensor:  # (B, C) -> (B, C): each channel its group's mean
        mean_g = group_sums.reshape(b, g, cg).sum(dim=2) / count[:, None]
        return mean_g.repeat_interleave(cg, dim=1)

    mean = per_channel(masked_channel_sums(x))
    d = x - mean[:, :, None, None]  # keeps x's memory format
    var = per_channel(masked_channel_sums(d * d))
    scale = torch.rsqrt(var + gn.eps)
    if gn.affine:
        scale = scale * gn.weight[None]
        return torch.addcmul(gn.bias[None, :, None, None], d, scale[:, :, None, None])
    return d.mul_(scale[:, :, None, None])


class InputProjection(nn.ModuleList):
    """Backbone maps -> ``len(in_shapes) + num_extra_levels`` maps of ``d_model`` channels (see the module docstring).

    Args:
        in_shapes: channels and stride of each input map, in the order the maps will be passed.
        d_model: output channels.
        num_extra_levels: strided levels added after the inputs.
        num_groups: GroupNorm groups (32 in DINO / Mask DINO).

    Init (Deformable DETR / DINO / Mask DINO): conv weights ``xavier_uniform_(gain=1)``, biases 0, GroupNorm (1, 0).

    Attributes:
        strides: the stride of every output level, inputs first. lowest_input: index of the input that feeds the
        first extra level (the one of the largest stride).
    """

    def __init__(
        self,
        in_shapes: Sequence[ShapeSpec],
        d_model: int = 256,
        num_extra_levels: int = 0,
        num_groups: int = 32,
    ):
        if not in_shapes:
            raise ValueError("InputProjection needs at least one input level")
        if d_model % num_groups:
            raise ValueError(f"d_model {d_model} is not divisible by num_groups {num_groups}")
        lowest = max(range(len(in_shapes)), key=lambda i: in_shapes[i].stride)
        proj = [
            nn.Sequential(nn.Conv2d(s.channels, d_model, 1), nn.GroupNorm(num_groups, d_model))
            for s in in_shapes
        ]
        in_ch = in_shapes[lowest].channels
        for _ in range(num_extra_levels):
            proj.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, d_model, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(num_groups, d_model),
                )
            )
            in_ch = d_model
        super().__init__(proj)
        self.num_inputs = len(in_shapes)
        self.lowest_input = lowest
        top = in_shapes[lowest].stride
        self.strides = [s.stride for s in in_shapes] + [top * 2 ** (j + 1) for j in range(num_extra_levels)]
        for i in range(len(self)):
            conv = self.conv(i)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def conv(self, i: int) -> nn.Conv2d:
        """The convolution of projection ``i``."""
        return cast(nn.Conv2d, cast(nn.Sequential, self[i])[0])

    def norm(self, i: int) -> nn.GroupNorm:
        """The GroupNorm of projection ``i``."""
        return cast(nn.GroupNorm, cast(nn.Sequential, self[i])[1])

    def forward(self, maps: Sequence[Tensor], batch: PaddedBatch | None = None) -> list[Tensor]:
        """
        Args:
            maps: ``(B, C_i, H_i, W_i)`` per input, in ``in_shapes`` order.
            batch: the padded input batch for padding-aware projections, or None (padding is content).

        Returns:
            ``len(self)`` maps ``(B, d_model, H_l, W_l)``: the projected inputs, then the extra levels.
        """
        if len(maps) != self.num_inputs:
            raise ValueError(f"InputProjection expects {self.num_inputs} maps, got {len(maps)}")
        out = []
        for i, x in enumerate(maps):
            pad = None if batch is None else batch.padding_mask(x.shape[-2:], self.strides[i])
            out.append(masked_group_norm(self.conv(i)(x), self.norm(i), pad))
        x = maps[self.lowest_input]
        stride = self.strides[self.lowest_input]
        for i in range(self.num_inputs, len(self)):
            if batch is not None:
                # zero outside the image so that the strided 3x3 conv sees the same border as an unpadded map
                x = batch.zero_padding(x, stride)
            stride = self.strides[i]
            y = self.conv(i)(x)
            pad = None if batch is None else batch.padding_mask(y.shape[-2:], stride)
            x = masked_group_norm(y, self.norm(i), pad)
            out.append(x)
        return out
