"""Loading JSON and panoptic PNGs with errors that name the file and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from coco_eval.errors import EvaluationError

PathLike = str | os.PathLike


def load_json(path: PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file, turning missing files and syntax errors into ``EvaluationError``."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"{what} {str(p)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{what} {str(p)!r} is not valid JSON: {e}") from None


def describe(source: Any, default: str) -> str:
    """A short name for error messages: the file path when ``source`` is one, else ``default``."""
    if isinstance(source, str | os.PathLike):
        return repr(str(source))
    return default


def require(record: dict, key: str, where: str) -> Any:
    """``record[key]``, or an ``EvaluationError`` naming ``where`` and the missing field."""
    if not isinstance(record, dict):
        raise EvaluationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        return record[key]
    except KeyError:
        raise EvaluationError(f"{where}: missing field {key!r}") from None


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Panoptic RGB encoding to segment ids: ``id = R + 256 * G + 256**2 * B``.

    Args:
        color: (H, W, 3) uint8/uint32 RGB image, or an (H, W) array that already holds ids.
    Returns:
        (H, W) uint32 ids.
    """
    if color.ndim == 3:
        if color.dtype == np.uint8:
            # widen one channel at a time: ~2x faster than converting the whole (H, W, 3) array first
            out = color[..., 2].astype(np.uint32) << 16
            out |= color[..., 1].astype(np.uint32) << 8
            out |= color[..., 0]
            return out
        c = color.astype(np.uint32)
        return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]
    return color.astype(np.uint32)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: (H, W) ids < 2**24 -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(ids).astype(np.uint32)
    out = np.empty((*ids.shape, 3), dtype=np.uint8)
    out[..., 0] = ids % 256
    out[..., 1] = (ids // 256) % 256
    out[..., 2] = (ids // (256 * 256)) % 256
    return out


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Read a COCO panoptic PNG into (H, W) uint32 segment ids."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise EvaluationError(f"panoptic PNG {str(path)!r} does not exist") from None
    except OSError as e:
        raise EvaluationError(f"panoptic PNG {str(path)!r} cannot be read: {e}") from None
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA written by some tools: alpha carries no id
        arr = arr[..., :3]
    return rgb2id(arr)


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (moved to CPU, detached) without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
