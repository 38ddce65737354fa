"""Dispatch of ``ms_deform_attn`` to the compiled kernels, with the pure-PyTorch path as fallback.

The compiled extension ``deform_attn._C`` defines the ops ``torch.ops.deform_attn.ms_deform_attn`` and
``torch.ops.deform_attn._ms_deform_attn_backward`` and registers their CPU (float32, float64) and CUDA
(float32, float64, float16, bfloat16) kernels. This module adds, with ``torch.library``:

* the autograd formula (backward = the ``_ms_deform_attn_backward`` op; double backward raises),
* fake (meta) kernels, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through the op,

and the public wrapper :func:`ms_deform_attn`, which validates the inputs with ``ValueError`` messages
naming the argument and falls back to :func:`~deform_attn.reference.ms_deform_attn_reference` wherever no
kernel exists (extension missing, float16/bfloat16 on CPU, other devices).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .reference import ms_deform_attn_reference

__all__ = ["build_info", "extension_available", "kernel_available", "ms_deform_attn"]

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load_extension() -> tuple[ModuleType | None, str]:
    """Import ``deform_attn._C``; returns ``(module or None, reason it is missing)``."""
    if os.environ.get("DEFORM_ATTN_NO_EXT") == "1":
        return None, "disabled by DEFORM_ATTN_NO_EXT=1"
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        # A missing module means it was never built; an undefined symbol means it was built against a
        # different torch than the one installed now.
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C":
            return None, "the extension deform_attn._C was not built"
        return None, f"deform_attn._C failed to load (built for another torch version?): {exc}"
    except OSError as exc:
        return None, f"deform_attn._C failed to load: {exc}"
    return _C, ""


_C, _MISSING_REASON = _load_extension()
if _C is None and os.environ.get("DEFORM_ATTN_NO_EXT") != "1":
    warnings.warn(
        f"deform_attn: {_MISSING_REASON}; using the pure-PyTorch ms_deform_attn (slower, more memory). "
        "Rebuild with `pip install --no-build-isolation packages/deform-attn`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    """True when the compiled kernels are loaded."""
    return _C is not None


def kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when a compiled kernel handles ``(device, dtype)``; otherwise the reference is used."""
    if _C is None:
        return False
    device_type = torch.device(device).type
    if device_type == "cpu":
        return dtype in _CPU_DTYPES
    if device_type == "cuda":
        return bool(_C.with_cuda) and dtype in _CUDA_DTYPES
    return False


def build_info() -> str:
    """One line saying which kernels this install has, e.g.
    ``deform_attn: kernels CPU (float32, float64); CUDA 13.0 archs 800,900 (float32, float64, float16, bfloat16)``.
    """
    if _C is None:
        return f"deform_attn: pure-PyTorch path only ({_MISSING_REASON}); torch {torch.__version__}"
    parts = ["CPU (float32, float64)"]
    if _C.with_cuda:
        parts.append(f"{_C.cuda_build_info()} (float32, float64, float16, bfloat16)")
    else:
        parts.append("no CUDA kernel (built without a CUDA toolkit)")
    return f"deform_attn: kernels {'; '.join(parts)}; torch {torch.__version__}"


if _C is not None:

    @torch.library.register_fake("deform_attn::ms_deform_attn")
    def _ms_deform_attn_fake(
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int,
    ) -> Tensor:
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("deform_attn::_ms_deform_attn_backward")
    def _ms_deform_attn_backward_fake(
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        grad_output: Tensor,
        im2col_step: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step = inputs
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.im2col_step = im2col_step

    def _backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.deform_attn._ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
            ctx.im2col_step,
        )
        needs = ctx.needs_input_grad
        return (
            grad_value if needs[0] else None,
            None,
            None,
            grad_locations if needs[3] else None,
            grad_weights if needs[4] else None,
            None,
        )

    torch.library.register_autograd("deform_attn::ms_deform_attn", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:
        raise RuntimeError(
            "deform_attn: double backward (a gradient of the gradient, e.g. create_graph=True followed by a "
            "second backward) is not implemented for ms_deform_attn; use ms_deform_attn_reference for that"
        )

    def _no_setup(ctx: Any, inputs: tuple, output: Any) -> None:
        return None

    torch.library.register_autograd(
        "deform_attn::_ms_deform_attn_backward", _no_double_backward, setup_context=_no_setup
    )


def _tracing(*tensors: Tensor) -> bool:
    """True under torch.compile / torch.export, where data-dependent checks must not run."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(t) for t in tensors)


def _validate(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int,
) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Q, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            f"attention_weights must be (N, Q, M, L, P), got shape {tuple(attention_weights.shape)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must be (L, 2) rows of (H, W), got shape {tuple(spatial_shapes.shape)}"
        )
    if spatial_shapes.dtype != torch.int64:
        raise ValueError(f"spatial_shapes must be int64, got {spatial_shapes.dtype}")
    if level_start_index.dtype != torch.int64:
        raise ValueError(f"level_start_index must be int64, got {level_start_index.dtype}")
    n, s, m, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"level_start_index must be (L,) = ({num_levels},) like spatial_shapes, "
            f"got shape {tuple(level_start_index.shape)}"
        )
    ln, _, lm, ll, _, _ = sampling_locations.shape
    if ln != n or lm != m or ll != num_levels:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} must be (N={n}, Q, M={m}, L={num_levels}, P, 2) "
            f"to match value {tuple(value.shape)} and spatial_shapes {tuple(spatial_shapes.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} must be (N, Q, M, L, P) = "
            f"{tuple(sampling_locations.shape[:5])} like sampling_locations"
        )
    if not value.is_floating_point():
        raise ValueError(f"value must be floating point, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype:
            raise ValueError(
                f"{name} has dtype {named[name].dtype}, value has {value.dtype}; they must match"
            )
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(
                f"{name} is on {t.device}, value is on {value.device}; all inputs must be on one device"
            )
    if not isinstance(im2col_step, int) or im2col_step <= 0:
        raise ValueError(f"im2col_step must be a positive int, got {im2col_step!r}")
    if _tracing(*named.values()):
        return
    # Data-dependent checks (one small device-to-host copy on CUDA).
    shapes = spatial_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive (H, W) rows, got {shapes}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != s:
        raise ValueError(f"value has S = {s} positions but spatial_shapes {shapes} sum to {sum(sizes)}")
    expected = [sum(sizes[:i]) for i in range(len(sizes))]
    if level_start_index.tolist() != expected:
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} is inconsistent with spatial_shapes {shapes}: "
            f"expected {expected}"
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int = 64,
) -> Tensor:
    """Multi-scale deformable attention (bilinear sampling as ``F.grid_sample``, align_corners=False, zeros).

    Args:
        value (Tensor[N, S, M, D]): values of all levels, flattened level after level.
        spatial_shapes (Tensor[L, 2], int64): ``(H, W)`` per level, ``sum(H * W) == S``.
        level_start_index (Tensor[L], int64): offset of each level in ``S`` (exclusive cumsum of ``H * W``).
        sampling_locations (Tensor[N, Q, M, L, P, 2]): ``(x, y)`` normalised to ``[0, 1]``; points outside
            sample zeros.
        attention_weights (Tensor[N, Q, M, L, P]): weight of each sample (usually softmax over ``L * P``).
        im2col_step: accepted for compatibility with the original op; the kernels need no im2col buffer and
            ignore it (no divisibility rule on the batch).

    Returns:
        Tensor[N, Q, M * D].

    Raises:
        ValueError: on inconsistent shapes, dtypes or devices, naming the argument.
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step)
    n, _, m, d = value.shape
    q = sampling_locations.shape[1]
    if n == 0 or q == 0 or m * d == 0:
        return value.new_zeros((n, q, m * d))
    if not kernel_available(value.device, value.dtype):
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.deform_attn.ms_deform_attn(
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        im2col_step,
    )
