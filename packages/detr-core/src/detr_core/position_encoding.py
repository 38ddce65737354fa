"""Sine position encodings: of feature-map pixels (DETR) and of points/boxes used as query positions (DAB-DETR)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_embedding"]


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """``(..., F)`` -> ``(..., F)`` with ``sin`` on even and ``cos`` on odd features, interleaved as in DETR."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def _dim_t(num_pos_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)


class PositionEmbeddingSine(nn.Module):
    """2-D sine position embedding of a feature map (DETR / Mask2Former / Mask DINO).

    For a pixel at (row ``i``, column ``j``) with cumulative valid counts ``y = i + 1`` and ``x = j + 1``, the
    coordinates are normalised to ``(y + offset) / (valid rows + 1e-6) * scale`` (likewise x). Each of ``y`` and
    ``x`` gives ``num_pos_feats`` features ``[sin(v / T^(0/F)), cos(v / T^(0/F)), sin(v / T^(2/F)), ...]``.

    Args:
        num_pos_feats: features per axis ``F``; output has ``2F`` channels, ``(pos_y, pos_x)``.
        temperature: ``T``.
        normalize: divide by the number of valid rows/columns and multiply by ``scale``.
        scale: defaults to ``2*pi``.
        offset: added to the cumulative counts before normalising. Mask DINO/Mask2Former use ``0``;
            Deformable DETR and DINO use ``-0.5`` (pixel centres).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = None,
        offset: float = 0.0,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            x: ``(B, C, H, W)``; only its shape and device are used.
            mask: ``(B, H, W)`` bool, True at padded pixels, or None (no padding).

        Returns:
            ``(B, 2*num_pos_feats, H, W)`` float32, channels ``(pos_y, pos_x)``.
        """
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = _dim_t(self.num_pos_feats, self.temperature, x.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )


def sine_embedding(coords: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """Sine embedding of normalised points or boxes (DAB-DETR / DINO ``gen_sineembed_for_position``).

    Each coordinate ``v`` becomes ``num_pos_feats`` features of ``2*pi*v / T^(2*(k//2)/F)``, sin on even ``k`` and
    cos on odd ``k``; the per-coordinate blocks are concatenated in the order ``(y, x)`` for points and
    ``(y, x, w, h)`` for boxes.

    Args:
        coords: ``(..., 2)`` points ``(x, y)`` or ``(..., 4)`` boxes ``(cx, cy, w, h)`` in ``[0, 1]``.
        num_pos_feats: features per coordinate ``F`` (``d_model // 2`` in DINO).
        temperature: ``T``.

    Returns:
        ``(..., 2F)`` for points, ``(..., 4F)`` for boxes, in ``coords``' dtype.
    """
    k = coords.shape[-1]
    if k not in (2, 4):
        raise ValueError(f"coords must end in 2 or 4, got shape {tuple(coords.shape)}")
    dim_t = _dim_t(num_pos_feats, temperature, coords.device).to(coords.dtype)
    emb = _interleave_sin_cos(coords[..., None] * (2 * math.pi) / dim_t)  # (..., k, F)
    order = [1, 0] if k == 2 else [1, 0, 2, 3]
    return emb[..., order, :].flatten(-2)
