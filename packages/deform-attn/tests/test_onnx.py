"""ONNX export of the op (deform_attn.onnx): standard operators only, checked with onnxruntime and OpenVINO
against PyTorch, both standard translation forms, fixed and dynamic sizes (the custom form: test_openvino.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import level_table

import deform_attn
from deform_attn import MSDeformAttn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not deform_attn.extension_available(), reason=deform_attn.build_info())

import deform_attn.onnx  # noqa: E402

# float32 throughout; the exported graph computes the same bilinear sums in another order (and ORT /
# OpenVINO use their own kernels), so outputs of magnitude ~1 agree to a few float32 ulps.
TOL = 1e-5
LEVELS = [(6, 7), (3, 4), (1, 2)]


def _module() -> MSDeformAttn:
    torch.manual_seed(0)
    m = MSDeformAttn(embed_dim=32, num_levels=3, num_heads=4, num_points=2)
    with torch.no_grad():  # offsets wide enough that samples fall outside the maps too
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.1)
    return m.eval()


def _inputs(n: int, q: int, levels: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes, starts, s = level_table(levels)
    return (
        torch.randn(n, q, 32, generator=g),
        torch.rand(n, q, len(levels), 2, generator=g),
        torch.randn(n, s, 32, generator=g),
        shapes,
        starts,
    )


def _export(model, args, method: str, path, dynamic: bool = False):
    dynamic_shapes = None
    if dynamic:
        n, q, s = torch.export.Dim("n"), torch.export.Dim("q"), torch.export.Dim("s")
        dynamic_shapes = ({0: n, 1: q}, {0: n, 1: q}, {0: n, 1: s}, None, None)
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        custom_translation_table=deform_attn.onnx.translation_table(method),
        dynamic_shapes=dynamic_shapes,
    )
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _ort(path, args) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)[0]


def _openvino(path, args) -> np.ndarray | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    # f32 explicitly: on CPUs with bf16 support OpenVINO otherwise infers in bf16.
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled([a.numpy() for a in args])[compiled.output(0)]


def _check(proto, method: str) -> None:
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), f"custom-domain node in {ops}"
    names = {t for _, t in ops}
    assert ("GridSample" in names) == (method == "grid_sample"), names


@pytest.mark.parametrize("method", deform_attn.onnx.STANDARD_METHODS)
def test_export_fixed_size(method, tmp_path):
    model, args = _module(), _inputs(2, 5, LEVELS)
    path = tmp_path / f"{method}.onnx"
    _check(_export(model, args, method, path), method)
    expected = model(*args).detach().numpy()
    np.testing.assert_allclose(_ort(path, args), expected, rtol=0, atol=TOL)
    ov_out = _openvino(path, args)
    if ov_out is not None:
        np.testing.assert_allclose(ov_out, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("method", deform_attn.onnx.STANDARD_METHODS)
def test_export_dynamic_sizes(method, tmp_path):
    """Exported at one size, run at another batch, query count and feature-map sizes (the level table is
    read from the spatial_shapes / level_start_index inputs at run time)."""
    model = _module()
    path = tmp_path / f"{method}_dynamic.onnx"
    _check(_export(model, _inputs(2, 5, LEVELS), method, path, dynamic=True), method)
    for n, q, levels in ((3, 11, [(9, 5), (4, 3), (2, 2)]), (1, 2, [(2, 3), (1, 1), (1, 1)])):
        args = _inputs(n, q, levels, seed=n)
        expected = model(*args).detach().numpy()
        np.testing.assert_allclose(_ort(path, args), expected, rtol=0, atol=TOL)
        ov_out = _openvino(path, args)
        if ov_out is not None:
            np.testing.assert_allclose(ov_out, expected, rtol=0, atol=TOL)


class _HalfValue(torch.nn.Module):
    """The op's mixed form: float16 value, float32 locations and weights."""

    def forward(self, value, shapes, starts, loc, attn):
        return deform_attn.ms_deform_attn(value.half(), shapes, starts, loc, attn).float()


@pytest.mark.parametrize("method", deform_attn.onnx.STANDARD_METHODS)
def test_export_mixed_half_value(method, tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes, starts, s = level_table(LEVELS)
    args = (
        torch.randn(2, s, 4, 8, generator=g),
        shapes,
        starts,
        torch.rand(2, 5, 4, 3, 2, 2, generator=g) * 1.2 - 0.1,
        torch.rand(2, 5, 4, 3, 2, generator=g),
    )
    path = tmp_path / f"{method}_half.onnx"
    _check(_export(_HalfValue().eval(), args, method, path), method)
    expected = _HalfValue()(*args).numpy()
    # Both round a float32 result to float16 once: at most one float16 ulp apart (2^-10 relative).
    tol = 2.0**-10 * float(np.abs(expected).max())
    np.testing.assert_allclose(_ort(path, args), expected, rtol=0, atol=tol)


def test_translation_table_api():
    table = deform_attn.onnx.translation_table()
    assert list(table) == [torch.ops.deform_attn.ms_deform_attn.default]
    with pytest.raises(ValueError, match="method must be one of"):
        deform_attn.onnx.translation_table("bicubic")


def test_import_deform_attn_does_not_import_onnx():
    import subprocess
    import sys

    code = "import sys, deform_attn; assert 'onnx' not in sys.modules and 'onnxscript' not in sys.modules"
    src = str(__import__("pathlib").Path(deform_attn.__file__).resolve().parents[1])
    res = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": src}, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def test_grid_sample_form_at_opset_17(tmp_path):
    """Before opset 20 GridSample spells bilinear "bilinear" (from 20 on: "linear")."""
    model, args = _module(), _inputs(2, 5, LEVELS)
    path = tmp_path / "opset17.onnx"
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        opset_version=17,
        custom_translation_table=deform_attn.onnx.translation_table("grid_sample"),
    )
    program.save(str(path))
    modes = [a.s for n in program.model_proto.graph.node if n.op_type == "GridSample" for a in n.attribute]
    assert b"bilinear" in modes, modes
    np.testing.assert_allclose(_ort(path, args), model(*args).detach().numpy(), rtol=0, atol=TOL)
