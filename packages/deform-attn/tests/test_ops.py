"""The compiled CPU op against the pure-PyTorch reference (F.grid_sample), validation, autograd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close_rel, grads, level_table, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deform_attn
from deform_attn import ms_deform_attn, ms_deform_attn_reference

needs_ext = pytest.mark.skipif(not deform_attn.extension_available(), reason=deform_attn.build_info())

WHAT = ("output", "grad_value", "grad_locations", "grad_weights")


@st.composite
def problems(draw):
    num_levels = draw(st.integers(1, 4))
    # Odd sizes, 1x1 maps and 1-wide maps included.
    shapes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(num_levels)]
    return dict(
        shapes=shapes,
        n=draw(st.integers(1, 2)),
        q=draw(st.integers(1, 6)),
        m=draw(st.integers(1, 3)),
        # 16 and 32 take the compile-time-D kernels, the others the generic one; none a multiple of 8 too.
        d=draw(st.sampled_from([1, 3, 5, 7, 12, 16, 32, 33])),
        p=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference_float64(case):
    inputs = make_inputs(**case)
    got = grads(ms_deform_attn, inputs)
    expected = grads(ms_deform_attn_reference, inputs)
    for what, a, e in zip(WHAT, got, expected):
        assert_close_rel(a, e, 1e-10, what)


@needs_ext
def test_encoder_like_sizes_float64():
    """Realistic level shapes (incl. non-square, odd) and the D = 32 fast path, many queries."""
    inputs = make_inputs([(20, 30), (10, 15), (5, 8), (3, 4)], n=1, q=200, m=8, d=32, p=4, seed=3)
    for what, a, e in zip(WHAT, grads(ms_deform_attn, inputs), grads(ms_deform_attn_reference, inputs)):
        assert_close_rel(a, e, 1e-10, what)


@needs_ext
def test_gradcheck():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 1), (1, 1)], n=1, q=3, m=2, d=3, p=2, seed=5)
    args = [value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_()]
    assert torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-6)


@needs_ext
def test_float32_close_to_float64():
    inputs64 = make_inputs([(7, 9), (4, 5), (1, 1)], n=2, q=30, m=4, d=32, p=4, seed=2)
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs64)
    for what, a, e in zip(WHAT, grads(ms_deform_attn, inputs32), grads(ms_deform_attn, inputs64)):
        assert a.dtype == torch.float32
        assert_close_rel(a, e, 2e-5, what)


@needs_ext
def test_backward_deterministic_across_thread_counts():
    inputs = make_inputs([(9, 11), (5, 6)], n=2, q=80, m=4, d=16, p=4, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(ms_deform_attn, inputs)
        torch.set_num_threads(max(threads, 2))
        many = grads(ms_deform_attn, inputs)
        again = grads(ms_deform_attn, inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, many, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@needs_ext
def test_im2col_step_has_no_divisibility_rule():
    inputs = make_inputs([(4, 5)], n=3, q=4, seed=6)
    out = ms_deform_attn(*inputs, im2col_step=2)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)], n=2, q=4, m=2, d=4, p=2, seed=7)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(
        ms_deform_attn(value_nc, shapes, starts, loc_nc, attn),
        ms_deform_attn_reference(value, shapes, starts, loc, attn),
        rtol=1e-12,
        atol=1e-12,
    )


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_runs_the_kernel(dtype, monkeypatch):
    """16-bit inputs on CPU take the compiled kernel, not the (slow) reference."""
    assert deform_attn.kernel_available("cpu", dtype)

    def no_reference(*args):
        raise AssertionError("the reference must not run")

    monkeypatch.setattr(deform_attn.ops, "ms_deform_attn_reference", no_reference)
    out = ms_deform_attn(*make_inputs([(4, 5), (2, 3)], dtype=dtype, seed=8))
    assert out.dtype == dtype


def test_mixed_dtypes_without_kernel_use_float32_reference(monkeypatch):
    """The pure-PyTorch fallback handles the one accepted mixed form (16-bit value, float32 rest)."""
    monkeypatch.setattr(deform_attn.ops, "kernel_available", lambda device, dtype: False)
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)], dtype=torch.float32, seed=8)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc, attn)
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_reference(value.bfloat16().float(), shapes, starts, loc, attn)
    torch.testing.assert_close(out, expected.bfloat16())


@pytest.mark.parametrize("n,q", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_queries(n, q):
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)], n=max(n, 1), q=max(q, 1), m=2, d=3)
    value = value[:n]
    loc, attn = loc[:n, :q], attn[:n, :q]
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (n, q, 6)


def _bad_cases():
    good = make_inputs([(4, 5), (2, 3)], n=2, q=3, m=2, d=3, p=2)
    value, shapes, starts, loc, attn = good
    yield "value", (value[0], shapes, starts, loc, attn), "value must be"
    yield "locations rank", (value, shapes, starts, loc[..., 0], attn), "sampling_locations must be"
    yield "weights rank", (value, shapes, starts, loc, attn[..., 0]), "attention_weights must be"
    yield "weights shape", (value, shapes, starts, loc, attn[:, :2]), "attention_weights"
    yield "heads", (value[:, :, :1], shapes, starts, loc, attn), "sampling_locations"
    yield "levels", (value, shapes[:1], starts[:1], loc, attn), "sampling_locations"
    yield "shapes dtype", (value, shapes.int(), starts, loc, attn), "spatial_shapes must be int64"
    yield "starts dtype", (value, shapes, starts.int(), loc, attn), "level_start_index must be int64"
    yield "starts len", (value, shapes, starts[:1], loc, attn), "level_start_index must be"
    yield "S", (value[:, :-1], shapes, starts, loc, attn), "spatial_shapes"
    yield "starts values", (value, shapes, starts + 1, loc, attn), "level_start_index"
    dtypes = r"value torch.float64, sampling_locations torch.float32, attention_weights torch.float64"
    yield "dtype", (value, shapes, starts, loc.float(), attn), dtypes
    half = r"value torch.bfloat16, sampling_locations torch.float16, attention_weights torch.float32"
    yield "mixed half", (value.bfloat16(), shapes, starts, loc.half(), attn.float()), half
    rev = r"value torch.float32, sampling_locations torch.bfloat16, attention_weights torch.bfloat16"
    yield "16-bit locations", (value.float(), shapes, starts, loc.bfloat16(), attn.bfloat16()), rev
    yield "int value", (value.long(), shapes, starts, loc.long(), attn.long()), "floating point"
    if torch.device("meta") != value.device:
        yield "device", (value, shapes, starts, loc, attn.to("meta")), "attention_weights is on"


@pytest.mark.parametrize("name,args,match", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error(name, args, match):
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*args)


def test_bad_im2col_step():
    with pytest.raises(ValueError, match="im2col_step"):
        ms_deform_attn(*make_inputs([(2, 2)]), im2col_step=0)


@needs_ext
def test_raw_op_checks_shapes():
    """Direct torch.ops calls skip the Python validation; the C++ checks still stop bad calls."""
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)])
    with pytest.raises(RuntimeError, match="attention_weights"):
        torch.ops.deform_attn.ms_deform_attn(value, shapes, starts, loc, attn[:, :1], 64)
    with pytest.raises(RuntimeError, match="exceeds value length"):
        torch.ops.deform_attn.ms_deform_attn(value[:, :-1], shapes, starts, loc, attn, 64)
    with pytest.raises(RuntimeError, match="unsupported dtypes: value Double, sampling_locations Float"):
        torch.ops.deform_attn.ms_deform_attn(value, shapes, starts, loc.float(), attn, 64)
    with pytest.raises(RuntimeError, match="unsupported dtypes: value Float, sampling_locations BFloat16"):
        torch.ops.deform_attn.ms_deform_attn(value.float(), shapes, starts, loc.bfloat16(), attn.float(), 64)


@needs_ext
def test_double_backward_raises_clearly():
    value, shapes, starts, loc, attn = make_inputs([(3, 3)], seed=9)
    value.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    (g,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_build_info_is_one_line():
    info = deform_attn.build_info()
    assert "\n" not in info and info.startswith("deform_attn:")
    if deform_attn.extension_available():
        assert "CPU (float32, float64, bfloat16, float16)" in info
        assert f"copy {deform_attn.cpu_isa()}" in info


def test_missing_extension_warns_once_and_falls_back():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["deform_attn._C"] = None  # as if the extension had not been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import deform_attn
            from deform_attn import ops, modules  # noqa: F401  (re-imports must not warn again)
        msgs = [str(w.message) for w in caught if "deform_attn" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pure-PyTorch" in deform_attn.build_info()
        from helpers import make_inputs
        inputs = make_inputs([(3, 4)])
        out = deform_attn.ms_deform_attn(*inputs)
        ref = deform_attn.ms_deform_attn_reference(*inputs)
        assert (out - ref).abs().max() == 0
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__)
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_level_table_helper_consistent():
    shapes, starts, s = level_table([(2, 3), (1, 1)])
    assert starts.tolist() == [0, 6] and s == 7 and shapes.dtype == torch.int64
