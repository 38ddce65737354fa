"""3x3 convolutions through NNPACK's Winograd kernels, for CPU inference.

PyTorch ships NNPACK but its ``conv2d`` only picks it for batches of 16 or more; at batch 1 a 3x3 convolution runs
as a direct oneDNN convolution. NNPACK's Winograd F(6x6, 3x3) transform needs ~4x fewer multiplications: the
pixel decoder's 1/4-resolution 3x3 convolution (256 -> 256 channels at 200x304, 72 GFLOP direct) drops from
~410 ms to ~160 ms on two AVX2 cores. The price is precision: Winograd's transforms add rounding error of about
1e-5 of the output's magnitude (direct float32: ~2e-6), still far below what any model output can see; cuDNN
picks Winograd kernels for the official code on GPUs in the same way.

Used only where it is exact in all other respects: CPU, float32, no autograd, not under ``torch.compile`` or
export (which trace the plain ``conv2d``), stride 1, dilation 1, one group, zero padding. PyTorch's own switch
turns it off: ``torch.backends.nnpack.set_flags(False)`` (or ``with torch.backends.nnpack.flags(enabled=False)``).
NNPACK runs on its own thread pool, which PyTorch sizes once, from ``torch.get_num_threads()`` at the first NNPACK
call: call ``torch.set_num_threads`` before the first inference.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv2d", "conv2d_inference", "to_contiguous_nchw", "winograd_applies"]


def _nnpack_ready() -> bool:
    # is_available() (torch._nnpack_available) also initialises NNPACK: the op fails without that
    return bool(torch._C._get_nnpack_enabled()) and torch.backends.nnpack.is_available()


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


def winograd_applies(
    x: Tensor,
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> bool:
    """Whether :func:`conv2d` runs ``x (B, C, H, W)`` * ``weight (Cout, C, kh, kw)`` through NNPACK."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 4
        and tuple(weight.shape[-2:]) == (3, 3)
        and _pair(stride) == (1, 1)
        and _pair(dilation) == (1, 1)
        and groups == 1
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _nnpack_ready()
    )


def to_contiguous_nchw(x: Tensor) -> Tensor:
    """``x (B, C, H, W)`` in the default (NCHW) layout. A channels-last ``x`` is transposed one image at a time
    as a matrix ``(H*W, C) -> (C, H*W)``: PyTorch's 2-d transposed copy is ~3x faster on CPU than the generic
    permuted copy that ``x.contiguous()`` (or a batched 3-d transpose) makes (20 vs 60 ms at 256x200x304)."""
    if x.is_contiguous():
        return x
    if x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view
        out = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device)
        for i in range(b):
            out[i].view(c, h * w).copy_(rows[i].t())
        return out
    return x.contiguous()


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` (zero padding given as numbers), through NNPACK's Winograd kernels when
    :func:`winograd_applies`; the output is then contiguous NCHW whatever the layout of ``x``."""
    if winograd_applies(x, weight, stride, dilation, groups):
        try:
            return torch._nnpack_spatial_convolution(
                to_contiguous_nchw(x), weight.contiguous(), bias, list(_pair(padding))
            )
        except RuntimeError:  # NNPACK refused this input (it reports no reason): the direct convolution
            pass
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_inference(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv``'s convolution of ``x (B, Cin, H, W)`` through :func:`conv2d` (hooks of ``conv`` are not called)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv._conv_forward(x, conv.weight, conv.bias)
    stride, padding, dilation = (cast(tuple[int, int], t) for t in (conv.stride, conv.padding, conv.dilation))
    return conv2d(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups)
