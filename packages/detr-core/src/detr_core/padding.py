"""A batch of images of different sizes, zero-padded into one tensor, that knows where each image is.

The value object of DETR's ``NestedTensor`` and detectron2's ``ImageList``: it is built once at pre-processing and
handed down, so that a module that needs the padding (a mask for attention, valid ratios, zeroing before a
convolution) asks the batch instead of receiving optional masks. Its :attr:`PaddedBatch.masked` flag is the single
place that decides whether padding is masked at all: off for models that treat the padding as image content (the
official Mask DINO) and for batches where nothing is padded; every helper then returns its input or None, at no cost.

Padding is at the bottom and right. Two rules say which positions of a feature map are padding
(:attr:`PaddedBatch.mask_rule`):

* ``"ceil"`` (default, exact): at a feature stride ``s`` an image of ``(h, w)`` pixels covers
  ``(ceil(h / s), ceil(w / s))`` positions: exact for every stride-2 layer of the usual backbones (``k=1,p=0``,
  ``k=3,p=1``, ``k=7,p=3``) since ``ceil(ceil(a / b) / c) == ceil(a / (b c))``.
* ``"nearest"`` (DETR, Deformable DETR, DINO): the pixel mask resized to the map's size by nearest-neighbour
  interpolation, ``F.interpolate(mask[None].float(), size=(H, W)).bool()[0]`` (row ``i`` of the map reads pixel row
  ``floor(i * Hp / H)``). It depends on the padded size, not only the image's, and differs from ``ceil`` when ``Hp``
  or ``Wp`` is not a multiple of the stride (DETR pads to the batch maximum without size divisibility): e.g. a 700 x
  1100 image in an 803 x 1216 batch has 89 / 45 / 23 / 12 valid rows at strides 8 / 16 / 32 / 64 instead of 88 / 44
  / 22 / 11. With padded sizes divisible by the largest stride both rules agree. Use it to reproduce those models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MASK_RULES",
    "PaddedBatch",
    "nearest_padding_mask",
    "padding_mask",
    "pixel_padding_mask",
    "valid_sizes",
]

#: the rules that map an image's extent to the padded positions of a feature map (see the module docstring)
MASK_RULES = ("ceil", "nearest")


def valid_sizes(image_sizes: Tensor, stride: int) -> Tensor:
    """Unpadded ``(h, w)`` at ``stride``: ``ceil(size / stride)``.

    Args:
        image_sizes: ``(B, 2)`` int64 ``(h, w)`` of each image inside the padded batch.
        stride: feature stride.

    Returns:
        ``(B, 2)`` int64.
    """
    return torch.div(image_sizes + (stride - 1), stride, rounding_mode="floor")


def padding_mask(image_sizes: Tensor, shape: Sequence[int], stride: int) -> Tensor:
    """``(B, H, W)`` bool, True at padded positions of a feature map of ``shape = (H, W)`` at ``stride``."""
    sizes = valid_sizes(image_sizes, stride)
    h, w = shape[0], shape[1]  # not int(): symbolic sizes stay symbolic under torch.export
    rows = torch.arange(h, device=image_sizes.device)[None, :] >= sizes[:, 0:1]  # (B, H)
    cols = torch.arange(w, device=image_sizes.device)[None, :] >= sizes[:, 1:2]  # (B, W)
    return rows[:, :, None] | cols[:, None, :]


def pixel_padding_mask(image_sizes: Tensor, padded_size: Sequence[int]) -> Tensor:
    """``(B, Hp, Wp)`` bool, True at the padded pixels of a batch padded to ``padded_size = (Hp, Wp)``."""
    return padding_mask(image_sizes, padded_size, 1)


def nearest_padding_mask(image_sizes: Tensor, padded_size: Sequence[int], shape: Sequence[int]) -> Tensor:
    """``(B, H, W)`` bool: the pixel padding mask resized to ``shape = (H, W)`` by nearest-neighbour interpolation,
    exactly as DETR / Deformable DETR / DINO make the mask of every feature level."""
    pixels = pixel_padding_mask(image_sizes, padded_size)
    return F.interpolate(pixels[None].float(), size=(shape[0], shape[1])).to(torch.bool)[0]


@dataclass(frozen=True)
class PaddedBatch:
    """Images zero-padded (bottom/right) into one tensor.

    Attributes:
        tensor: ``(B, C, Hp, Wp)``.
        image_sizes: ``(B, 2)`` int64 ``(h, w)`` of each image's valid region, on ``tensor``'s device.
        masked: whether padding masks apply. False: the padding is treated as image content (or nothing is padded);
            :meth:`padding_mask` then returns None and the zeroing helpers return their input.
        mask_rule: ``"ceil"`` (exact) or ``"nearest"`` (DETR's interpolated pixel mask): which positions of a
            feature map are padding (see the module docstring).
    """

    tensor: Tensor
    image_sizes: Tensor
    masked: bool = True
    mask_rule: str = "ceil"

    def __post_init__(self) -> None:
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")

    @classmethod
    def from_images(
        cls,
        images: Sequence[Tensor],
        size_divisibility: int = 0,
        pad_value: float = 0.0,
        masked: bool = True,
        mask_rule: str = "ceil",
    ) -> PaddedBatch:
        """Pad ``(C, H_i, W_i)`` images to a common size: the largest height and width of the batch, rounded up to
        ``size_divisibility`` when it is > 1 (DETR / DINO: 1, no rounding; Mask DINO: 32).

        ``masked`` is switched off when no image is smaller than the padded size (the masked operations would all
        reduce to the plain ones, at a cost).

        Raises:
            ValueError: no images, or images of different ranks/channels.
        """
        if len(images) == 0:
            raise ValueError("no images")
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != images[0].shape[0]:
                raise ValueError(
                    f"image {i} must be (C, H, W) with C = {images[0].shape[0]}, got shape {tuple(im.shape)}"
                )
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        hp, wp = max(s[0] for s in sizes), max(s[1] for s in sizes)
        d = size_divisibility
        if d > 1:
            hp, wp = (hp + d - 1) // d * d, (wp + d - 1) // d * d
        first = images[0]
        tensor = first.new_full((len(images), first.shape[0], hp, wp), pad_value)
        for i, im in enumerate(images):
            tensor[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        return cls.from_tensor(tensor, sizes, masked=masked, mask_rule=mask_rule)

    @classmethod
    def from_tensor(
        cls,
        tensor: Tensor,
        image_sizes: Sequence[tuple[int, int]] | Tensor,
        masked: bool = True,
        mask_rule: str = "ceil",
    ) -> PaddedBatch:
        """Wrap an already padded ``(B, C, Hp, Wp)`` tensor; ``masked`` is switched off when nothing is padded."""
        if isinstance(image_sizes, Tensor):
            sizes = image_sizes.to(device=tensor.device, dtype=torch.long)
        else:
            sizes = torch.as_tensor([tuple(s) for s in image_sizes], dtype=torch.long, device=tensor.device)
        if sizes.shape != (tensor.shape[0], 2):
            raise ValueError(f"image_sizes must be (B, 2) = ({tensor.shape[0]}, 2), got {tuple(sizes.shape)}")
        if masked and not isinstance(image_sizes, Tensor):
            hp, wp = int(tensor.shape[-2]), int(tensor.shape[-1])
            masked = any(int(h) != hp or int(w) != wp for h, w in image_sizes)
        return cls(tensor, sizes, masked, mask_rule)

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(Hp, Wp)``."""
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def with_tensor(self, tensor: Tensor) -> PaddedBatch:
        """The same layout around another ``(B, C', Hp, Wp)`` tensor (e.g. after normalisation)."""
        return PaddedBatch(tensor, self.image_sizes, self.masked, self.mask_rule)

    def unmasked(self) -> PaddedBatch:
        """The same batch with padding treated as content."""
        return PaddedBatch(self.tensor, self.image_sizes, False, self.mask_rule)

    def valid_sizes(self, stride: int) -> Tensor:
        """``(B, 2)`` int64 valid ``(h, w)`` at ``stride`` by the ``ceil`` rule (whether or not the batch is masked,
        whatever its ``mask_rule``; :meth:`padding_mask` follows the rule)."""
        return valid_sizes(self.image_sizes, stride)

    def padding_mask(self, shape: Sequence[int], stride: int) -> Tensor | None:
        """``(B, H, W)`` bool, True at padded positions of a map of ``shape`` at ``stride`` (by :attr:`mask_rule`;
        ``"nearest"`` ignores ``stride``); None when not masked."""
        if not self.masked:
            return None
        if self.mask_rule == "nearest":
            return nearest_padding_mask(self.image_sizes, self.tensor.shape[-2:], shape)
        return padding_mask(self.image_sizes, shape, stride)

    def zero_padding(self, x: Tensor, stride: int, inplace: bool = False) -> Tensor:
        """``x (B, C, H, W)`` with the padded positions (at ``stride``) set to 0; ``x`` itself when not masked.

        ``inplace`` also keeps ``x``'s memory layout (a fresh inference activation)."""
        pad = self.padding_mask(x.shape[-2:], stride)
        if pad is None:
            return x
        return x.masked_fill_(pad[:, None], 0.0) if inplace else x.masked_fill(pad[:, None], 0.0)

    def replicate_padding(self, x: Tensor, stride: int) -> Tensor:
        """``x (B, C, H, W)`` with every padded position replaced by the nearest valid one (edge replication), so
        that bilinear resampling near the valid border reads what it would read at the border of the unpadded
        map; ``x`` itself when not masked."""
        if not self.masked:
            return x
        if self.mask_rule == "nearest":
            pad = nearest_padding_mask(self.image_sizes, self.tensor.shape[-2:], x.shape[-2:])
            sizes = torch.stack([(~pad[:, :, 0]).sum(1), (~pad[:, 0, :]).sum(1)], -1).clamp(min=1)
            return replicate_outside(x, sizes)
        return replicate_outside(x, self.valid_sizes(stride))


def replicate_outside(x: Tensor, sizes: Tensor) -> Tensor:
    """Replace every position of ``x (B, C, H, W)`` outside the valid ``sizes (B, 2)`` (int64 ``(h, w)``, >= 1)
    region by the nearest valid one."""
    b, c, h, w = x.shape
    rows = torch.minimum(torch.arange(h, device=x.device)[None], sizes[:, 0:1] - 1)  # (B, H)
    cols = torch.minimum(torch.arange(w, device=x.device)[None], sizes[:, 1:2] - 1)  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
