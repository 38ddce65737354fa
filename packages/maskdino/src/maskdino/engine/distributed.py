"""Small helpers around torch.distributed (all no-ops in a single process).

Launch with torchrun: ``torchrun --nproc_per_node=N -m maskdino train ...``; the backend is NCCL when
CUDA is used, gloo otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "reduce_loss_dict",
]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise the process group from torchrun's environment variables (if present).

    Returns ``(rank, world_size, device)``. ``device``: ``auto`` (CUDA if available), ``cpu``, ``cuda``.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_dist():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
    rank = get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return rank, get_world_size(), dev


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size()


def reduce_loss_dict(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each (detached) loss over ranks, as Python floats, for logging."""
    if not losses:
        return {}
    names = sorted(losses)
    vals = torch.stack([losses[k].detach().float().reshape(()) for k in names])
    vals = all_reduce_mean(vals)
    return {k: float(v) for k, v in zip(names, vals.tolist())}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
