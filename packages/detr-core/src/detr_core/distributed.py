"""The only torch.distributed use of detr-core: averaging the loss normaliser over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["reduce_num_boxes"]


def reduce_num_boxes(n: float | int | torch.Tensor, device: torch.device | str | None = None) -> float:
    """Average of ``n`` (e.g. the number of targets in this rank's batch) over all ranks, clamped to ``>= 1``.

    Without an initialised process group this is ``max(n, 1)``. Every rank must call it (it is a collective).
    """
    t = torch.as_tensor(n, dtype=torch.float32, device=device).reshape(())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return max(float(t.item()), 1.0)
