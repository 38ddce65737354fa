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

    CPU inference (no autograd, ReLU, dropouts in eval mode; float32 or under CPU autocast) takes
    :func:`_ffn_inference_cpu`, which gives the same values with far less memory traffic.
    """
    if (
        x.device.type == "cpu"
        and activation is F.relu
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not (dropout_hidden.training or dropout_out.training)
        and type(linear1) is nn.Linear
        and type(linear2) is nn.Linear
        and linear1.bias is not None
        and linear2.bias is not None
    ):
        if not torch.is_autocast_enabled("cpu"):
            if x.dtype == linear1.weight.dtype:
                return norm(_ffn_inference_cpu(x, linear1, linear2))
        elif linear1.weight.dtype == torch.float32:
            # autocast: the products in its dtype, the residual sum promoted as ``x + linear2(...)`` would be
            return norm(_ffn_inference_cpu(x, linear1, linear2, torch.get_autocast_dtype("cpu")))
    return norm(x + dropout_out(linear2(dropout_hidden(activation(linear1(x))))))


_FFN_CHUNK_ROWS = 2048


def _ffn_inference_cpu(
    x: Tensor, linear1: nn.Linear, linear2: nn.Linear, compute_dtype: torch.dtype | None = None
) -> Tensor:
    """``x + linear2(relu(linear1(x)))`` for inference on CPU, ``_FFN_CHUNK_ROWS`` tokens at a time.

    Why: the hidden ``(tokens, d_ffn)`` activation is the largest tensor of a layer (165 MB for the pixel
    decoder's 20k tokens x 2048). Allocated whole, every layer pays fresh-page faults on it (glibc serves
    allocations > 32 MB with a new mmap) plus a second buffer for the ReLU, which together cost about as much
    as the matrix products. One reused 16 MB chunk buffer, the ReLU in place and the outputs written straight
    into the result remove that (0.87 -> 0.55 s per encoder layer on one core). Every row is computed by the
    same ``addmm`` as ``F.linear``, so the values are identical.

    Args:
        x: ``(..., C)``. linear1: ``C -> F``. linear2: ``F -> C``.
        compute_dtype: None: everything in ``x.dtype``. A dtype (CPU autocast's, bfloat16 or float16): the two
            products take ``x`` and the weights cast to it, as autocast's ``F.linear`` would, and the residual
            sum is ``x``'s dtype promoted with it (float32 for a float32 ``x``), as ``x + linear2(...)``.

    Returns:
        ``(..., C)`` (before the norm).
    """
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    dt = x.dtype if compute_dtype is None else compute_dtype
    w1, w2 = linear1.weight.to(dt).t(), linear2.weight.to(dt).t()
    b1, b2 = linear1.bias.to(dt), linear2.bias.to(dt)
    src = flat.to(dt)
    with torch.autocast("cpu", enabled=False):  # explicit dtypes and out= below: no autocast dispatch
        out = torch.empty((rows, linear2.out_features), dtype=dt)
        buf = torch.empty((min(rows, _FFN_CHUNK_ROWS), linear1.out_features), dtype=dt)
        for start in range(0, rows, _FFN_CHUNK_ROWS):
            stop = min(start + _FFN_CHUNK_ROWS, rows)
            hidden = buf[: stop - start]
            torch.addmm(b1, src[start:stop], w1, out=hidden)
            hidden.relu_()
            torch.addmm(b2, hidden, w2, out=out[start:stop])
        if out.dtype == torch.promote_types(flat.dtype, dt):
            out += flat
        else:
            out = flat + out
    return out.view(*x.shape[:-1], linear2.out_features)


def xavier_init_deformable_(module: nn.Module) -> None:
    """Deformable DETR's transformer init, in place: ``xavier_uniform_`` on every parameter with ``dim > 1``, then
    each ``MSDeformAttn``'s own ``reset_parameters`` (its offsets need their special grid init, not xavier)."""
    for p in module.parameters():
        if p.dim() > 1:
            torch.nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()
