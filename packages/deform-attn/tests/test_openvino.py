"""The custom ONNX form (one deform_attn::MSDeformAttn node) run by OpenVINO with the extension of
deform_attn.openvino, against the float64 reference: every CPU kernel copy this machine can run, fixed and
dynamic sizes, samples outside the maps, and named errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import level_table

import deform_attn
from deform_attn import ms_deform_attn_reference

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ov = pytest.importorskip("openvino")
pytestmark = pytest.mark.skipif(not deform_attn.extension_available(), reason=deform_attn.build_info())

import deform_attn.onnx  # noqa: E402
import deform_attn.openvino  # noqa: E402

LEVELS = [(6, 7), (3, 4), (1, 2)]
# float32 kernels against float64: sums of 4 * L * P weighted corners of magnitude ~1
TOL = 1e-5


@pytest.fixture(scope="module")
def extension() -> str:
    try:
        return str(deform_attn.openvino.extension_path())
    except deform_attn.openvino.ExtensionBuildError as e:  # e.g. no C++ compiler on this machine
        pytest.skip(str(e))


class _Op(torch.nn.Module):
    def forward(self, value, shapes, starts, loc, attn):
        return deform_attn.ms_deform_attn(value, shapes, starts, loc, attn)


def _inputs(n: int, q: int, levels: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes, starts, s = level_table(levels)
    return (
        torch.randn(n, s, 4, 8, generator=g),
        shapes,
        starts,
        torch.rand(n, q, 4, len(levels), 2, 2, generator=g) * 1.4 - 0.2,  # some samples outside the maps
        torch.rand(n, q, 4, len(levels), 2, generator=g),
    )


def _export(path, dynamic: bool = False):
    dynamic_shapes = None
    if dynamic:
        n, q, s = torch.export.Dim("n"), torch.export.Dim("q"), torch.export.Dim("s")
        dynamic_shapes = ({0: n, 1: s}, None, None, {0: n, 1: q}, {0: n, 1: q})
    program = torch.onnx.export(
        _Op(),
        _inputs(2, 5, LEVELS),
        dynamo=True,
        custom_translation_table=deform_attn.onnx.translation_table("custom"),
        dynamic_shapes=dynamic_shapes,
    )
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [(n.domain, n.op_type) for n in proto.graph.node if n.domain] == [("deform_attn", "MSDeformAttn")]
    return path


def _run(extension: str, path, args) -> np.ndarray:
    core = ov.Core()
    core.add_extension(extension)
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled([a.numpy() for a in args])[compiled.output(0)]


def _expected(args) -> np.ndarray:
    v, shapes, starts, loc, attn = args
    return ms_deform_attn_reference(v.double(), shapes, starts, loc.double(), attn.double()).numpy()


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_custom_form_matches_float64_on_every_isa_copy(extension, isa, tmp_path, monkeypatch):
    if isa != "generic" and isa not in deform_attn.cpu_isas_supported():
        pytest.skip(f"this CPU cannot run the {isa} copy (supported: {deform_attn.cpu_isas_supported()})")
    monkeypatch.setenv("DEFORM_ATTN_CPU_ISA", isa)  # read when OpenVINO creates the node
    path = _export(tmp_path / "op.onnx")
    args = _inputs(2, 5, LEVELS)
    np.testing.assert_allclose(_run(extension, path, args), _expected(args), rtol=0, atol=TOL)


def test_custom_form_dynamic_sizes(extension, tmp_path):
    path = _export(tmp_path / "op_dynamic.onnx", dynamic=True)
    for n, q, levels in ((3, 11, [(9, 5), (4, 3), (2, 2)]), (1, 2, [(2, 3), (1, 1), (1, 1)])):
        args = _inputs(n, q, levels, seed=n)
        np.testing.assert_allclose(_run(extension, path, args), _expected(args), rtol=0, atol=TOL)


def test_custom_form_bad_level_table_is_named(extension, tmp_path):
    path = _export(tmp_path / "op_dynamic.onnx", dynamic=True)
    v, shapes, starts, loc, attn = _inputs(1, 3, LEVELS)
    bad_starts = starts.clone()
    bad_starts[-1] = v.shape[1]  # the last level starts past the end of value
    with pytest.raises(Exception, match="does not fit in value length"):
        _run(extension, path, (v, shapes, bad_starts, loc, attn))


def test_extension_is_cached_and_build_errors_are_named(extension, monkeypatch, tmp_path):
    assert str(deform_attn.openvino.extension_path()) == extension  # second call: the cached library
    monkeypatch.setenv("DEFORM_ATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(deform_attn.openvino.ExtensionBuildError, match="no C\\+\\+ compiler"):
        deform_attn.openvino.extension_path()
    monkeypatch.setenv("DEFORM_ATTN_CSRC", str(tmp_path))
    monkeypatch.delenv("CXX")
    with pytest.raises(
        deform_attn.openvino.ExtensionBuildError, match="sources of the extension were not found"
    ):
        deform_attn.openvino.extension_path()
