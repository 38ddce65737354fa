"""Metrics files: strict JSON (NaN/inf -> null) rows in ``metrics.jsonl`` and ``metrics.json``."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_metrics", "json_safe"]


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None (e.g. AP of an object size absent from the val set), so files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def format_metrics(results: dict[str, float]) -> str:
    """One line with the headline numbers."""
    keys = [("bbox/AP", "box AP"), ("segm/AP", "mask AP"), ("panoptic/PQ", "PQ"), ("sem_seg/mIoU", "mIoU")]
    parts = [f"{name} {results[k]:.1f}" for k, name in keys if k in results]
    return ", ".join(parts) if parts else "(no metrics)"
