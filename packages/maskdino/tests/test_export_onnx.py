"""maskdino export to ONNX and OpenVINO, run with onnxruntime and OpenVINO against the PyTorch model (tiny preset).

Raw outputs are compared with a stated tolerance (float32 with another operation order: 1e-4 of the logits' and
boxes' scale), final predictions by labels, box IoU and mask IoU on the real COCO photos (when ../shared/data is
there) and on synthetic images; panoptic and semantic outputs too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("deform_attn.onnx")

from torchvision.ops import box_iou

from maskdino.checkpoints.weights import save_weights
from maskdino.cli import main
from maskdino.config import apply_overrides, get_experiment
from maskdino.data.coco import read_image
from maskdino.export import ExportError, export_onnx, export_openvino, openvino_from_onnx
from maskdino.export.runtime import ExportedModel, exported_predictor
from maskdino.inference.predictor import ImagePredictor, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTOS = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "coco-panoptic-sample" / "input_images"
)
#: raw outputs: float32 in another operation order (GridSample / Gather vs our kernel, other GEMM blocking)
ATOL = 1e-4


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    cfg = apply_overrides(
        get_experiment("tiny"),
        ["data.test_short_edge=96", "data.test_max_size=160", "model.inference.object_mask_threshold=0.0"],
    )
    from maskdino.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    save_weights(path, model.state_dict(), config=cfg.to_dict())
    return path


@pytest.fixture(scope="module")
def loaded(weights):
    return load_model(weights)


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    """A fixed-size ONNX (GridSample form), its OpenVINO IR, and a dynamic ONNX (Gather form)."""
    out = tmp_path_factory.mktemp("exported")
    export_onnx(loaded, out / "fixed.onnx", 96, 160, dynamic=False, op_form="grid_sample")
    export_openvino(loaded, out / "fixed.xml", 96, 160, dynamic=False, op_form="grid_sample")
    export_onnx(loaded, out / "dynamic.onnx", 96, 160, dynamic=True, op_form="gather")
    return out


def _raw(loaded, images, sizes):
    with torch.no_grad():
        return loaded.model.inference_forward(images, sizes)


def _close(got, ref):
    for g, r in zip(got, ref):
        scale = max(1.0, float(r.abs().max()))
        assert g.shape == r.shape
        assert float((g - r).abs().max()) <= ATOL * scale, float((g - r).abs().max())


def test_graph_uses_standard_operators_only(exported):
    import onnx

    for name in ("fixed.onnx", "dynamic.onnx"):
        model = onnx.load(str(exported / name))
        onnx.checker.check_model(model)
        domains = {n.domain for n in model.graph.node}
        assert domains <= {"", "ai.onnx"}, domains
        ops = {n.op_type for n in model.graph.node}
        assert ("GridSample" in ops) == (name == "fixed.onnx")  # the Gather form has none
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["maskdino"])["padding_mode"] == "aware"


@pytest.mark.parametrize("name, backend", [("fixed.onnx", "onnxruntime"), ("fixed.xml", "openvino"),
                                           ("dynamic.onnx", "onnxruntime"), ("dynamic.onnx", "openvino")])  # fmt: skip
def test_raw_outputs_match_pytorch(loaded, exported, name, backend):
    model = ExportedModel(exported / name, backend=backend)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 96, 160, generator=g)
    for sizes in ([[96, 160]], [[80, 131]]):  # unpadded and padded (aware: masked)
        s = torch.tensor(sizes)
        _close(model(images, s), _raw(loaded, images, s))
    if model.metadata.dynamic:  # other sizes and a batch of two through the same graph
        images = torch.randn(2, 3, 128, 96, generator=g)
        s = torch.tensor([[128, 96], [100, 70]])
        _close(model(images, s), _raw(loaded, images, s))


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    out = [(torch.rand(3, 70, 110, generator=g) * 255).to(torch.uint8)]
    if PHOTOS.is_dir():
        out += [read_image(p) for p in sorted(PHOTOS.glob("*.jpg"))]
    return out


@pytest.mark.parametrize("name, backend", [("fixed.onnx", "onnxruntime"), ("fixed.xml", "openvino"),
                                           ("dynamic.onnx", "onnxruntime")])  # fmt: skip
def test_final_predictions_match_pytorch(loaded, exported, name, backend):
    if not PHOTOS.is_dir():
        print(f"real photos not found at {PHOTOS}: synthetic images only")
    torch_pred = ImagePredictor.from_model(loaded.model, loaded.config)
    other = exported_predictor(ExportedModel(exported / name, backend=backend))
    for image in _images():
        a = torch_pred(image, tasks=["instance", "panoptic", "semantic"])
        b = other(image, tasks=["instance", "panoptic", "semantic"])
        ia, ib = a.instances, b.instances
        assert ia.labels.tolist() == ib.labels.tolist()
        torch.testing.assert_close(ib.scores, ia.scores, atol=1e-4, rtol=0)
        assert bool((box_iou(ia.boxes, ib.boxes).diagonal() >= 0.999).all())
        assert bool((_mask_iou(ia.masks, ib.masks) >= 0.99).all())
        assert [s["category_id"] for s in a.panoptic.segments_info] == [
            s["category_id"] for s in b.panoptic.segments_info
        ]
        assert float((a.panoptic.segments != b.panoptic.segments).float().mean()) <= 1e-3
        assert float((a.semantic.argmax(0) != b.semantic.argmax(0)).float().mean()) <= 1e-3


def test_cli_export_and_predict_with_each_backend(weights, exported, tmp_path):
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((70, 110, 3)) * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(weights), "--format", "onnx", "--output", str(out),
                 "--height", "96", "--width", "160"]) == 0  # fmt: skip
    runs = {"torch": ["--weights", str(weights)], "onnxruntime": ["--model", str(out)],
            "openvino": ["--model", str(exported / "fixed.xml")]}  # fmt: skip
    results = {}
    for backend, args in runs.items():
        dest = tmp_path / backend
        assert (
            main(
                [
                    "predict",
                    str(photo),
                    "--backend",
                    backend,
                    *args,
                    "--out",
                    str(dest),
                    "--score-threshold",
                    "0.05",
                ]
            )
            == 0
        )
        results[backend] = json.loads((dest / "predictions.json").read_text())
        assert (dest / "p.png").is_file()
    for backend in ("onnxruntime", "openvino"):
        assert [r["category_id"] for r in results[backend]] == [r["category_id"] for r in results["torch"]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(results[backend], results["torch"])) <= 1e-4


def test_bad_inputs_are_named(loaded, weights, exported, tmp_path, capsys):
    with pytest.raises(ExportError, match="multiple of the model's size_divisibility"):
        export_onnx(loaded, tmp_path / "x.onnx", 100, 160)
    with pytest.raises(ExportError, match="both --height and --width"):
        export_onnx(loaded, tmp_path / "x.onnx", 96, None)
    with pytest.raises(ExportError, match="not available for ONNX"):
        export_onnx(loaded, tmp_path / "x.onnx", precision="bf16")  # type: ignore[arg-type]
    model = ExportedModel(exported / "fixed.onnx")
    with pytest.raises(ExportError, match="exported for 96x160 inputs, got 128x160"):
        model(torch.zeros(1, 3, 128, 160), torch.tensor([[128, 160]]))
    # a model file that is not one of ours
    import onnx

    foreign = tmp_path / "foreign.onnx"
    m = onnx.load(str(exported / "fixed.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(foreign))
    with pytest.raises(ExportError, match="not exported by maskdino"):
        ExportedModel(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        ExportedModel(garbage)
    # the same checks where OpenVINO reads the ONNX file (one metadata reader serves both)
    with pytest.raises(ExportError, match="not exported by maskdino"):
        ExportedModel(foreign, backend="openvino")
    with pytest.raises(ExportError, match="not exported by maskdino"):
        openvino_from_onnx(foreign, tmp_path / "foreign.xml")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        openvino_from_onnx(garbage, tmp_path / "garbage.xml")
    # through the CLI: one line, exit 2
    assert main(["export", "--weights", str(weights), "--format", "onnx", "--output", str(tmp_path / "y.onnx"),
                 "--height", "90", "--width", "160"]) == 2  # fmt: skip
    assert "size_divisibility" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(tmp_path),
                "--backend",
                "onnxruntime",
                "--weights",
                str(weights),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--backend onnxruntime runs --model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def custom_exported(loaded, tmp_path_factory):
    """The custom op form: one deform_attn::MSDeformAttn node per attention, fixed (ONNX + IR) and dynamic."""
    import deform_attn.openvino

    try:
        deform_attn.openvino.extension_path()
    except deform_attn.openvino.ExtensionBuildError as e:  # e.g. no C++ compiler on this machine
        pytest.skip(f"the deform_attn OpenVINO extension cannot be built here: {e}")
    out = tmp_path_factory.mktemp("custom")
    export_onnx(loaded, out / "fixed.onnx", 96, 160, op_form="custom")
    export_openvino(loaded, out / "fixed.xml", 96, 160, op_form="custom")
    export_onnx(loaded, out / "dynamic.onnx", 96, 160, dynamic=True, op_form="custom")
    return out


def test_custom_op_form_runs_in_openvino_and_matches_pytorch(loaded, custom_exported):
    import onnx

    model = onnx.load(str(custom_exported / "fixed.onnx"))
    nodes = [n for n in model.graph.node if n.domain == "deform_attn"]
    # tiny preset: every encoder and decoder layer has one, nothing else is outside the standard domain
    assert nodes and {n.op_type for n in nodes} == {"MSDeformAttn"}
    assert not any(n.op_type == "GridSample" for n in model.graph.node)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx", "deform_attn"}
    g = torch.Generator().manual_seed(2)
    images = torch.randn(1, 3, 96, 160, generator=g)
    for name in ("fixed.onnx", "fixed.xml", "dynamic.onnx"):
        exported = ExportedModel(custom_exported / name, backend="openvino")
        assert exported.metadata.op_form == "custom"
        for sizes in ([[96, 160]], [[80, 131]]):
            s = torch.tensor(sizes)
            _close(exported(images, s), _raw(loaded, images, s))
    dyn = ExportedModel(custom_exported / "dynamic.onnx", backend="openvino")
    images2 = torch.randn(2, 3, 128, 96, generator=g)
    s = torch.tensor([[128, 96], [100, 70]])
    _close(dyn(images2, s), _raw(loaded, images2, s))


def test_custom_op_form_errors_are_named(loaded, custom_exported, tmp_path):
    with pytest.raises(ExportError, match="only OpenVINO runs"):
        ExportedModel(custom_exported / "fixed.onnx", backend="onnxruntime")
    with pytest.raises(ExportError, match="float32"):
        export_onnx(loaded, tmp_path / "x.onnx", 96, 160, precision="fp16", op_form="custom")
    with pytest.raises(ExportError, match="op form 'plugin'"):
        export_onnx(loaded, tmp_path / "x.onnx", 96, 160, op_form="plugin")  # type: ignore[arg-type]


def test_cli_export_custom_op_form_and_predict_with_openvino(weights, custom_exported, tmp_path):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(1).random((70, 110, 3)) * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "m.xml"
    assert main(["export", "--weights", str(weights), "--format", "openvino", "--output", str(out),
                 "--height", "96", "--width", "160", "--op-form", "custom"]) == 0  # fmt: skip
    results = {}
    for backend, args in {"torch": ["--weights", str(weights)], "openvino": ["--model", str(out)]}.items():
        dest = tmp_path / backend
        argv = ["predict", str(photo), "--backend", backend, *args, "--out", str(dest), "--score-threshold", "0.05"]  # fmt: skip
        assert main(argv) == 0
        results[backend] = json.loads((dest / "predictions.json").read_text())
    assert [r["category_id"] for r in results["openvino"]] == [r["category_id"] for r in results["torch"]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(results["openvino"], results["torch"])) <= 1e-4
