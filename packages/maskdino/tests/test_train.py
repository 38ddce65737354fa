"""Experiment config, optimizer groups, LR schedule, non-finite loss handling, gradient accumulation and exact
resume of the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from maskdino.config import ConfigError, ExperimentConfig, apply_overrides, get_experiment, load_experiment
from maskdino.engine.optim import WarmupSchedule, build_optimizer, param_groups
from maskdino.engine.trainer import NonFiniteLossError, Trainer


class StandIn(nn.Module):
    """A deterministic stand-in detector: predicts the number of instances and their mean box from the image.

    Has the parameter kinds the optimizer distinguishes (backbone conv, GroupNorm, LayerNorm, Embedding, a free
    nn.Parameter). ``nan_at``: return a NaN loss on that forward call (1-based).
    """

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.GroupNorm(2, 8), nn.ReLU())
        self.norm = nn.LayerNorm(8)
        self.embed = nn.Embedding(3, 8)
        self.level_embed = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 5)
        self.calls = 0
        self.nan_at = nan_at

    def forward(self, images, targets):
        self.calls += 1
        feats = torch.stack([self.backbone(im[None] / 255.0).mean((2, 3))[0] for im in images])
        h = self.norm(feats + self.level_embed + self.embed.weight.sum(0))
        out = self.head(h)
        count = torch.tensor([float(len(t["labels"])) for t in targets])
        box = torch.stack([t["boxes"].mean(0) if len(t["boxes"]) else torch.zeros(4) for t in targets]) / 64
        loss_count = ((out[:, 0] - count) ** 2).mean()
        loss_box = ((out[:, 1:] - box) ** 2).sum(1).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss_box = loss_box * float("nan")
        return {"loss_count": loss_count, "loss_box": loss_box}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from maskdino.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synth"), seed=1, num_train=6, num_val=2, size=64)


def _cfg(data_root: Path, out: Path, *opts: str) -> ExperimentConfig:
    cfg = get_experiment("tiny")
    return apply_overrides(
        cfg,
        [
            f"data.root={data_root}",
            "data.synthetic_train=6",
            "data.synthetic_val=2",
            "data.synthetic_seed=1",
            "data.synthetic_size=64",
            "data.image_size=64",
            "data.test_short_edge=64",
            "data.test_max_size=64",
            "data.num_workers=0",
            f"train.output_dir={out}",
            "train.log_period=1",
            "train.progress_bar=false",
            "train.tensorboard=false",
            "train.ims_per_batch=2",
            "train.checkpoint_period=0",
            "train.eval_period=0",
            *opts,
        ],
    )


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["total_loss"] for r in rows if "total_loss" in r}


def test_config_yaml_strict_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(
        "base: tiny\ntrain:\n  max_iter: 7\nsolver:\n  base_lr: 0.001\nmodel:\n  decoder:\n    num_queries: 10\n"
    )
    cfg = load_experiment(str(p))
    assert cfg.train.max_iter == 7 and cfg.solver.base_lr == 1e-3 and cfg.model.decoder.num_queries == 10
    assert cfg.model.backbone.name == get_experiment("tiny").model.backbone.name
    p.write_text("base: tiny\ntrain:\n  max_iters: 7\n")
    with pytest.raises(ConfigError, match="train.max_iters"):
        load_experiment(str(p))
    p.write_text("base: tiny\nmodel:\n  decoder:\n    n_queries: 7\n")
    with pytest.raises(ConfigError, match="model.decoder.n_queries"):
        load_experiment(str(p))
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(cfg, ["train.max_iter=abc"])
    cfg2 = apply_overrides(cfg, ["solver.steps=[5, 6]", "train.time_budget_s=null", "data.kind=semantic"])
    assert cfg2.solver.steps == [5, 6] and cfg2.train.time_budget_s is None
    # round trip through to_dict / YAML
    cfg2.save(tmp_path / "saved.yaml")
    import yaml

    assert ExperimentConfig.from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text())) == cfg2
    with pytest.raises(ConfigError, match="unknown experiment"):
        get_experiment("nope")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_experiment_save_load_round_trip(tmp_path, suffix):
    cfg = apply_overrides(get_experiment("tiny"), ["train.max_iter=9", "model.decoder.num_queries=12"])
    path = tmp_path / f"exp{suffix}"
    cfg.save(path)
    assert load_experiment(str(path)) == cfg


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model": {"decoder": {"n_queries": 7}}}, "unknown config key 'model.decoder.n_queries'"),
        ({"optimizer": {}}, "unknown config key 'optimizer'"),
        ({"solver": 1}, "solver: expected a mapping, got int"),
        ({"solver": {"steps": [1, "2"]}}, r"solver.steps\[1\]: expected an integer, got '2'"),
        ({"model": {"decoder": {"dn": "yes"}}}, r"model.decoder.dn = 'yes'; expected one of \['no', 'seg'\]"),
        ({"train": {"ims_per_batch": 3, "accumulate": 2}}, r"train.ims_per_batch \(3\) must be divisible"),
    ],
)
def test_experiment_from_dict_is_strict(bad, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        ExperimentConfig.from_dict(bad)


def test_param_groups_follow_official_rules():
    from maskdino.modeling.model import build_model

    cfg = get_experiment("tiny")
    cfg.solver.backbone_multiplier = 0.1
    model = build_model(cfg.model)
    groups = param_groups(model, cfg.solver)
    by_name = {g["name"]: g for g in groups}
    unique = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(groups) == len(unique)  # shared modules (box head) appear once
    modules = dict(model.named_modules())
    base, wd = cfg.solver.base_lr, cfg.solver.weight_decay
    seen_kinds = set()
    for name, g in by_name.items():
        mod = modules[name.rsplit(".", 1)[0]] if "." in name else model
        if name.startswith("backbone."):
            assert g["lr"] == pytest.approx(base * 0.1), name
        else:
            assert g["lr"] == pytest.approx(base), name
        if isinstance(mod, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d):
            assert g["weight_decay"] == 0.0, name
            seen_kinds.add("norm")
        elif isinstance(mod, nn.Embedding):
            assert g["weight_decay"] == 0.0, name
            seen_kinds.add("embedding")
        else:
            assert g["weight_decay"] == wd, name
            seen_kinds.add("other")
    assert seen_kinds == {"norm", "embedding", "other"}
    # the encoder's level_embed is a free parameter: it keeps weight decay (as the official build_optimizer)
    level = [n for n in by_name if n.endswith("level_embed")]
    assert level and all(by_name[n]["weight_decay"] == wd for n in level)
    opt = build_optimizer(model, cfg.solver)
    assert isinstance(opt, torch.optim.AdamW)


def test_warmup_multistep_schedule():
    cfg = get_experiment("tiny").solver
    cfg.warmup_iters, cfg.warmup_factor, cfg.steps, cfg.gamma = 10, 0.001, [20, 30], 0.1
    f = WarmupSchedule(cfg, 40)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == 1.0 and f(19) == 1.0
    assert f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)
    cfg.lr_scheduler = "cosine"
    cfg.warmup_iters = 0
    g = WarmupSchedule(cfg, 40)
    assert g(0) == 1.0 and g(20) == pytest.approx(0.5) and g(40) == pytest.approx(0.0)


def test_non_finite_loss_stops_with_clear_error_and_no_checkpoint(data_root, tmp_path):
    cfg = _cfg(
        data_root, tmp_path, "train.max_iter=6", "train.checkpoint_period=1", "train.keep_checkpoints=0"
    )
    tr = Trainer(cfg, model=StandIn(nan_at=3))
    with pytest.raises(NonFiniteLossError) as e:
        tr.run()
    msg = str(e.value)
    assert "loss_box = nan" in msg and "iteration 3" in msg
    names = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    # iterations 1 and 2 were saved; nothing for the failing iteration 3, and no final weights
    assert names == ["model_0000001.pth", "model_0000002.pth"] and not (tmp_path / "model_final.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


def test_gradient_accumulation_matches_full_batch(data_root, tmp_path):
    """Per-image-mean losses: 2 micro-batches of 1 image == 1 batch of 2 images (same samples, same update)."""
    runs = {}
    for acc in (1, 2):
        torch.manual_seed(0)
        cfg = _cfg(data_root, tmp_path / f"acc{acc}", "train.max_iter=3", f"train.accumulate={acc}")
        tr = Trainer(cfg, model=StandIn())
        tr.val_ds = None
        tr.run()
        runs[acc] = {k: v.clone() for k, v in tr.model.state_dict().items()}
    for k in runs[1]:
        torch.testing.assert_close(runs[1][k], runs[2][k], rtol=1e-5, atol=1e-6)


def test_resume_is_exact_with_the_tiny_model(data_root, tmp_path):
    """An interrupted + resumed run computes the same losses and weights as an uninterrupted one."""
    opts = ("train.max_iter=4", "model.loss.train_num_points=64", "model.decoder.num_queries=10")
    full = Trainer(_cfg(data_root, tmp_path / "full", *opts))
    full.val_ds = None
    full.run()
    part = Trainer(_cfg(data_root, tmp_path / "part", *opts))
    part.val_ds = None
    part.run(stop_at=2)
    assert (tmp_path / "part" / "last_checkpoint").read_text() == "model_0000002.pth"
    del part
    # perturb the global RNG: the resumed run must restore it from the checkpoint
    torch.manual_seed(1234)
    resumed = Trainer(_cfg(data_root, tmp_path / "part", *opts), resume=True)
    assert resumed.iteration == 2 and resumed.consumed == 4
    resumed.val_ds = None
    resumed.run()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for it in (1, 2, 3, 4):
        assert a[it] == b[it], (it, a[it], b[it])
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
