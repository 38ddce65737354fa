"""Weights shared by both models: random official weights (every tensor, FrozenBN included), conversion to ours."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from detr_core.checkpoint import LoadReport, load_into_model, match_aliases
from maskdino.checkpoints import ALIASES, convert_official_state_dict

if TYPE_CHECKING:
    from maskdino.modeling.model import MaskDINO

__all__ = ["key_list", "load_converted", "randomize_official", "save_official_checkpoint"]


@torch.no_grad()
def randomize_official(model: Any, seed: int) -> None:
    """Make every constant-initialised tensor of the official model non-trivial, in place.

    FrozenBN statistics and affine parameters of the backbone get plausible random values (a small gamma on the last
    norm of each bottleneck keeps a random ResNet from blowing up); LayerNorm / GroupNorm gammas become
    ``1 + noise``; biases and zero-initialised layers get ``0.02 * noise``. Tensors already random are kept.

    The bias of the encoder-proposal projection (``predictor.enc_output``) is set to zero: tokens whose proposal
    falls outside the image have their memory zeroed, so they all share ONE feature vector, ``LayerNorm(bias)``; with
    a random bias that vector scores like a real token and its hundreds of copies can fill most of the two-stage
    top-k (identical queries, exact ties everywhere downstream). With a zero bias they score ~0, below the real
    tokens, as in a trained model.
    """
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for key, v in model.state_dict().items():
        if not v.is_floating_point() or v.data_ptr() in seen or key.startswith("criterion."):
            continue
        seen.add(v.data_ptr())
        noise = torch.randn(v.shape, generator=g).to(v)
        if key.endswith("predictor.enc_output.bias"):
            v.zero_()
            continue
        if key.startswith("backbone.") and ".norm." in key:
            u = torch.rand(v.shape, generator=g).to(v)
            if key.endswith("running_var"):
                v.copy_(0.5 + 1.5 * u)
            elif key.endswith("running_mean") or key.endswith("bias"):
                v.copy_(0.1 * noise)
            elif key.endswith("weight"):
                v.copy_(0.1 + 0.3 * u if ".conv3.norm" in key else 0.5 + u)
            continue
        if v.numel() > 1 and float(v.std()) > 0:
            continue
        if key.endswith("weight") and v.dim() == 1 and bool(torch.all(v == 1)):
            v.copy_(1 + 0.1 * noise)
        else:
            v.add_(0.02 * noise)


def key_list(model: Any) -> list[tuple[str, tuple[int, ...], str | None]]:
    """``(key, shape, tied_to)`` of every official tensor but the criterion's, sorted by key; ``tied_to`` is the
    first key (in sorted order) holding the same tensor (the official state dict repeats shared modules)."""
    sd = model.state_dict()
    first: dict[tuple, str] = {}
    out = []
    for key in sorted(sd):
        if key.startswith("criterion."):
            continue
        v = sd[key]
        src = first.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride())), key)
        out.append((key, tuple(v.shape), None if src == key else src))
    return out


def load_converted(ours: MaskDINO, official_sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], LoadReport]:
    """Convert an official state dict with our converter and load it into ``ours`` (non-strict, so that the report
    lists every problem). Returns ``(converted, report)``."""
    converted = match_aliases(convert_official_state_dict(official_sd), ours.state_dict().keys(), ALIASES)
    return converted, load_into_model(ours, converted, strict=False)


def save_official_checkpoint(sd: dict[str, Tensor], path: Path) -> None:
    """An official-layout checkpoint file, as detectron2 writes them: ``{"model": state_dict}``."""
    torch.save({"model": {k: v.detach().cpu() for k, v in sd.items()}}, path)
