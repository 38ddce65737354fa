"""Bad inputs and faults end in a named error (or a recovery), never a traceback for a user error, lost work or
silent garbage: one test per failure found by trying the package as a user would."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_core.checkpoint import CheckpointError
from maskdino.checkpoints.weights import read_weights, save_weights
from maskdino.cli import main
from maskdino.config import ConfigError, apply_overrides, get_experiment, load_experiment
from maskdino.modeling.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_experiment(root: Path, **extra: str):
    opts = [
        f"data.root={root}", "data.synthetic_seed=3", "data.synthetic_train=4", "data.synthetic_val=1",
        "data.synthetic_size=64", "data.image_size=64", "data.test_short_edge=64", "data.test_max_size=64",
        "model.decoder.num_queries=10", "model.loss.train_num_points=64", "train.progress_bar=false",
        "train.tensorboard=false", "train.eval_period=0", "train.log_period=1", "train.ims_per_batch=2",
    ]  # fmt: skip
    opts += [f"{k}={v}" for k, v in extra.items()]
    return apply_overrides(get_experiment("tiny"), opts)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random tiny weights with their embedded config (what `maskdino predict --weights` reads)."""
    cfg = _tiny_experiment(tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    save_weights(path, model.state_dict(), config=cfg.to_dict())
    return path


def _photo(path: Path, size=(80, 60), seed=0) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


# ------------------------------------------------------------------------------------------------ predict


def test_predict_one_bad_image_costs_that_image_only(weights, tmp_path, capsys):
    good1 = _photo(tmp_path / "a.jpg")
    truncated = tmp_path / "b.jpg"
    truncated.write_bytes(_photo(tmp_path / "full.jpg", seed=1).read_bytes()[:300])
    not_an_image = tmp_path / "c.png"
    not_an_image.write_text("hello")
    good2 = _photo(tmp_path / "d.png", seed=2)
    out = tmp_path / "out"
    code = main(["predict", str(good1), str(truncated), str(not_an_image), str(good2), "--weights", str(weights),
                 "--out", str(out), "--score-threshold", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1  # some images failed
    assert "Traceback" not in err
    assert f"{truncated}: failed" in err and f"{not_an_image}: failed" in err
    # the good images' results are written
    records = json.loads((out / "predictions.json").read_text())
    assert {Path(r["file_name"]).name for r in records} == {"a.jpg", "d.png"}
    assert (out / "a.png").is_file() and (out / "d.png").is_file()


def test_predict_expands_a_folder_and_names_a_missing_file(weights, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "x.jpg")
    _photo(folder / "y.png", seed=3)
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(folder), "--weights", str(weights), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["x.png", "y.png"]
    code = main(
        ["predict", str(tmp_path / "nope.jpg"), "--weights", str(weights), "--out", str(tmp_path / "o2")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "image not found" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--weights", str(weights), "--out", str(tmp_path / "o3")]) == 2
    assert "folder without images" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "random", "truncated", "pickle_that_runs_code", "folder"])
@pytest.mark.parametrize("with_config", [False, True])
def test_unreadable_weights_are_named_and_never_loaded_unsafely(weights, tmp_path, capsys, kind, with_config):
    photo = _photo(tmp_path / "p.jpg")
    bad = tmp_path / "bad.pth"
    if kind == "random":
        bad.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        bad.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 3])
    elif kind == "pickle_that_runs_code":

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        with open(bad, "wb") as f:
            pickle.dump({"model": {"w": torch.zeros(1)}, "x": Evil()}, f)
    elif kind == "folder":
        bad.mkdir()
    argv = ["predict", str(photo), "--weights", str(bad), "--out", str(tmp_path / "o")]
    if with_config:
        argv += ["--config", "tiny"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err and str(bad) in err
    words = {"missing": "not found", "folder": "folder", "random": "not a valid checkpoint",
             "truncated": "not a valid checkpoint", "pickle_that_runs_code": "would run code"}  # fmt: skip
    assert words[kind] in err
    assert not (tmp_path / "pwned").exists()


def test_weights_without_config_need_config(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(get_experiment("tiny").model)
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    photo = _photo(tmp_path / "p.jpg")
    assert main(["predict", str(photo), "--weights", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "has no embedded config; pass --config" in capsys.readouterr().err
    # the weights of another model: every mismatching key is named
    assert main(["predict", str(photo), "--weights", str(path), "--config", "coco-instance-r50-4s",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "does not match MaskDINO" in err and "Traceback" not in err


def test_non_finite_weights_are_an_error_naming_the_tensor(weights, tmp_path, capsys):
    sd = read_weights(weights).state_dict
    key = "predictor.class_embed.weight"
    sd = {k: (torch.full_like(v, float("nan")) if k == key else v) for k, v in sd.items()}
    path = tmp_path / "nan.pth"
    save_weights(path, sd, config=read_weights(weights).config)
    with pytest.raises(CheckpointError, match=r"'predictor\.class_embed\.weight'.*non-finite"):
        read_weights(path)
    assert (
        main(
            ["predict", str(_photo(tmp_path / "p.jpg")), "--weights", str(path), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert key in capsys.readouterr().err


def test_huge_image_is_a_clear_error_and_instance_masks_are_thresholded_before_pasting(weights):
    from maskdino.inference.predictor import MAX_OUTPUT_PIXELS, ImagePredictor, ImageTooLargeError, load_model

    loaded = load_model(weights)
    predictor = ImagePredictor.from_model(loaded.model, loaded.config)
    side = int(math.isqrt(MAX_OUTPUT_PIXELS)) + 2
    huge = torch.zeros(3, side, side, dtype=torch.uint8).expand(3, side, side)  # no memory: a broadcast view
    with pytest.raises(ImageTooLargeError, match="megapixels"):
        predictor(huge)
    image = (torch.rand(3, 90, 120) * 255).to(torch.uint8)
    everything = predictor(image, tasks=["instance"]).instances
    kept = predictor(image, tasks=["instance"], score_threshold=0.02).instances
    # thresholding before pasting keeps exactly the instances a filter after pasting would keep
    mask = everything.scores >= 0.02
    assert torch.equal(kept.labels, everything.labels[mask])
    torch.testing.assert_close(kept.scores, everything.scores[mask], atol=0, rtol=0)
    assert torch.equal(kept.masks, everything.masks[mask])


# ------------------------------------------------------------------------------------------------ config


def test_scientific_notation_inf_and_nan_in_overrides_and_files(tmp_path):
    cfg = apply_overrides(
        get_experiment("tiny"), ["solver.base_lr=2e-4", "solver.warmup_factor=1", "train.time_budget_s=inf"]
    )
    assert cfg.solver.base_lr == 2e-4 and isinstance(cfg.solver.warmup_factor, float)
    assert cfg.train.time_budget_s == math.inf
    path = tmp_path / "exp.yaml"
    path.write_text("base: tiny\nsolver:\n  base_lr: 3e-4\n  weight_decay: 1E-2\n")
    loaded = load_experiment(str(path))
    assert loaded.solver.base_lr == 3e-4 and loaded.solver.weight_decay == 1e-2
    for bad, words in (
        (["model.loss.class_weight=nan"], "model.loss.class_weight: NaN"),
        (["solver.base_lr=inf"], "solver.base_lr: must be finite"),
        (["solver.base_lr=-1e-3"], "solver.base_lr = -0.001; must be > 0"),
        (["model.loss.mask_weight=-1"], "model.loss.mask_weight = -1.0; must be >= 0"),
        (["model.decoder.dn=yes"], "model.decoder.dn = 'yes'"),
        (["model.decoder.num_queries=0"], "model.decoder.num_queries = 0; must be > 0"),
        (["model.inference.thing_classes=[7]"], "thing_classes [7] are not < num_classes"),
        (["train.device=gpu"], "train.device = 'gpu'"),
        (["solver.base_lr=[1"], "cannot parse the value"),
        (["data.flip_prob=1.5"], "data.flip_prob = 1.5; must be <= 1"),
    ):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(")):
            apply_overrides(get_experiment("tiny"), bad)


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver: {base_lr: [\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "Traceback" not in err
    assert main(["train", "--config", "tiny", "--opts", "solver.base_lr=nan"]) == 2
    assert "NaN" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exit 2 with usage
        main(["demo", "--time-budget", "-5"])
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "s"), "--size", "8"])


# ------------------------------------------------------------------------------------------------ training


def test_resume_with_a_missing_checkpoint_stops_naming_it(tmp_path):
    from maskdino.checkpoints.training import MissingCheckpointError
    from maskdino.engine.trainer import Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000004.pth")
    cfg = _tiny_experiment(tmp_path / "data", **{"train.output_dir": str(out), "train.max_iter": "2"})
    with pytest.raises(MissingCheckpointError, match="model_0000004.pth"):
        Trainer(cfg, resume=True)
    assert not (out / "model_final.pth").exists()
    # a truncated checkpoint is named too
    (out / "model_0000004.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="model_0000004.pth"):
        Trainer(cfg, resume=True)


def test_orphaned_checkpoint_temporaries_are_removed_at_start(tmp_path):
    from maskdino.engine.trainer import Trainer

    out = tmp_path / "run"
    out.mkdir()
    orphan = out / ".model_0000010.pth.k2j3h4.tmp"
    orphan.write_bytes(b"x" * 100)
    other = out / ".notes.tmp"
    other.write_text("someone else's")
    cfg = _tiny_experiment(tmp_path / "data", **{"train.output_dir": str(out), "train.max_iter": "0"})
    Trainer(cfg)
    assert not orphan.exists() and other.exists()


def test_diverging_training_stops_with_the_iteration_and_keeps_the_last_finite_checkpoint(tmp_path):
    from maskdino.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "run"
    cfg = _tiny_experiment(
        tmp_path / "data",
        **{
            "train.output_dir": str(out),
            "train.max_iter": "30",
            "train.checkpoint_period": "1",
            "train.keep_checkpoints": "0",
            "solver.base_lr": "10",
            "solver.clip_value": "0",
            "solver.warmup_iters": "0",
            "solver.optimizer": "sgd",
        },  # fmt: skip
    )
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match=r"at iteration \d+|by iteration \d+") as err:
        trainer.run()
    msg = str(err.value)
    assert "non-finite" in msg
    saved = sorted(out.glob("model_*.pth"))
    if saved:  # the error names the last checkpoint, which exists and is finite
        last = out / (out / "last_checkpoint").read_text().strip()
        assert str(last) in msg and last.is_file()
        state = torch.load(last, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    else:
        assert "No checkpoint of this run was written yet" in msg


def test_clipping_is_on_by_default():
    assert get_experiment("coco-instance-r50-3s-d1-2048").solver.clip_value == 0.01
    assert get_experiment("tiny").solver.clip_value > 0
