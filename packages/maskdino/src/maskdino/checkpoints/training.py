"""Training checkpoints: model, optimizer, scheduler, AMP scaler, iteration, data position and RNG states.

Files are written atomically (:func:`detr_core.checkpoint.save_checkpoint`: temp file + fsync + ``os.replace``), so an
interrupted or failed save (a kill, a full disk) never corrupts the previous checkpoint; ``last_checkpoint`` (a text
file with the file name) is updated after the file is in place. A process killed while writing can leave its
temporary file (``.model_*.pth.<random>.tmp``): :func:`remove_orphaned_checkpoint_files` removes those of a run
folder, and only those. Everything stored is tensors and plain Python containers, so loading works with
``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detr_core.checkpoint import (
    CheckpointError,
    load_checkpoint_file,
    remove_orphaned_temporaries,
    save_checkpoint,
)

__all__ = [
    "LAST",
    "MissingCheckpointError",
    "capture_rng_state",
    "find_last_checkpoint",
    "load_training_checkpoint",
    "remove_orphaned_checkpoint_files",
    "restore_rng_state",
    "save_training_checkpoint",
]

LAST = "last_checkpoint"
#: names of the checkpoint files a training run writes (periodic and final).
CHECKPOINT_NAME = re.compile(r"model_(\d{7}|final)\.pth")


class MissingCheckpointError(FileNotFoundError):
    """``last_checkpoint`` names a checkpoint file that does not exist (deleted or moved): resuming is impossible."""


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors/plain containers."""
    py = random.getstate()
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))  # noqa: NPY002 (what user code seeds)
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(output_dir: str | Path, name: str, state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``output_dir/name`` atomically, point ``last_checkpoint`` at it, prune old periodic ones (keeping
    ``keep``; 0 = all)."""
    out = Path(output_dir)
    path = out / name
    save_checkpoint(state, path)
    tmp = out / f".{LAST}.tmp{os.getpid()}"
    tmp.write_text(name)
    os.replace(tmp, out / LAST)
    if keep > 0:
        periodic = sorted(p for p in out.glob("model_[0-9]*.pth"))
        for old in periodic[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``output_dir/last_checkpoint`` names; None when there is no ``last_checkpoint``.

    Raises:
        MissingCheckpointError: ``last_checkpoint`` names a file that does not exist.
    """
    out = Path(output_dir)
    marker = out / LAST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    p = out / name
    if not name or not p.is_file():
        raise MissingCheckpointError(
            f"{marker} names the checkpoint {name!r}, but {p} does not exist: cannot resume. Restore the file, or "
            f"start a new run without --resume (or in another output folder)."
        )
    return p


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's state, read safely.

    Raises:
        FileNotFoundError, CheckpointError: naming the file (e.g. truncated by a full disk or a copy).
    """
    state = load_checkpoint_file(path)
    required = ("model", "optimizer", "scheduler", "iteration", "consumed_samples", "rng")
    if not isinstance(state, dict) or any(k not in state for k in required):
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a training checkpoint of this package (missing {missing})")
    return state


def remove_orphaned_checkpoint_files(output_dir: str | Path) -> list[Path]:
    """Remove the temporary files that a killed save left in a run folder (``.model_*.pth.*.tmp`` and the
    ``last_checkpoint`` marker's temporary); other files are never touched. Call before a run's first save."""
    out = Path(output_dir)
    removed = remove_orphaned_temporaries(out, CHECKPOINT_NAME)
    for p in out.glob(f".{LAST}.tmp*"):
        if p.is_file() and p.name[len(f".{LAST}.tmp") :].isdigit():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
