"""Loading JSON with errors that name the file and the field (panoptic PNGs: :mod:`coco_eval.panoptic_io`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from coco_eval.errors import EvaluationError
from coco_eval.panoptic_io import id2rgb, read_panoptic_png, rgb2id  # noqa: F401 (moved; kept importable)

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


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (moved to CPU, detached) without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
