"""Small layers shared by DETR-family models."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deform_attn import MSDeformAttn

__all__ = ["MLP", "clone_modules", "get_activation_fn", "post_norm_ffn", "xavier_init_deformable_"]


class MLP(nn.Module):
    """Plain feed-forward network: ``num_layers`` Linear layers with ReLU between them (none after the last).

    Submodules are ``layers.0 .. layers.{num_layers-1}`` (same keys as DETR's ``MLP``).

    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def get_activation_fn(name: str):
    """``"relu" | "gelu" | "glu" | "silu"`` -> the functional activation."""
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu, "silu": F.silu}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]


def clone_modules(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def post_norm_ffn(
    x: Tensor,
    linear1: nn.Module,
    activation,
    dropout_hidden: nn.Module,
    linear2: nn.Module,
    dropout_out: nn.Module,
    norm: nn.Module,
) -> Tensor:
    """The residual feed-forward block that ends every post-norm encoder / decoder layer:
    ``norm(x + dropout_out(linear2(dropout_hidden(activation(linear1(x))))))``.

    The layers own the modules (so their parameter names stay ``linear1``/``linear2``/``norm*`` as in the official
    checkpoints); this is only the shared computation. ``x``: ``(..., C)`` -> ``(..., C)``.
    """
    return norm(x + dropout_out(linear2(dropout_hidden(activation(linear1(x))))))


def xavier_init_deformable_(module: nn.Module) -> None:
    """Deformable DETR's transformer init, in place: ``xavier_uniform_`` on every parameter with ``dim > 1``, then
    each ``MSDeformAttn``'s own ``reset_parameters`` (its offsets need their special grid init, not xavier)."""
    for p in module.parameters():
        if p.dim() > 1:
            torch.nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()
