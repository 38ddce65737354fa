"""Optimizer and learning-rate schedule with the official Mask DINO parameter groups.

As the official ``build_optimizer`` (MaskFormer lineage): one group per parameter;
- parameters whose module path contains ``backbone`` get ``lr * backbone_multiplier`` (0.1);
- parameters of normalisation layers (BatchNorm/SyncBN/GroupNorm/LayerNorm/InstanceNorm/LocalResponseNorm)
  get ``weight_decay_norm`` (0.0), ``nn.Embedding`` weights ``weight_decay_embed`` (0.0), and Swin's
  ``relative_position_bias_table``/``absolute_pos_embed`` no weight decay; everything else (including
  free ``nn.Parameter`` tensors such as the encoder's ``level_embed``) gets ``weight_decay``.
- gradient clipping of type ``full_model``: the L2 norm of all gradients together is clipped (0.01).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from maskdino.config import SolverConfig

__all__ = ["WarmupSchedule", "build_lr_scheduler", "build_optimizer", "clip_gradients", "param_groups"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def param_groups(model: nn.Module, cfg: SolverConfig) -> list[dict[str, Any]]:
    """One group per trainable parameter with its lr and weight decay (and its name, for inspection)."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue  # shared modules (e.g. the box head used by every decoder layer) appear once
            seen.add(id(p))
            lr = cfg.base_lr
            wd = cfg.weight_decay
            if "backbone" in module_name:
                lr = lr * cfg.backbone_multiplier
            if pname in NO_DECAY_NAMES:
                wd = 0.0
            if isinstance(module, NORM_TYPES) or type(module).__name__ in (
                "FrozenBatchNorm2d",
                "LayerNorm2d",
            ):
                wd = cfg.weight_decay_norm
            if isinstance(module, nn.Embedding):
                wd = cfg.weight_decay_embed
            groups.append(
                {"params": [p], "lr": lr, "weight_decay": wd, "name": f"{module_name}.{pname}".lstrip(".")}
            )
    return groups


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        betas = (float(cfg.betas[0]), float(cfg.betas[1]))
        return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=0.9, weight_decay=cfg.weight_decay)


class WarmupSchedule:
    """LR factor at an iteration: linear warmup from ``warmup_factor`` to 1 over ``warmup_iters``, then
    multiplied by ``gamma`` at each of ``steps`` (multistep) or a half cosine to 0 at ``max_iter``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, cfg: SolverConfig, max_iter: int) -> None:
        self.kind = cfg.lr_scheduler
        self.steps = sorted(int(s) for s in cfg.steps)
        self.gamma = float(cfg.gamma)
        self.warmup_iters = int(cfg.warmup_iters)
        self.warmup_factor = float(cfg.warmup_factor)
        self.max_iter = int(max_iter)

    def __call__(self, it: int) -> float:
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iter) / max(self.max_iter, 1)))
        else:
            factor = self.gamma ** sum(1 for s in self.steps if it >= s)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SolverConfig, max_iter: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(cfg, max_iter))


def clip_gradients(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
    """Full-model clipping; returns the total gradient norm before clipping (None when off)."""
    if max_norm <= 0:
        return None
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
