"""Inference precision: float32, or the network under bfloat16 autocast with every decision in float32.

``bf16`` runs the network (backbone, pixel decoder, decoder, heads) under ``torch.autocast(dtype=torch.bfloat16)``:
matrix products and convolutions in bfloat16 (AMX / AVX-512-BF16 on CPUs that have them, tensor cores on GPUs), the
deformable attention op with a bfloat16 value and float32 locations. Its outputs are cast back to float32, so the
decisions (score threshold, mask binarisation, top-k, panoptic merge) are float32 operations on them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import torch

__all__ = ["PRECISIONS", "Precision", "autocast", "native_bf16", "with_precision"]

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")

T = TypeVar("T")


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512-BF16 or AMX)."""
    try:
        flags = set(
            Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].replace(":", " ").split()
        )
    except (OSError, IndexError):
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _warn_slow_bf16() -> None:
    warnings.warn(
        "this CPU has no native bfloat16 arithmetic (no avx512_bf16 / AMX): --precision bf16 runs, but more slowly "
        "than fp32; use fp32 on it",
        RuntimeWarning,
        stacklevel=4,
    )


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device | str) -> Iterator[None]:
    """The autocast region of ``precision`` on ``device`` (nothing for ``fp32``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
    if precision == "fp32":
        yield
        return
    device_type = torch.device(device).type
    if device_type == "cpu" and not native_bf16():
        _warn_slow_bf16()
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        yield


def with_precision(
    run: Callable[..., tuple[torch.Tensor, ...]], precision: Precision, device: torch.device | str
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``run`` (a network returning tensors) under :func:`autocast`, its outputs cast back to float32."""
    if precision == "fp32":
        return run

    def wrapped(*args, **kwargs):
        with autocast(precision, device):
            outs = run(*args, **kwargs)
        return tuple(o.float() for o in outs)

    return wrapped
