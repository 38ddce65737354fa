# Type stubs for the optional compiled module (coco_eval/_speedups.c).
from collections.abc import Sequence
from typing import Any

def rle_check(counts: Sequence[Any], totals: Sequence[int]) -> list[int]: ...
def rle_area_bbox(counts: Sequence[Any], sizes: Any, with_bbox: bool = ...) -> tuple[bytes, bytes]: ...
def extract(
    records: Sequence[Any], bbox: bool
) -> tuple[int, bytes, bytes, bytes, Any, bytes | None, list | None]: ...
def png_overlap(
    gt_raw: Any,
    gt_channels: int,
    pred_raw: Any,
    pred_channels: int,
    width: int,
    height: int,
    gt_ids: Any,
    pred_ids: Any,
) -> tuple[bytes, list[int], list[int], str | None]: ...
