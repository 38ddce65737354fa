"""Every CPU kernel copy (generic, avx2, avx512, avx512bf16) the machine can run, in one process: values and
the three gradients against the float64 reference for every dtype form, determinism across thread counts,
non-finite inputs, and the run-time choice of the copy (DEFORM_ATTN_CPU_ISA, set_cpu_isa, errors).

Copies the CPU lacks are skipped with the missing flags named. To run the whole op suite under one copy,
set DEFORM_ATTN_CPU_ISA for the pytest process (the other test files then use that copy)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close_rel, cast_inputs, grads, make_inputs, tolerance

import deform_attn
from deform_attn import ms_deform_attn, ms_deform_attn_reference

pytestmark = pytest.mark.skipif(not deform_attn.extension_available(), reason=deform_attn.build_info())

WHAT = ("output", "grad_value", "grad_locations", "grad_weights")
ISAS = ("generic", "avx2", "avx512", "avx512bf16")
# (value dtype, locations / weights dtype): all-same forms and the one mixed form.
DTYPE_FORMS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
# Compile-time head sizes (16, 32, 64) and run-time ones (odd, 1).
CASES = [
    ([(5, 7), (3, 2), (1, 1)], 5),
    ([(6, 9), (3, 4)], 16),
    ([(7, 5), (4, 3), (2, 2), (1, 1)], 32),
    ([(4, 6)], 64),
]


def _missing_flags(isa: str) -> str:
    try:
        deform_attn.set_cpu_isa(isa)
    except RuntimeError as exc:
        return str(exc)
    return ""


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test under one kernel copy; skips (naming the missing CPU flags) where the CPU lacks it."""
    before = deform_attn.cpu_isa()
    missing = _missing_flags(request.param)
    if missing:
        pytest.skip(missing)
    yield request.param
    deform_attn.set_cpu_isa(before)


def _inputs(shapes, d, seed, q=7, m=3, p=3):
    return make_inputs(shapes, n=2, q=q, m=m, d=d, p=p, seed=seed)


@pytest.mark.parametrize("shapes,d", CASES, ids=[f"D{d}" for _, d in CASES])
def test_copy_matches_reference_float64(isa, shapes, d):
    inputs = _inputs(shapes, d, seed=d)
    for what, a, e in zip(WHAT, grads(ms_deform_attn, inputs), grads(ms_deform_attn_reference, inputs)):
        assert_close_rel(a, e, tolerance(torch.float64), f"{isa} {what}")


@pytest.mark.parametrize("value_dtype,loc_dtype", DTYPE_FORMS, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shapes,d", CASES, ids=[f"D{d}" for _, d in CASES])
def test_copy_matches_reference_low_precision(isa, shapes, d, value_dtype, loc_dtype):
    """Each result against the float64 reference on the same rounded inputs, within its dtype's tolerance;
    every result is in its input's dtype (output and grad_value: value's; the others: the locations')."""
    inputs, exact = cast_inputs(_inputs(shapes, d, seed=d + 1), value_dtype, loc_dtype)
    g = torch.randn(2, 7, 3 * d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    got = grads(ms_deform_attn, inputs, g.to(value_dtype))
    expected = grads(ms_deform_attn_reference, exact, g.to(value_dtype).double())
    dtypes = (value_dtype, value_dtype, loc_dtype, loc_dtype)
    for what, a, e, dt in zip(WHAT, got, expected, dtypes):
        assert a.dtype == dt, f"{what}: {a.dtype} != {dt}"
        assert_close_rel(a, e, tolerance(dt), f"{isa} {value_dtype}/{loc_dtype} {what}")


@pytest.mark.parametrize("value_dtype,loc_dtype", [DTYPE_FORMS[0], DTYPE_FORMS[1], DTYPE_FORMS[4]])
def test_copy_deterministic_across_threads(isa, value_dtype, loc_dtype):
    """Forward and backward are bitwise independent of the thread count (1 vs 2)."""
    inputs, _ = cast_inputs(
        make_inputs([(9, 11), (5, 6)], n=2, q=70, m=4, d=32, p=4, seed=4), value_dtype, loc_dtype
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(ms_deform_attn, inputs)
        torch.set_num_threads(2)
        two = grads(ms_deform_attn, inputs)
    finally:
        torch.set_num_threads(threads)
    for what, a, b in zip(WHAT, one, two):
        assert torch.equal(a, b), f"{isa} {what} differs between 1 and 2 threads"


NAN, INF = float("nan"), float("inf")
# name -> edit of (value, locations, weights); index (n, q, m, l, p[, xy]) of a sample inside the maps.
NON_FINITE = {
    "location x NaN": lambda v, loc, a: loc.__setitem__((0, 1, 0, 0, 1, 0), NAN),
    "location y NaN": lambda v, loc, a: loc.__setitem__((0, 1, 0, 0, 1, 1), NAN),
    "location x +inf": lambda v, loc, a: loc.__setitem__((0, 1, 0, 0, 1, 0), INF),
    "location x -inf": lambda v, loc, a: loc.__setitem__((0, 1, 0, 1, 0, 0), -INF),
    "location y +inf": lambda v, loc, a: loc.__setitem__((0, 0, 1, 0, 0, 1), INF),
    "location huge": lambda v, loc, a: loc.__setitem__((0, 1, 0, 0, 1, 0), 1e30),
    "weight NaN": lambda v, loc, a: a.__setitem__((0, 1, 0, 0, 1), NAN),
    "weight +inf": lambda v, loc, a: a.__setitem__((0, 1, 0, 0, 1), INF),
    "weight -inf": lambda v, loc, a: a.__setitem__((0, 2, 1, 1, 0), -INF),
    "value NaN under zero weights": lambda v, loc, a: (v.__setitem__((0, slice(None), 0, 0), NAN), a.zero_()),
    "value NaN at one position": lambda v, loc, a: v.__setitem__((0, 3, 0, 1), NAN),
    "value +inf": lambda v, loc, a: v.__setitem__((0, slice(None), 0, 0), INF),
    "value -inf at one position": lambda v, loc, a: v.__setitem__((0, 5, 1, 2), -INF),
}


def _non_finite_inputs(edit, dtype):
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2)], n=1, q=3, m=2, d=3, p=2, seed=0)
    value, loc, attn = value.clone(), loc.clone(), attn.clone()
    edit(value, loc, attn)
    return (value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_copy_non_finite_like_reference(isa, case, dtype):
    """NaN / inf in locations, weights or values: the same NaN / +-inf entries as the grid_sample
    reference (computed in float64 on the same inputs) in the output and all three gradients, and the
    finite entries close."""
    inputs = _non_finite_inputs(NON_FINITE[case], dtype)
    exact = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    got = grads(ms_deform_attn, inputs)
    expected = grads(ms_deform_attn_reference, exact)
    if case.startswith(("location", "weight")) and "huge" not in case:
        assert not expected[0].isfinite().all(), "the case must make the reference non-finite"
    for what, a, e in zip(WHAT, got, expected):
        a = a.double()
        assert torch.equal(a.isnan(), e.isnan()), f"{case} {what}: NaN at {a.isnan()} vs {e.isnan()}"
        assert torch.equal(a.isposinf(), e.isposinf()) and torch.equal(a.isneginf(), e.isneginf()), (
            f"{case} {what}: inf pattern differs"
        )
        fin = e.isfinite()
        if fin.any():
            assert_close_rel(a[fin], e[fin], tolerance(dtype) * 4, f"{case} {what} (finite entries)")


def test_all_outside_is_exactly_zero(isa):
    value, shapes, starts, loc, attn = make_inputs([(4, 4)], n=1, q=3, m=2, d=16, p=2)
    out = ms_deform_attn(value, shapes, starts, torch.full_like(loc, 7.0), attn)
    assert torch.count_nonzero(out) == 0


def _one_row_problem(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A 1 x W map (W = a power of two >= 2n, so every location below is exact in float32) with locations
    at the centres of the even pixels: the output of query k is exactly 1 x the value at pixel 2k (the
    other corners are outside or hold zeros). Returns (spatial_shapes, level_start_index, locations, W)."""
    width = 1 << (2 * n - 1).bit_length()
    shapes, starts = torch.tensor([[1, width]]), torch.tensor([0])
    xs = (2 * torch.arange(n, dtype=torch.float64) + 0.5) / width
    loc = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, n, 1, 1, 1, 2).float()
    return shapes, starts, loc, width


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() == b.double()) | (a.isnan() & b.isnan())


def test_copy_float16_conversions_exact(isa):
    """Every float16 bit pattern is read exactly (float16 -> float32), and float32 results are rounded to
    float16 and bfloat16 exactly as torch rounds them (nearest even, overflow to inf, NaN stays NaN)."""
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    n = halves.numel()
    shapes, starts, loc, width = _one_row_problem(n)
    value = torch.zeros(1, width, 1, 16, dtype=torch.float16)
    value[0, 0 : 2 * n : 2] = halves[:, None, None]
    out = ms_deform_attn(value, shapes, starts, loc, torch.ones(1, n, 1, 1, 1))
    assert _same(out[0, :, 0], halves).all()
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-12, 7, (30000,), generator=g).double()
    special = torch.tensor([65504.0, 65519.0, 65520.0, 1e6, 6e-8, 3e-8, 2.9e-8, 1e-40, 3.4e38, 0.0, INF, NAN])
    weights = torch.cat(
        [(torch.randn(30000, generator=g, dtype=torch.float64) * scale).float(), special, -special]
    )
    n = weights.numel()
    shapes, starts, loc, width = _one_row_problem(n)
    for dtype in (torch.float16, torch.bfloat16):
        value = torch.zeros(1, width, 1, 16, dtype=dtype)
        value[0, 0 : 2 * n : 2] = 1
        out = ms_deform_attn(value, shapes, starts, loc, weights.view(1, n, 1, 1, 1))  # = round(w * 1)
        expected = weights.to(dtype)
        if isa == "avx512bf16" and dtype == torch.bfloat16:  # VCVTNEPS2BF16 flushes subnormal results
            expected = torch.where(weights.abs() < 1.1754944e-38, torch.zeros_like(expected), expected)
        assert _same(out[0, :, 0], expected).all(), f"{dtype}: {weights[~_same(out[0, :, 0], expected)]}"


# --- the run-time choice of the copy -----------------------------------------------------------------


def test_cpu_isa_api():
    supported = deform_attn.cpu_isas_supported()
    assert supported[0] == "generic" and all(s in ISAS for s in supported)
    before = deform_attn.cpu_isa()
    try:
        deform_attn.set_cpu_isa("auto")
        assert deform_attn.cpu_isa() == supported[-1]  # the best one
        for name in supported:
            deform_attn.set_cpu_isa(name)
            assert deform_attn.cpu_isa() == name
            assert f"copy {name}" in deform_attn.build_info()
    finally:
        deform_attn.set_cpu_isa(before)


def test_set_cpu_isa_unknown_name():
    with pytest.raises(ValueError, match="'sse9' is not a CPU kernel copy; expected one of auto, generic"):
        deform_attn.set_cpu_isa("sse9")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """Python in a subprocess that imports this same deform_attn, with extra environment variables."""
    full = dict(os.environ, **env)
    if "DEFORM_ATTN_CPU_ISA" not in env:
        full.pop("DEFORM_ATTN_CPU_ISA", None)
    src = os.path.dirname(os.path.dirname(os.path.abspath(deform_attn.__file__)))
    full["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [full.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(__file__),
    )


def test_env_var_forces_a_copy():
    res = _run("import deform_attn; print(deform_attn.cpu_isa())", DEFORM_ATTN_CPU_ISA="generic")
    assert res.returncode == 0 and res.stdout.split() == ["generic"], res.stderr


def test_env_var_unknown_fails_import_with_value_error():
    res = _run("import deform_attn", DEFORM_ATTN_CPU_ISA="avx1024")
    assert res.returncode != 0
    assert "ValueError" in res.stderr and "'avx1024' is not a CPU kernel copy" in res.stderr, res.stderr
    assert "DEFORM_ATTN_CPU_ISA='avx1024'" in res.stderr, res.stderr


def test_env_var_copy_the_cpu_lacks_fails_import_naming_the_flags():
    """A CPU without avx512_bf16 (simulated by hiding the flag from the detection)."""
    res = _run(
        "import deform_attn",
        DEFORM_ATTN_CPU_ISA="avx512bf16",
        DEFORM_ATTN_TEST_HIDE_CPU_FLAGS="avx512_bf16",
    )
    assert res.returncode != 0 and "RuntimeError" in res.stderr, res.stderr
    assert "this CPU lacks avx512_bf16 (CPU flags: " in res.stderr, res.stderr


def test_choice_follows_the_cpu_flags():
    """An AVX2-only CPU (avx512f hidden) gets the avx2 copy, one without AVX2 the generic one, and asking
    for more raises RuntimeError naming what is missing; the kernels still run."""
    code = """
        import torch, deform_attn
        from helpers import make_inputs
        print(deform_attn.cpu_isa(), ",".join(deform_attn.cpu_isas_supported()))
        try:
            deform_attn.set_cpu_isa("avx512")
        except RuntimeError as exc:
            print("error:", exc)
        out = deform_attn.ms_deform_attn(*make_inputs([(3, 4)], d=32))
        assert torch.allclose(out, deform_attn.ms_deform_attn_reference(*make_inputs([(3, 4)], d=32)))
    """
    res = _run(code, DEFORM_ATTN_TEST_HIDE_CPU_FLAGS="avx512f")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    if "avx2" in deform_attn.cpu_isas_supported():
        assert lines[0] == "avx2 generic,avx2", lines
    assert "error:" in lines[1] and "lacks avx512f" in lines[1] and "CPU flags:" in lines[1], lines
    res = _run(code, DEFORM_ATTN_TEST_HIDE_CPU_FLAGS="avx2,avx512f")
    assert res.returncode == 0 and res.stdout.splitlines()[0] == "generic generic", res.stdout + res.stderr
