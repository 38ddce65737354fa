"""Augmentations on samples of tv_tensors (torchvision.transforms.v2).

A sample is a dict with ``image`` (tv_tensors.Image uint8 (3, H, W)), ``boxes`` (tv_tensors.BoundingBoxes
XYXY), ``masks`` (tv_tensors.Mask bool (n, H, W)), ``labels`` (int64 (n,)) and optionally ``sem_seg``
(tv_tensors.Mask (H, W), 255 = ignore). The geometric ops are the v2 functional kernels, so boxes and
masks move together with the image; every random draw uses torch's global RNG, which
:func:`apply_seeded` seeds per sample.

- :class:`LargeScaleJitter`: the LSJ recipe of the official COCO training (detectron2 ``ResizeScale`` +
  ``FixedSizeCrop`` + horizontal flip): resize so the image fits a random ``scale * size`` square
  (aspect preserved), random-crop to ``size x size`` when larger, pad bottom/right when smaller
  (image 128, masks 0, semantic 255).
- :class:`ResizeShortestEdge`: test-time resize (shorter side, longer side capped).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

from detr_core import box_ops
from maskdino.data.errors import DataError

__all__ = [
    "Compose",
    "LargeScaleJitter",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "apply_seeded",
    "masks_to_boxes",
]

IMAGE_PAD_VALUE = 128
SEM_SEG_IGNORE = 255


def apply_seeded(transform, sample: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """Apply ``transform`` to ``sample``; with a seed, under a forked and seeded torch RNG.

    Seeding per sample makes an augmentation a function of the sampler's stream only: independent of
    DataLoader workers, of the process (DDP rank) that loads the sample and of where a run was resumed.
    """
    if transform is None:
        return sample
    if seed is None:
        return transform(sample)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(sample)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of bool masks ``(n, H, W)`` to the pixel edges (a single pixel at ``(x, y)`` gives
    ``[x, y, x + 1, y + 1]``, detectron2's ``BitMasks`` convention); empty masks give ``[0, 0, 0, 0]``."""
    return box_ops.masks_to_boxes(masks, pixel_edges=True)


class Compose:
    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def _geometric_keys(sample: dict[str, Any]) -> list[str]:
    return [k for k in ("image", "boxes", "masks", "sem_seg") if k in sample]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return sample
        out = dict(sample)
        for k in _geometric_keys(sample):
            out[k] = F.horizontal_flip(sample[k])
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _resize(sample: dict[str, Any], new_h: int, new_w: int) -> dict[str, Any]:
    out = dict(sample)
    for k in _geometric_keys(sample):
        x = sample[k]
        if k in ("masks", "sem_seg"):
            # Label maps: nearest neighbour; v2 picks NEAREST for Mask but be explicit. Bool masks are
            # resized as uint8 (the kernels do not take bool).
            is_bool = x.dtype == torch.bool
            y = F.resize(
                x.to(torch.uint8) if is_bool else x, [new_h, new_w], interpolation=F.InterpolationMode.NEAREST
            )
            out[k] = tv_tensors.wrap(y.as_subclass(torch.Tensor).bool(), like=x) if is_bool else y
        elif k == "image":
            out[k] = F.resize(x, [new_h, new_w], antialias=True)
        else:
            out[k] = F.resize(x, [new_h, new_w])
    return out


class LargeScaleJitter:
    """LSJ: random scale in ``[min_scale, max_scale]`` of ``size``, crop/pad to ``size x size``, h-flip.

    Args:
        size: output side (the official COCO recipe: 1024).
        min_scale, max_scale: range of the random scale (official 0.1-2.0).
        flip_prob: probability of a horizontal flip.
    """

    def __init__(
        self, size: int, min_scale: float = 0.1, max_scale: float = 2.0, flip_prob: float = 0.5
    ) -> None:
        if not 0 < min_scale <= max_scale:
            raise DataError(
                f"LargeScaleJitter: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}"
            )
        self.size = int(size)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.flip = RandomHorizontalFlip(flip_prob)

    def __repr__(self) -> str:
        return f"LargeScaleJitter(size={self.size}, scale=({self.min_scale}, {self.max_scale}), flip={self.flip.p})"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample = self.flip(sample)
        h, w = sample["image"].shape[-2:]
        scale = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        target = scale * self.size
        ratio = min(target / h, target / w)
        new_h, new_w = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
        sample = _resize(sample, new_h, new_w)
        # Random crop when larger than the output (offset uniform over the valid range).
        top = int(torch.randint(0, new_h - self.size + 1, ()).item()) if new_h > self.size else 0
        left = int(torch.randint(0, new_w - self.size + 1, ()).item()) if new_w > self.size else 0
        ch, cw = min(new_h, self.size), min(new_w, self.size)
        out = dict(sample)
        pad = [0, 0, self.size - cw, self.size - ch]  # left, top, right, bottom
        for k in _geometric_keys(sample):
            x = F.crop(sample[k], top, left, ch, cw)
            if k == "boxes":
                x = F.clamp_bounding_boxes(x)
            if pad[2] or pad[3]:
                fill = {"image": IMAGE_PAD_VALUE, "masks": 0, "sem_seg": SEM_SEG_IGNORE}.get(k, 0)
                x = F.pad(x, pad, fill=fill)
            out[k] = x
        return out


class ResizeShortestEdge:
    """Resize so the shorter side is ``short_edge`` and the longer at most ``max_size`` (aspect preserved).

    ``backend``: ``tensor`` resizes with torchvision's antialiased bilinear on the uint8 tensor (the training
    augmentation's resize); ``pil`` with PIL's bilinear on the uint8 image, exactly as detectron2's
    ``ResizeShortestEdge`` (the test-time resize the official checkpoints were evaluated with). Masks and label maps
    are always resized with nearest neighbour.
    """

    def __init__(
        self, short_edge: int, max_size: int = 1333, backend: Literal["tensor", "pil"] = "tensor"
    ) -> None:
        if backend not in ("tensor", "pil"):
            raise ValueError(f"ResizeShortestEdge: backend must be 'tensor' or 'pil', got {backend!r}")
        self.short_edge = int(short_edge)
        self.max_size = int(max_size)
        self.backend = backend

    def __repr__(self) -> str:
        return f"ResizeShortestEdge({self.short_edge}, max_size={self.max_size}, backend={self.backend!r})"

    @staticmethod
    def output_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
        """detectron2's ``ResizeShortestEdge.get_output_shape``, operation by operation (the same float rounding):
        the shorter side becomes ``short_edge``; if the longer then exceeds ``max_size`` both are scaled down; each
        side is rounded with ``int(x + 0.5)``."""
        size = float(short_edge)
        scale = size / min(h, w)
        new_h, new_w = (size, scale * w) if h < w else (scale * h, size)
        if max(new_h, new_w) > max_size:
            scale = max_size * 1.0 / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        return int(new_h + 0.5), int(new_w + 0.5)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        h, w = sample["image"].shape[-2:]
        new_h, new_w = self.output_size(h, w, self.short_edge, self.max_size)
        if (new_h, new_w) == (h, w):
            return sample
        if self.backend == "tensor":
            return _resize(sample, new_h, new_w)
        image = sample["image"]
        out = _resize({k: v for k, v in sample.items() if k != "image"}, new_h, new_w)
        out["image"] = tv_tensors.wrap(pil_bilinear_resize(image, new_h, new_w), like=image)
        return out


def pil_bilinear_resize(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, new_h, new_w)`` uint8 with ``PIL.Image.resize(..., BILINEAR)`` (detectron2's
    ``ResizeTransform`` on uint8 images)."""
    import numpy as np
    from PIL import Image

    if image.dtype != torch.uint8:
        raise ValueError(f"PIL resize needs a uint8 image, got {image.dtype}")
    arr = image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()
    resized = Image.fromarray(arr).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def pad_to_multiple(size: int, divisor: int) -> int:
    return int(math.ceil(size / divisor) * divisor) if divisor > 1 else size
