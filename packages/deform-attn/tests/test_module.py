"""MSDeformAttn: shapes, the original initialisation, and tracing with torch.compile / torch.export."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import level_table

import deform_attn
from deform_attn import MSDeformAttn, modules

needs_ext = pytest.mark.skipif(not deform_attn.extension_available(), reason=deform_attn.build_info())

SHAPES = [(6, 7), (3, 4), (1, 2)]


def _inputs(n=2, q=5, c=32, box=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, s = level_table(SHAPES)
    query = torch.randn(n, q, c, generator=g)
    value = torch.randn(n, s, c, generator=g)
    ref = torch.rand(n, q, len(SHAPES), 4 if box else 2, generator=g)
    return query, ref, value, spatial_shapes, starts


def _module(seed=0):
    torch.manual_seed(seed)
    m = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    with torch.no_grad():  # non-trivial offsets / weights so that sampling really varies
        m.sampling_offsets.weight.normal_(0, 0.05)
        m.attention_weights.weight.normal_(0, 0.1)
    return m.eval()


@pytest.mark.parametrize("box", [False, True])
def test_output_shape_and_padding(box):
    m = _module()
    query, ref, value, shapes, starts = _inputs(box=box)
    out = m(query, ref, value, shapes, starts)
    assert out.shape == query.shape
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[:, -3:] = True
    changed = value.clone()
    changed[:, -3:] = 1e3
    # padded positions are zeroed, so their content must not matter
    torch.testing.assert_close(
        m(query, ref, value, shapes, starts, mask), m(query, ref, changed, shapes, starts, mask)
    )


def test_module_kernel_matches_reference(monkeypatch):
    m = _module().double()
    args = [t.double() if t.is_floating_point() else t for t in _inputs()]
    out = m(*args)
    monkeypatch.setattr(modules, "ms_deform_attn", deform_attn.ms_deform_attn_reference)
    torch.testing.assert_close(out, m(*args), rtol=1e-10, atol=1e-12)


def test_initialisation_ring_pattern():
    heads, levels, points = 8, 4, 4
    m = MSDeformAttn(embed_dim=64, num_levels=levels, num_heads=heads, num_points=points)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    bias = m.sampling_offsets.bias.view(heads, levels, points, 2)
    for h in range(heads):
        theta = 2 * math.pi * h / heads
        direction = torch.tensor([math.cos(theta), math.sin(theta)])
        direction = direction / direction.abs().max()  # on the unit square's border
        for p in range(points):
            expected = (direction * (p + 1)).expand(levels, 2)
            torch.testing.assert_close(bias[h, :, p], expected, atol=1e-5, rtol=0)
    assert (
        torch.count_nonzero(m.attention_weights.weight) == 0
        and torch.count_nonzero(m.attention_weights.bias) == 0
    )
    assert torch.count_nonzero(m.value_proj.bias) == 0 and torch.count_nonzero(m.output_proj.bias) == 0


def test_rejects_wrong_level_count():
    m = _module()
    query, ref, value, shapes, starts = _inputs()
    with pytest.raises(ValueError, match="levels"):
        m(query, ref[:, :, :2], value, shapes[:2], starts[:2])


@needs_ext
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = _module()
    args = _inputs()
    eager = m(*args)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), eager, rtol=1e-5, atol=1e-6)
    # backward through the compiled graph (autograd formula registered with torch.library)
    query = args[0].clone().requires_grad_()
    compiled(query, *args[1:]).sum().backward()
    q_eager = args[0].clone().requires_grad_()
    m(q_eager, *args[1:]).sum().backward()
    torch.testing.assert_close(query.grad, q_eager.grad, rtol=1e-4, atol=1e-6)


@needs_ext
def test_torch_export():
    m = _module()
    args = _inputs()
    exported = torch.export.export(m, args)
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("deform_attn.ms_deform_attn" in op for op in ops), ops
    other = _inputs(seed=1)
    torch.testing.assert_close(exported.module()(*other), m(*other), rtol=1e-5, atol=1e-6)


@needs_ext
def test_torch_compile_inductor():
    """The default backend too: the fake kernel lets Inductor keep the op as an extern call."""
    torch._dynamo.reset()
    m = _module()
    args = _inputs()
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(*args), m(*args), rtol=1e-5, atol=1e-6)
