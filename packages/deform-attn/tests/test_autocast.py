"""Autocast, torch.compile and torch.export with the 16-bit dtype forms of the op."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel, grads, level_table, make_inputs, tolerance

import deform_attn
from deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference

pytestmark = pytest.mark.skipif(not deform_attn.extension_available(), reason=deform_attn.build_info())
WHAT = ("output", "grad_value", "grad_locations", "grad_weights")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_autocast_casts_value_only(dtype):
    """Under autocast the value runs in the autocast dtype, locations and weights in float32; gradients
    reach the float32 leaves. Against the float64 reference on the same rounded value."""
    inputs = make_inputs([(6, 7), (3, 4)], n=2, q=9, m=2, d=32, p=3, dtype=torch.float32, seed=3)
    value, shapes, starts, loc, attn = inputs
    g = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=dtype):
        got = grads(ms_deform_attn, inputs, g)
        assert got[0].dtype == dtype  # the op's output, in the autocast dtype
    assert [t.dtype for t in got[1:]] == [torch.float32] * 3  # gradients of the float32 leaves
    exact = (value.to(dtype).double(), shapes, starts, loc.double(), attn.double())
    expected = grads(ms_deform_attn_reference, exact, g.to(dtype).double())
    # grad_value is rounded to the autocast dtype by the kernel before the cast back to float32.
    for what, a, e, dt in zip(WHAT, got, expected, (dtype, dtype, torch.float32, torch.float32)):
        assert_close_rel(a, e, tolerance(dt), f"autocast {dtype} {what}")


def test_no_cast_outside_autocast():
    inputs = make_inputs([(4, 5)], dtype=torch.float32)
    assert ms_deform_attn(*inputs).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert ms_deform_attn(*inputs).dtype == torch.float32


def test_autocast_leaves_float64_alone():
    inputs = make_inputs([(4, 5)], dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(*inputs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-12, atol=1e-12)


def _module_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes, starts, s = level_table([(6, 7), (3, 4)])
    query = torch.randn(2, 5, 32, generator=g).to(dtype)
    value = torch.randn(2, s, 32, generator=g).to(dtype)
    ref = torch.rand(2, 5, 2, 2, generator=g).to(dtype)
    return query, ref, value, shapes, starts


def _module():
    torch.manual_seed(0)
    m = MSDeformAttn(embed_dim=32, num_levels=2, num_heads=4, num_points=2)
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0, 0.05)
    return m.eval()


@pytest.mark.parametrize(
    "value_dtype,loc_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=lambda t: str(t).split(".")[-1],
)
def test_compile_fullgraph_dtypes(value_dtype, loc_dtype):
    """The fake kernel gives the output in value's dtype; compiled forward and backward equal eager."""
    torch._dynamo.reset()
    value, shapes, starts, loc, attn = make_inputs([(5, 6), (2, 3)], n=2, q=4, m=2, d=16, p=2, seed=5)
    inputs = (value.to(value_dtype), shapes, starts, loc.to(loc_dtype), attn.to(loc_dtype))
    compiled = torch.compile(ms_deform_attn, fullgraph=True, backend="aot_eager")
    eager = grads(ms_deform_attn, inputs)
    got = grads(compiled, inputs)
    for what, a, e in zip(WHAT, got, eager):
        assert a.dtype == e.dtype, what
        assert torch.equal(a, e), what  # the same kernels run


def test_compile_under_autocast():
    torch._dynamo.reset()
    m = _module()
    args = _module_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = m(*args)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(*args)
    assert compiled.dtype == eager.dtype
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_export_dtypes(dtype):
    m = _module().to(dtype)
    args = _module_inputs(dtype)
    exported = torch.export.export(m, args)
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("deform_attn.ms_deform_attn" in op for op in ops), ops
    other = _module_inputs(dtype, seed=1)
    out = exported.module()(*other)
    assert out.dtype == dtype
    torch.testing.assert_close(out, m(*other))
