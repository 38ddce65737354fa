"""End to end across packages: synthetic data -> `maskdino train` (tiny preset, a few iterations) -> evaluation
through coco_eval -> `maskdino eval` on the saved weights -> `maskdino predict`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskdino.cli import main


def _opts(root: Path, out: Path) -> list[str]:
    return [
        f"data.root={root}", "data.synthetic_seed=7", "data.synthetic_train=4", "data.synthetic_val=2",
        "data.synthetic_size=64", "data.image_size=64", "data.test_short_edge=64", "data.test_max_size=64",
        "data.num_workers=0", f"train.output_dir={out}", "train.max_iter=3", "train.ims_per_batch=2",
        "train.log_period=1", "train.checkpoint_period=2", "train.eval_period=0", "train.progress_bar=false",
        "model.decoder.num_queries=20", "model.loss.train_num_points=256",
    ]  # fmt: skip


def test_train_eval_predict_tiny(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    assert main(["train", "--config", "tiny", "--opts", *_opts(root, out)]) == 0
    # files a user expects after training
    for name in (
        "config.yaml",
        "metadata.json",
        "metrics.jsonl",
        "model_final.pth",
        "last_checkpoint",
        "eval/metrics.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "tensorboard").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert (
            r["total_loss"] > 0 and r["lr"] > 0 and "loss_mask" in r and "loss_dice" in r and "loss_ce" in r
        )
    eval_rows = [r for r in rows if "eval/segm/AP" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["iteration"] == 3
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for key in ("bbox/AP", "segm/AP", "panoptic/PQ", "sem_seg/mIoU"):
        assert key in metrics and (metrics[key] is None or 0.0 <= metrics[key] <= 100.0)
    printed = capsys.readouterr().out
    assert "final: box AP" in printed and "PQ" in printed and "mIoU" in printed

    # the final checkpoint evaluates to the same numbers through `maskdino eval`
    assert main(["eval", "--config", "tiny", "--weights", str(out / "model_final.pth"), "--output", str(tmp_path / "ev"),
                 "--opts", *_opts(root, out)]) == 0  # fmt: skip
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("bbox/AP", "segm/AP", "panoptic/PQ", "sem_seg/mIoU"):
        assert again[key] == (None if metrics[key] is None else pytest.approx(metrics[key]))

    # resume continues from the last checkpoint (nothing left to do: max_iter reached)
    assert (
        main(["train", "--config", "tiny", "--resume", "--opts", *_opts(root, out), "train.max_iter=4"]) == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [1, 2, 3, 4]

    images = sorted(str(p) for p in (root / "val" / "images").glob("*.png"))
    assert main(["predict", *images, "--weights", str(out / "model_final.pth"), "--out", str(tmp_path / "pred"),
                 "--score-threshold", "0.0"]) == 0  # fmt: skip
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2
    assert isinstance(json.loads((tmp_path / "pred" / "predictions.json").read_text()), list)
