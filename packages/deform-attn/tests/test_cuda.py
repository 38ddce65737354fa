"""CUDA kernels (all dtypes) against the float64 reference; and that nvcc-equipped builds include them."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import assert_close_rel, cast_inputs, grads, make_inputs, tolerance

import deform_attn
from deform_attn import ms_deform_attn, ms_deform_attn_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
WHAT = ("output", "grad_value", "grad_locations", "grad_weights")
# Relative to the largest magnitude; 16-bit inputs are rounded before the (float32-accumulated) kernel.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


@pytest.mark.skipif(not _nvcc_present(), reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.skipif(not deform_attn.extension_available(), reason="extension not built")
@pytest.mark.skipif(os.environ.get("DEFORM_ATTN_NO_CUDA") == "1", reason="CPU-only build requested")
def test_cuda_kernel_compiled_when_nvcc_exists():
    info = deform_attn.build_info()
    assert "CUDA" in info and "archs" in info and "no CUDA kernel" not in info, info
    assert deform_attn.kernel_available("cuda", torch.bfloat16)


@cuda
@pytest.mark.skipif(not deform_attn.kernel_available("cuda", torch.float32), reason=deform_attn.build_info())
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(
    "shapes,d",
    [([(5, 7), (3, 2), (1, 1)], 5), ([(20, 30), (10, 15), (5, 8), (3, 4)], 32), ([(9, 9), (4, 4)], 70)],
)
def test_cuda_matches_reference(dtype, shapes, d):
    inputs64 = make_inputs(shapes, n=2, q=50, m=4, d=d, p=4, seed=d)
    inputs = tuple(t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in inputs64)
    grad_out = torch.randn((2, 50, 4 * d), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = grads(ms_deform_attn_reference, inputs64, grad_out)
    got = grads(ms_deform_attn, inputs, grad_out.to("cuda", dtype))
    for what, a, e in zip(WHAT, got, expected):
        assert a.dtype == dtype and a.is_cuda
        assert_close_rel(a.cpu(), e, TOLERANCE[dtype], f"{dtype} {what}")


@cuda
@pytest.mark.skipif(not deform_attn.kernel_available("cuda", torch.float32), reason=deform_attn.build_info())
@pytest.mark.parametrize(
    "value_dtype,loc_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=lambda t: str(t).split(".")[-1],
)
def test_cuda_low_precision_forms(value_dtype, loc_dtype):
    """Against the float64 reference on the same rounded inputs, each result in its input's dtype."""
    inputs, exact = cast_inputs(
        make_inputs([(20, 30), (10, 15), (3, 4)], n=2, q=50, m=4, d=32, p=4), value_dtype, loc_dtype
    )
    g = torch.randn(2, 50, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
        value_dtype
    )
    expected = grads(ms_deform_attn_reference, exact, g.double())
    got = grads(ms_deform_attn, tuple(t.cuda() for t in inputs), g.cuda())
    for what, a, e, dt in zip(WHAT, got, expected, (value_dtype, value_dtype, loc_dtype, loc_dtype)):
        assert a.dtype == dt and a.is_cuda
        # grad_value sums atomics in float32 in any order: the float32 budget of tolerance() covers it.
        assert_close_rel(a.cpu(), e, tolerance(dt), f"{value_dtype}/{loc_dtype} {what}")


@cuda
@pytest.mark.skipif(not deform_attn.kernel_available("cuda", torch.float32), reason=deform_attn.build_info())
def test_cuda_non_finite_like_reference():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2)], n=1, q=3, m=2, d=3, p=2)
    loc, attn, value = loc.clone(), attn.clone(), value.clone()
    loc[0, 1, 0, 0, 1, 0] = float("nan")
    loc[0, 0, 1, 0, 0, 1] = float("inf")
    attn[0, 2, 1, 1, 0] = float("-inf")
    value[0, 3, 0, 1] = float("nan")
    expected = grads(ms_deform_attn_reference, (value, shapes, starts, loc, attn))
    got = grads(ms_deform_attn, tuple(t.cuda() for t in (value, shapes, starts, loc, attn)))
    for what, a, e in zip(WHAT, got, expected):
        a = a.cpu()
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf()), what
        fin = e.isfinite()
        assert_close_rel(a[fin], e[fin], 1e-10, what)


@cuda
@pytest.mark.skipif(not deform_attn.kernel_available("cuda", torch.float32), reason=deform_attn.build_info())
def test_cuda_autocast():
    inputs = tuple(t.cuda() for t in make_inputs([(6, 7)], n=2, q=9, m=2, d=32, p=3, dtype=torch.float32))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ms_deform_attn(*inputs)
    assert out.dtype == torch.bfloat16


@cuda
@pytest.mark.skipif(not deform_attn.kernel_available("cuda", torch.float32), reason=deform_attn.build_info())
def test_cuda_empty_and_outside():
    value, shapes, starts, loc, attn = make_inputs([(4, 4)], device="cuda")
    out = ms_deform_attn(value, shapes, starts, torch.full_like(loc, 7.0), attn)
    assert torch.count_nonzero(out) == 0
    assert ms_deform_attn(value[:0], shapes, starts, loc[:0], attn[:0]).shape == (0, loc.shape[1], 6)
