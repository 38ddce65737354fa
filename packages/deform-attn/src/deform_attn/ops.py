"""Dispatch of ``ms_deform_attn`` to the compiled kernels, with the pure-PyTorch path as fallback.

The compiled extension ``deform_attn._C`` defines the ops ``torch.ops.deform_attn.ms_deform_attn`` and
``torch.ops.deform_attn._ms_deform_attn_backward`` and registers their CPU and CUDA kernels (float32,
float64, bfloat16, float16, and bfloat16/float16 values with float32 locations and weights) and their
Autocast kernels. This module adds, with ``torch.library``:

* the autograd formula (backward = the ``_ms_deform_attn_backward`` op; double backward raises),
* fake (meta) kernels, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through the op,

the public wrapper :func:`ms_deform_attn`, which validates the inputs with ``ValueError`` messages naming
the argument and falls back to :func:`~deform_attn.reference.ms_deform_attn_reference` wherever no kernel
exists (extension missing, other devices), and the choice of the CPU kernel copy (:func:`cpu_isa`,
:func:`set_cpu_isa`; ``DEFORM_ATTN_CPU_ISA``, applied at import).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .reference import ms_deform_attn_reference

__all__ = [
    "build_info",
    "cpu_isa",
    "cpu_isas_supported",
    "extension_available",
    "kernel_available",
    "ms_deform_attn",
    "set_cpu_isa",
]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)
CPU_ISAS = ("generic", "avx2", "avx512", "avx512bf16")


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


def _apply_isa_env() -> None:
    """Apply ``DEFORM_ATTN_CPU_ISA`` at import: a bad value fails ``import deform_attn`` with the reason."""
    name = os.environ.get("DEFORM_ATTN_CPU_ISA", "")
    if _C is not None and name:
        try:
            _C.set_cpu_isa(name)
        except (ValueError, RuntimeError) as exc:
            raise type(exc)(f"{exc} [from the environment variable DEFORM_ATTN_CPU_ISA={name!r}]") from None


_apply_isa_env()


def cpu_isa() -> str:
    """The CPU kernel copy in use: ``"generic"``, ``"avx2"``, ``"avx512"`` or ``"avx512bf16"`` (the AVX-512
    copy plus AVX512-BF16 instructions for bfloat16 values). Chosen at run time from the CPU's and OS's
    flags (CPUID/XGETBV), unless forced by ``DEFORM_ATTN_CPU_ISA`` or :func:`set_cpu_isa`.

    Raises:
        RuntimeError: the extension is not built.
    """
    if _C is None:
        raise RuntimeError(f"deform_attn: no CPU kernels ({_MISSING_REASON})")
    return str(_C.cpu_isa())


def cpu_isas_supported() -> list[str]:
    """The CPU kernel copies this CPU and OS can run (``[]`` without the extension)."""
    return [] if _C is None else [str(x) for x in _C.cpu_isas_supported()]


def set_cpu_isa(name: str) -> None:
    """Select the CPU kernel copy for this process (all threads): ``"auto"`` (the best the CPU supports),
    ``"generic"``, ``"avx2"``, ``"avx512"`` or ``"avx512bf16"``. Every copy computes the same op; tests use
    this to check each copy in one process.

    Raises:
        ValueError: unknown name.
        RuntimeError: this CPU (or OS) lacks the copy; the message names the missing flags and the CPU's.
    """
    if _C is None:
        raise RuntimeError(f"deform_attn: no CPU kernels ({_MISSING_REASON})")
    if not isinstance(name, str):
        raise ValueError(f"set_cpu_isa: name must be a str, got {type(name).__name__}")
    _C.set_cpu_isa(name)


def extension_available() -> bool:
    """True when the compiled kernels are loaded."""
    return _C is not None


def kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when a compiled kernel handles ``(device, dtype)``; otherwise the reference is used."""
    if _C is None:
        return False
    device_type = torch.device(device).type
    if device_type == "cpu":
        return dtype in _DTYPES
    if device_type == "cuda":
        return bool(_C.with_cuda) and dtype in _DTYPES
    return False


def build_info() -> str:
    """One line saying which kernels this install has and which CPU copy runs, e.g. ``deform_attn: kernels
    CPU (float32, float64, bfloat16, float16) copy avx512bf16 [supported: generic, avx2, avx512, avx512bf16];
    CUDA 13.0 archs 800,900 (float32, float64, bfloat16, float16); torch 2.14.1``.
    """
    if _C is None:
        return f"deform_attn: pure-PyTorch path only ({_MISSING_REASON}); torch {torch.__version__}"
    dtypes = "float32, float64, bfloat16, float16"
    parts = [f"CPU ({dtypes}) copy {_C.cpu_isa()} [supported: {', '.join(_C.cpu_isas_supported())}]"]
    if _C.with_cuda:
        parts.append(f"{_C.cuda_build_info()} ({dtypes})")
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
        return value.new_empty((n, sampling_locations.shape[1], m * d))  # in value's dtype

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


def dtypes_supported(value: torch.dtype, locations: torch.dtype, weights: torch.dtype) -> bool:
    """The op's dtype rule: all three of one dtype (float32, float64, bfloat16, float16), or value in
    bfloat16/float16 with float32 locations and weights (the gathered value, the bandwidth, is halved while
    the locations keep float32 precision; bfloat16 locations have 8 mantissa bits, ~0.3 px on a 150-wide
    map)."""
    if value not in _DTYPES:
        return False
    same = locations == value and weights == value
    return same or (value in _HALF and locations == torch.float32 and weights == torch.float32)


def _dtypes_after_autocast(
    value: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """The dtypes the kernel will see: inside torch.autocast for value's device, the Autocast kernel casts
    value to the autocast dtype and the locations / weights to float32 (float64 stays, as autocast does)."""
    dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    device_type = value.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return dtypes
    low = torch.get_autocast_dtype(device_type)
    v, loc, w = (d if d == torch.float64 or not d.is_floating_point else None for d in dtypes)
    return (v or low, loc or torch.float32, w or torch.float32)


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
    if not dtypes_supported(*_dtypes_after_autocast(value, sampling_locations, attention_weights)):
        raise ValueError(
            f"unsupported dtypes: value {value.dtype}, sampling_locations {sampling_locations.dtype}, "
            f"attention_weights {attention_weights.dtype}; all three must be one of float32, float64, "
            "bfloat16, float16, or value bfloat16/float16 with float32 sampling_locations and attention_weights"
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
        Tensor[N, Q, M * D] in value's dtype.

    dtypes: value, sampling_locations and attention_weights all float32, float64, bfloat16 or float16, or
    value bfloat16/float16 with float32 sampling_locations and attention_weights (the only mixed form).
    Accumulation is float32 (float64 for float64); 16-bit outputs and gradients are rounded to nearest even;
    each gradient has its input's dtype. Under ``torch.autocast(device, dtype=bfloat16/float16)`` the op
    casts value to the autocast dtype and the locations and weights to float32 (float64 is never cast).

    Non-finite inputs propagate like the ``F.grid_sample`` reference: a NaN or infinite location or
    attention weight makes that head's output NaN (and its gradients NaN as grid_sample's backward gives
    them), NaN/inf values propagate through every in-map corner, also with zero weight.

    Raises:
        ValueError: on inconsistent shapes, dtypes or devices, naming the argument.
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step)
    n, _, m, d = value.shape
    q = sampling_locations.shape[1]
    if n == 0 or q == 0 or m * d == 0:
        return value.new_zeros((n, q, m * d))
    if not kernel_available(value.device, value.dtype):
        if torch.is_autocast_enabled(value.device.type) and value.device.type in ("cpu", "cuda"):
            vt, lt, _ = _dtypes_after_autocast(value, sampling_locations, attention_weights)
            value, sampling_locations, attention_weights = (
                value.to(vt),
                sampling_locations.to(lt),
                attention_weights.to(lt),
            )
        if value.dtype != sampling_locations.dtype:  # the mixed form: float32 arithmetic, value's dtype out
            return ms_deform_attn_reference(
                value.float(), spatial_shapes, level_start_index, sampling_locations, attention_weights
            ).to(value.dtype)
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
