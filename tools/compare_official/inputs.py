"""Inputs of the comparison: a photo (or a synthetic one) after the standard test resize, or synthetic batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision import tv_tensors

from maskdino.data.coco import read_image
from maskdino.data.transforms import ResizeShortestEdge

__all__ = ["Inputs", "photo_inputs", "synthetic_batch", "synthetic_photo", "unpadded_crop"]


@dataclass
class Inputs:
    """What both models are fed.

    Attributes:
        images: ``(3, h, w)`` float RGB in [0, 255], the network inputs (after any resize; padded by the models).
        output_sizes: post-processing output ``(H, W)`` per image (the photo's size before the resize).
        description: for the report.
        photo: the photo file (for the end-to-end check), or None.
        original: the photo before the resize ``(3, H, W)`` uint8, or None.
    """

    images: list[Tensor]
    output_sizes: list[tuple[int, int]]
    description: str
    photo: Path | None = None
    original: Tensor | None = None


def synthetic_photo(h: int = 480, w: int = 640, seed: int = 0) -> Tensor:
    """A ``(3, h, w)`` uint8 "photo" (a COCO image's size by default) made with integer operations only: random
    colour blocks with a ramp, rectangles, a disc and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 200, (3, 8, 8), generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = blocks[:, yy * 8 // h, xx * 8 // w] + (yy + xx) // 16
    for _ in range(4):
        y0 = int(torch.randint(0, max(h - 40, 1), (1,), generator=g))
        x0 = int(torch.randint(0, max(w - 40, 1), (1,), generator=g))
        dy = int(torch.randint(20, max(h // 2, 21), (1,), generator=g))
        dx = int(torch.randint(20, max(w // 2, 21), (1,), generator=g))
        img[:, y0 : y0 + dy, x0 : x0 + dx] = torch.randint(0, 256, (3, 1, 1), generator=g)
    disc = (yy - h * 3 // 5) ** 2 + (xx - w * 3 // 10) ** 2 < (min(h, w) * 3 // 20) ** 2
    img[:, disc] = torch.tensor([250, 30, 60])[:, None]
    return (img + torch.randint(-8, 9, img.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def standard_resize(image: Tensor, short_edge: int, max_size: int) -> Tensor:
    """``(3, H, W)`` uint8 -> the network input ``(3, h, w)`` float: maskdino's ``ResizeShortestEdge`` with the PIL
    backend (detectron2's test resize: PIL bilinear on uint8)."""
    resize = ResizeShortestEdge(short_edge, max_size, backend="pil")
    return resize({"image": tv_tensors.Image(image)})["image"].as_subclass(Tensor).float()


def photo_inputs(path: Path | None, resize: tuple[int, int] | None, seed: int) -> Inputs:
    """The photo at ``path`` (read with maskdino's ``read_image``: EXIF applied) or, without one, a synthetic
    480x640 photo written to no file; resized with the standard test resize unless ``resize`` is None."""
    original = read_image(path) if path is not None else synthetic_photo(seed=seed)
    size = (int(original.shape[-2]), int(original.shape[-1]))
    image = standard_resize(original, *resize) if resize is not None else original.float()
    what = str(path) if path is not None else "synthetic photo"
    how = f"shortest edge {resize[0]}, max {resize[1]}, PIL bilinear" if resize is not None else "no resize"
    desc = f"{what} {size[0]}x{size[1]} -> {tuple(image.shape[-2:])[0]}x{tuple(image.shape[-2:])[1]} ({how})"
    return Inputs([image], [size], desc, photo=path, original=original)


def synthetic_batch(sizes: list[tuple[int, int]], batch: int, seed: int) -> Inputs:
    """Synthetic images of the given sizes (``batch`` of each), used at their own size (no resize)."""
    hw = [s for s in sizes for _ in range(batch)]
    images = [synthetic_photo(h, w, seed=seed + i).float() for i, (h, w) in enumerate(hw)]
    return Inputs(images, list(hw), f"{len(images)} synthetic image(s) {hw}")


def unpadded_crop(image: Tensor, divisor: int) -> Tensor:
    """The top-left crop of ``image (3, h, w)`` whose sides are multiples of ``divisor`` (no padding needed)."""
    h, w = (int(s) // divisor * divisor for s in image.shape[-2:])
    if h == 0 or w == 0:
        raise SystemExit(
            f"the input {tuple(image.shape[-2:])} is smaller than the size divisibility {divisor}"
        )
    return image[:, :h, :w]
