"""Training checkpoints: model, optimizer, scheduler, AMP scaler, iteration, data position and RNG states.

Files are written atomically (temp file + ``os.replace``), so an interrupted save never leaves a corrupt
checkpoint behind; ``last_checkpoint`` (a text file with the file name) is updated after the file is in place.
Everything stored is tensors and plain Python containers, so loading works with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "atomic_save",
    "capture_rng_state",
    "find_last_checkpoint",
    "load_model_weights",
    "load_training_checkpoint",
    "restore_rng_state",
    "save_training_checkpoint",
]

LAST = "last_checkpoint"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` (atomic on POSIX)."""
    try:
        from maskdino.checkpoint import save_checkpoint
    except ImportError:  # the model helpers' module not present: same behaviour, local implementation
        save_checkpoint = None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if save_checkpoint is not None:
        save_checkpoint(obj, path)
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors/plain containers."""
    py = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global RNG is what user code seeds)
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],  # fmt: skip
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
    """Write ``output_dir/name`` atomically, point ``last_checkpoint`` at it, prune old periodic ones."""
    out = Path(output_dir)
    path = out / name
    atomic_save(state, path)
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
    out = Path(output_dir)
    marker = out / LAST
    if marker.is_file():
        p = out / marker.read_text().strip()
        if p.is_file():
            return p
    return None


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    return obj


def load_model_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load weights from our training checkpoint, a plain state dict (.pth/.safetensors), or an official
    Mask DINO checkpoint (converted through ``maskdino.checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    sd = None
    try:
        from maskdino.checkpoint import load_state_dict_file

        sd = load_state_dict_file(path)
    except ImportError:
        pass
    if sd is None:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = _extract_state_dict(sd)
    own = model.state_dict()
    if strict and set(sd) != set(own):
        try:
            from maskdino.checkpoint import convert_official_state_dict

            converted = convert_official_state_dict(sd)
            if set(converted) == set(own) or len(set(converted) & set(own)) > len(set(sd) & set(own)):
                sd = converted
        except Exception:  # not an official checkpoint either: report the original mismatch below
            pass
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path}: weights do not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
