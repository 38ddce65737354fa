"""Gathering per-rank partial results to rank 0 without importing torch unless it is already in use."""

from __future__ import annotations

import sys
from typing import Any


def _dist():
    """``torch.distributed`` when a process group is running, else None.

    torch is never imported here: if the program has not imported ``torch.distributed`` itself, no process
    group can exist, and a plain single-process run must not pay for (or require) torch.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    dist = _dist()
    return 1 if dist is None else dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed."""
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collect ``obj`` from every rank.

    Returns:
        ``[obj_rank0, obj_rank1, ...]`` on rank 0 (``[obj]`` when not distributed), None on other ranks.
        Every rank must call it (it is a collective).
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    # all_gather_object works for gloo and nccl alike (gather_object needs per-backend device care)
    dist.all_gather_object(gathered, obj)
    return gathered if dist.get_rank() == 0 else None
