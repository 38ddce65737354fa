"""Validation of COCO masks (RLE and polygons) before any library decodes them.

pycocotools (and the faster libraries that copy its semantics) accept an RLE whose counts do not add up to
``h * w`` and report an AP from it (decoding one writes past the mask buffer); they read a 4-number polygon
as a box and crash with a bare exception on shorter ones. Everything here returns per-mask results so that
the caller can name the offending annotation.

The compressed-string check runs in C (``coco_eval._speedups``, built when a compiler is present at install
time) or, without it, in numpy (same results, several times slower).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from coco_eval import _speedups
except ImportError:  # no compiler at install time: the numpy path below gives the same answers
    _speedups = None  # type: ignore[assignment]

# negative result codes of rle_check (the same numbers as in _speedups.c)
BAD_TYPE, BAD_CHAR, NEGATIVE, BAD_TOTAL = -1, -2, -3, -4
PROBLEMS = {
    BAD_TYPE: "'counts' must be a string (compressed RLE) or a list of integers (uncompressed RLE)",
    BAD_CHAR: "compressed RLE 'counts' is not a valid COCO RLE string (bad character or truncated)",
    NEGATIVE: "RLE has a negative run length",
    BAD_TOTAL: "RLE counts do not add up to height * width",
}


def speedups_available() -> bool:
    """True when the compiled RLE checker is importable (else the numpy fallback runs)."""
    return _speedups is not None


def num_threads() -> int:
    """Threads for the compiled checks: ``RAYON_NUM_THREADS`` when set (the thread count hotcoco and
    ultrafast-pycocotools use), else the CPUs this process may run on."""
    env = os.environ.get("RAYON_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def area_and_bbox(
    counts: list, sizes: np.ndarray, with_bbox: bool = True, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Compiled check of N compressed RLEs with their (N, 2) (height, width): (areas (N,) int64, negative
    ``BAD_*`` codes for malformed ones; boxes (N, 4) float64, pycocotools' ``toBbox``, zeros without
    ``with_bbox``). Parsed in
    ``threads`` (default ``num_threads()``) threads (the C code runs without the GIL). Needs
    ``coco_eval._speedups``."""
    n = len(counts)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64).reshape(n, 2)
    threads = min(threads or num_threads(), max(1, n // 20000))
    bounds = np.linspace(0, n, threads + 1).astype(int)
    chunks = list(zip(bounds[:-1], bounds[1:]))

    def run(chunk: tuple[int, int]) -> tuple[bytes, bytes]:
        a, b = chunk
        return _speedups.rle_area_bbox(counts[a:b] if threads > 1 else counts, sizes[a:b], with_bbox)

    if threads == 1:
        parts = [run(chunks[0])]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(run, chunks))
    areas = np.frombuffer(b"".join(a for a, _ in parts), np.int64)
    boxes = np.frombuffer(b"".join(b for _, b in parts), np.float64).reshape(n, 4)
    return areas, boxes


def check_compressed(counts: Sequence[Any], totals: Sequence[int], use_c: bool | None = None) -> np.ndarray:
    """Area of each compressed RLE, or a negative code (``BAD_*``) for a malformed one.

    Args:
        counts: N ``counts`` values (str or bytes); anything else gives ``BAD_TYPE``.
        totals: N expected sums of all runs (``h * w`` of each mask).
        use_c: force (True) or avoid (False) the C implementation; default: C when built.
    Returns:
        (N,) int64.
    """
    if use_c is None:
        use_c = _speedups is not None
    if use_c:
        if _speedups is None:
            raise RuntimeError("coco_eval._speedups is not built")
        return np.asarray(_speedups.rle_check(counts, [int(t) for t in totals]), dtype=np.int64)
    totals_arr = np.asarray(totals, dtype=np.int64)
    out = np.empty(len(counts), np.int64)
    start = 0
    while start < len(counts):  # chunks of ~256k characters: the temporaries stay in cache (4x faster)
        stop, chars = start, 0
        while stop < len(counts) and (chars < 1 << 18 or stop == start):
            c = counts[stop]
            chars += len(c) if isinstance(c, str | bytes) else 0
            stop += 1
        out[start:stop] = _check_compressed_numpy(counts[start:stop], totals_arr[start:stop])
        start = stop
    return out


def _check_compressed_numpy(counts: Sequence[Any], totals: np.ndarray) -> np.ndarray:
    n = len(counts)
    out = np.zeros(n, np.int64)
    raw: list[bytes] = []
    for i, c in enumerate(counts):
        if isinstance(c, str):
            c = c.encode("utf-8")
        if not isinstance(c, bytes):
            out[i] = BAD_TYPE
            c = b""
        raw.append(c)
    lens = np.fromiter((len(c) for c in raw), np.int64, count=n)
    buf = np.frombuffer(b"".join(raw), np.uint8).astype(np.int64) - 48
    if buf.size == 0:
        out[(out == 0) & (totals != 0)] = BAD_TOTAL
        return out
    owner = np.repeat(np.arange(n), lens)
    bad = np.zeros(n, bool)
    bad[owner[(buf < 0) | (buf > 63)]] = True
    is_end = (buf & 0x20) == 0
    ends_at = np.cumsum(lens) - 1
    nonempty = lens > 0
    bad[nonempty] |= ~is_end[ends_at[nonempty]]  # a string must end on the last character of a count
    tok_end = is_end.copy()
    tok_end[ends_at[nonempty]] = True  # so that no token of a malformed string runs into the next string
    end_pos = np.flatnonzero(tok_end)
    start_pos = np.concatenate([[0], end_pos[:-1] + 1])
    tok_len = end_pos - start_pos + 1
    tok_owner = owner[start_pos]
    bad[tok_owner[tok_len > 7]] = True
    starts = np.zeros(buf.size, bool)
    starts[start_pos] = True
    pos_in_tok = np.arange(buf.size) - start_pos[np.cumsum(starts) - 1]
    x = np.add.reduceat((buf & 0x1F) << (5 * np.minimum(pos_in_tok, 6)), start_pos)
    neg = (buf[end_pos] & 0x10) != 0
    x = np.where(neg, x - (np.int64(1) << (5 * np.minimum(tok_len, 7))), x)
    per_string = np.bincount(tok_owner, minlength=n)
    first_tok = np.concatenate([[0], np.cumsum(per_string)[:-1]])
    m = np.arange(x.size) - first_tok[tok_owner]
    value = x.copy()
    for parity in (
        0,
        1,
    ):  # counts[m] = x[m] + counts[m - 2] for m > 2, i.e. running sums per parity from m = 1, 2
        sel = np.flatnonzero((m >= 1) & ((m & 1) == parity))
        if sel.size == 0:
            continue
        xs = x[sel]
        cs = np.cumsum(xs)
        own = tok_owner[sel]
        group_start = np.concatenate([[True], own[1:] != own[:-1]])
        base_idx = np.maximum.accumulate(np.where(group_start, np.arange(sel.size), 0))
        value[sel] = cs - cs[base_idx] + xs[base_idx]
    negative = np.zeros(n, bool)
    negative[tok_owner[value < 0]] = True
    total = np.bincount(tok_owner, weights=value.astype(np.float64), minlength=n)
    area = np.bincount(tok_owner, weights=np.where(m & 1, value, 0).astype(np.float64), minlength=n)
    res = area.astype(np.int64)
    res[total != totals] = BAD_TOTAL
    res[negative] = NEGATIVE
    res[bad] = BAD_CHAR  # a malformed string's decoded runs mean nothing: name the string itself
    res[out == BAD_TYPE] = BAD_TYPE
    return res


def uncompressed_problem(counts: Any, total: int) -> str | None:
    """Why an uncompressed RLE ``counts`` list is malformed (None when it is fine)."""
    if not isinstance(counts, list | tuple):
        return PROBLEMS[BAD_TYPE]
    s = 0
    for v in counts:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            return f"uncompressed RLE 'counts' must hold integers, got {v!r}"
        if v < 0:
            return PROBLEMS[NEGATIVE]
        s += int(v)
    if s != total:
        return f"{PROBLEMS[BAD_TOTAL]} ({s} != {total})"
    return None


def size_problem(size: Any, expected: Sequence[int] | None) -> str | None:
    """Why an RLE ``size`` is malformed or differs from the image's [height, width] (None when fine)."""
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        return f"RLE 'size' must be [height, width] (non-negative integers), got {size!r}"
    if expected is not None and [int(size[0]), int(size[1])] != list(expected):
        return f"RLE size {list(size)} differs from the image size {list(expected)}"
    return None


def polygon_problem(polygons: Any) -> str | None:
    """Why a COCO polygon list is malformed (None when fine).

    Each polygon needs an even number (>= 6) of finite coordinates: pycocotools reads a 4-number polygon as
    a box and fails with a bare exception on fewer.
    """
    if not isinstance(polygons, list | tuple) or not polygons:
        return "polygon 'segmentation' must be a non-empty list of [x1, y1, x2, y2, ...] lists"
    for j, poly in enumerate(polygons):
        if not isinstance(poly, list | tuple):
            return f"polygon {j} must be a list of coordinates, got {type(poly).__name__}"
        if len(poly) < 6 or len(poly) % 2:
            return f"polygon {j} has {len(poly)} coordinates; a polygon needs an even number, at least 6"
        for v in poly:
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float | np.integer | np.floating)
                or not math.isfinite(v)
            ):
                return f"polygon {j} has a coordinate that is not a finite number: {v!r}"
    return None
