"""The command line: synth, predict (score threshold really applied, COCO json), eval, convert delegation,
config errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from maskdino.cli import main
from maskdino.config import apply_overrides, get_experiment


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    assert main(["synth", str(out), "--seed", "5", "--train", "2", "--val", "2", "--size", "64"]) == 0
    return out


def _opts(root: Path) -> list[str]:
    return [
        f"data.root={root}", "data.synthetic_seed=5", "data.synthetic_train=2", "data.synthetic_val=2",
        "data.synthetic_size=64", "data.test_short_edge=64", "data.test_max_size=64",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(synth, tmp_path_factory) -> Path:
    """Random tiny weights saved like a training checkpoint (with its config and class names)."""
    from maskdino.data.build import build_datasets
    from maskdino.modeling.model import build_model

    cfg = apply_overrides(get_experiment("tiny"), _opts(synth))
    _, _, meta, _ = build_datasets(cfg.data, cfg.model.num_classes, splits=("val",))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "metadata": meta.to_dict()}, path)
    return path


def test_synth_writes_loadable_coco(synth):
    from pycocotools.coco import COCO

    coco = COCO(str(synth / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 2 and sorted(coco.getCatIds()) == [1, 2, 3]
    pan = json.loads((synth / "annotations" / "panoptic_val.json").read_text())
    assert {c["name"] for c in pan["categories"]} == {"circle", "square", "triangle", "sky", "grass"}
    assert len(list((synth / "val" / "panoptic").glob("*.png"))) == 2


def test_python_dash_m_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "maskdino", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "demo" in out.stdout and "predict" in out.stdout


def test_predict_applies_score_threshold(synth, checkpoint, tmp_path):
    images = sorted(str(p) for p in (synth / "val" / "images").glob("*.png"))
    assert main(["predict", *images, "--weights", str(checkpoint), "--out", str(tmp_path / "all"),
                 "--score-threshold", "0"]) == 0  # fmt: skip
    everything = json.loads((tmp_path / "all" / "predictions.json").read_text())
    assert len(everything) > 0
    scores = sorted(r["score"] for r in everything)
    thr = scores[len(scores) // 2]
    assert main(["predict", *images, "--weights", str(checkpoint), "--out", str(tmp_path / "thr"),
                 "--score-threshold", str(thr)]) == 0  # fmt: skip
    kept = json.loads((tmp_path / "thr" / "predictions.json").read_text())
    assert len(kept) == sum(1 for s in scores if s >= thr) < len(everything)
    assert all(r["score"] >= thr for r in kept)
    r = kept[0]
    assert set(r) >= {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert r["category_id"] in (1, 2, 3, 4, 5) and len(r["bbox"]) == 4
    for p in images:
        pic = Image.open(tmp_path / "thr" / Path(p).name)
        assert pic.size == (64, 64) and pic.mode == "RGB"


def test_eval_command_writes_metrics(synth, checkpoint, tmp_path, capsys):
    assert main(["eval", "--config", "tiny", "--weights", str(checkpoint), "--output", str(tmp_path),
                 "--opts", *_opts(synth)]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("bbox/AP", "segm/AP", "panoptic/PQ", "sem_seg/mIoU"):
        assert key in metrics
    assert "mask AP" in capsys.readouterr().out


def test_config_errors_are_reported(capsys):
    assert main(["train", "--config", "tiny", "--opts", "train.max_iterations=3"]) == 2
    assert "unknown config key 'train.max_iterations'" in capsys.readouterr().err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert main(["train", "--config", "missing.yaml"]) == 2


def test_convert_delegates(monkeypatch):
    seen = {}
    fake = types.ModuleType("maskdino.cli.convert")

    def convert_main(argv):
        seen["argv"] = list(argv)
        return 0

    fake.convert_main = convert_main
    monkeypatch.setitem(sys.modules, "maskdino.cli.convert", fake)
    assert main(["convert", "in.pkl", "out.pth", "--preset", "tiny"]) == 0
    assert seen["argv"] == ["in.pkl", "out.pth", "--preset", "tiny"]
