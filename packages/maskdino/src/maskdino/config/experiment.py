"""Experiment configuration: model + data + solver + train settings, loadable from YAML with strict keys.

An experiment starts from a named base (``get_experiment(name)``: every model preset has one; ``tiny``
is the CPU demo on the synthetic dataset) and is changed by a YAML file and/or ``key=value`` overrides::

    # my_experiment.yaml
    base: coco-instance-r50-3s-d1-2048     # optional; default: the official R50 COCO instance recipe
    data: {train_json: /data/coco/annotations/instances_train2017.json, ...}
    solver: {base_lr: 2.0e-4}
    train: {ims_per_batch: 8, max_iter: 90000}

Unknown keys at any depth are errors that name the full dotted key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .io import (
    CONFIG_SUFFIXES,
    ConfigError,
    DictConfig,
    check_ranges,
    parse_value,
    read_config_file,
    write_config_file,
)
from .model import NONNEG, POS, PROB, MaskDINOConfig
from .presets import PRESETS as MODEL_PRESETS
from .presets import get_preset

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "SolverConfig",
    "TrainConfig",
    "apply_overrides",
    "get_experiment",
    "list_experiments",
    "load_experiment",
]

DatasetKind = Literal["synthetic", "coco_instance", "coco_panoptic", "semantic"]


@dataclass
class DataConfig:
    """Where the data is and how it is augmented.

    ``kind``:
      - ``synthetic``: generated under ``root`` (``maskdino synth``) if absent; panoptic-style targets
        (things + stuff), evaluated with box/mask AP (things), PQ and mIoU.
      - ``coco_instance``: ``train_json``/``train_images``, ``val_json``/``val_images``.
      - ``coco_panoptic``: as instance plus ``train_panoptic``/``val_panoptic`` (PNG folders);
        ``val_instances_json`` (optional) enables box/mask AP.
      - ``semantic``: ADE20K-style ``train_images``/``train_labels``, ``val_images``/``val_labels``.
    """

    kind: DatasetKind = "coco_instance"
    root: str = "datasets/coco"
    train_json: str | None = "datasets/coco/annotations/instances_train2017.json"
    train_images: str | None = "datasets/coco/train2017"
    train_panoptic: str | None = None
    train_labels: str | None = None
    val_json: str | None = "datasets/coco/annotations/instances_val2017.json"
    val_images: str | None = "datasets/coco/val2017"
    val_panoptic: str | None = None
    val_labels: str | None = None
    val_instances_json: str | None = None
    class_names: list[str] = field(default_factory=list)
    # synthetic generator parameters (kind = synthetic)
    synthetic_seed: int = 0
    synthetic_train: int = field(default=200, metadata=POS)
    synthetic_val: int = field(default=50, metadata=POS)
    synthetic_size: int = field(default=128, metadata={"min": 32})
    # augmentation (LSJ) and test-time resize
    image_size: int = field(default=1024, metadata=POS)
    min_scale: float = field(default=0.1, metadata=POS)
    max_scale: float = field(default=2.0, metadata=POS)
    flip_prob: float = field(default=0.5, metadata=PROB)
    #: test-time resize of the shorter side (detectron2 ``ResizeShortestEdge``), longer side capped below.
    test_short_edge: int = field(default=800, metadata=POS)
    test_max_size: int = field(default=1333, metadata=POS)
    #: how test images are resized: ``pil`` = PIL bilinear on the uint8 image, as detectron2 (what the official
    #: checkpoints were evaluated with; converted checkpoints record it); ``tensor`` = torchvision's antialiased
    #: bilinear on the uint8 tensor (the same as the training augmentation's resize; the default for models trained
    #: here). The two differ by rounding (see benchmarks/RESULTS.md).
    test_resize: Literal["pil", "tensor"] = "tensor"
    filter_empty: bool = True
    num_workers: int = field(default=4, metadata=NONNEG)
    #: evaluate on at most this many val images (None = all).
    max_val_images: int | None = field(default=None, metadata=POS)


@dataclass
class SolverConfig:
    """Optimizer, LR schedule, clipping, AMP (official MaskDINO defaults)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    base_lr: float = field(default=1e-4, metadata=POS)
    weight_decay: float = field(default=0.05, metadata=NONNEG)
    #: weight decay of normalisation parameters (SOLVER.WEIGHT_DECAY_NORM).
    weight_decay_norm: float = field(default=0.0, metadata=NONNEG)
    #: weight decay of nn.Embedding weights (SOLVER.WEIGHT_DECAY_EMBED).
    weight_decay_embed: float = field(default=0.0, metadata=NONNEG)
    #: LR multiplier of parameters under ``backbone.`` (SOLVER.BACKBONE_MULTIPLIER).
    backbone_multiplier: float = field(default=0.1, metadata=NONNEG)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"min": 0, "max": 1})
    #: learning-rate schedule: ``multistep`` (official) or ``cosine``.
    lr_scheduler: Literal["multistep", "cosine"] = "multistep"
    steps: list[int] = field(default_factory=lambda: [327778, 355092], metadata=NONNEG)
    gamma: float = field(default=0.1, metadata=NONNEG)
    warmup_iters: int = field(default=10, metadata=NONNEG)
    warmup_factor: float = field(default=1.0, metadata=NONNEG)
    #: full-model gradient clipping: L2 norm of all gradients together (0 = off).
    clip_value: float = field(default=0.01, metadata=NONNEG)
    clip_norm_type: float = field(default=2.0, metadata={"gt": 0, "allow_inf": True})
    #: mixed precision: on CUDA float16 autocast + GradScaler; on CPU only when ``amp_dtype`` is bfloat16.
    amp: bool = True
    amp_dtype: Literal["float16", "bfloat16"] = "float16"


@dataclass
class TrainConfig:
    max_iter: int = field(default=368750, metadata=NONNEG)
    #: images per optimizer step, all ranks and accumulation steps together (detectron2 IMS_PER_BATCH).
    ims_per_batch: int = field(default=16, metadata=POS)
    #: gradient accumulation: micro-batches per optimizer step.
    accumulate: int = field(default=1, metadata=POS)
    seed: int = 42
    output_dir: str = "outputs/train"
    eval_period: int = field(default=5000, metadata=NONNEG)
    checkpoint_period: int = field(default=5000, metadata=NONNEG)
    log_period: int = field(default=20, metadata=POS)
    #: stop cleanly (checkpoint, then evaluation) after this many seconds of training (None = no limit).
    time_budget_s: float | None = field(default=None, metadata={"gt": 0, "allow_inf": True})
    #: with a time budget: multiply the learning rate by ``solver.gamma`` once this fraction of the budget has
    #: passed (an iteration-based step would never be reached when the budget ends training first).
    budget_lr_drop: float | None = field(default=None, metadata=PROB)
    #: weights to start from (our checkpoint, a state dict, or an official checkpoint).
    init_weights: str | None = None
    device: str = "auto"
    find_unused_parameters: bool = True
    #: keep the last N periodic checkpoints (0 = all).
    keep_checkpoints: int = field(default=2, metadata=NONNEG)
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class ExperimentConfig(DictConfig):
    """Model + data + solver + train; ``to_dict`` / strict ``from_dict`` come from :class:`DictConfig`."""

    model: MaskDINOConfig = field(default_factory=MaskDINOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        try:
            self.model.validate()
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None
        for key in ("data", "solver", "train"):
            check_ranges(getattr(self, key), key + ".")
        d = self.train.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"train.device = {d!r}; expected auto, cpu, cuda or cuda:N")
        if self.data.min_scale > self.data.max_scale:
            raise ConfigError(
                f"data.min_scale ({self.data.min_scale}) > data.max_scale ({self.data.max_scale})"
            )
        if self.train.ims_per_batch % self.train.accumulate:
            raise ConfigError(
                f"train.ims_per_batch ({self.train.ims_per_batch}) must be divisible by train.accumulate "
                f"({self.train.accumulate})"
            )

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (``.json``), readable by :func:`load_experiment`."""
        write_config_file(self.to_dict(), path)


# ------------------------------------------------------------------------------------------ experiments
def _demo_experiment() -> ExperimentConfig:
    """The tiny preset on the synthetic shapes, sized for a 2-core CPU (``maskdino demo``)."""
    model = get_preset("tiny")
    model.num_classes = 5  # circle, square, triangle (things) + sky, grass (stuff)
    model.inference.thing_classes = [0, 1, 2]
    model.inference.instance_on = True
    model.inference.panoptic_on = True
    model.inference.semantic_on = True
    data = DataConfig(
        kind="synthetic",
        root="outputs/demo/data",
        train_json=None,
        train_images=None,
        val_json=None,
        val_images=None,
        synthetic_train=400,
        synthetic_val=50,
        synthetic_size=128,
        image_size=128,
        min_scale=0.8,
        max_scale=1.25,
        test_short_edge=128,
        test_max_size=128,
        num_workers=0,
    )
    # From-scratch training (no ImageNet weights are downloaded): the backbone learns at the full rate.
    solver = SolverConfig(
        base_lr=4e-4,
        backbone_multiplier=1.0,
        steps=[3000],
        warmup_iters=50,
        warmup_factor=0.01,
        clip_value=1.0,
        amp=False,
    )
    train = TrainConfig(
        max_iter=4000,
        ims_per_batch=4,
        seed=0,
        output_dir="outputs/demo/train",
        eval_period=0,
        checkpoint_period=500,
        log_period=10,
        time_budget_s=None,
        budget_lr_drop=0.8,
        keep_checkpoints=1,
    )
    return ExperimentConfig(model=model, data=data, solver=solver, train=train)


def _coco_experiment(model_preset: str) -> ExperimentConfig:
    model = get_preset(model_preset)
    cfg = ExperimentConfig(model=model)
    if "panoptic" in model_preset:
        cfg.data = DataConfig(
            kind="coco_panoptic",
            train_json="datasets/coco/annotations/panoptic_train2017.json",
            train_images="datasets/coco/train2017",
            train_panoptic="datasets/coco/panoptic_train2017",
            val_json="datasets/coco/annotations/panoptic_val2017.json",
            val_images="datasets/coco/val2017",
            val_panoptic="datasets/coco/panoptic_val2017",
            val_instances_json="datasets/coco/annotations/instances_val2017.json",
        )
    elif "ade20k" in model_preset:
        # configs/ade20k/semantic-segmentation: 160k iterations, batch 16, crop 512, LSJ-free "semantic" mapper
        # (we use LSJ at 512), test shorter side 512.
        cfg.data = DataConfig(
            kind="semantic",
            root="datasets/ADEChallengeData2016",
            train_json=None,
            val_json=None,
            train_images="datasets/ADEChallengeData2016/images/training",
            train_labels="datasets/ADEChallengeData2016/annotations/training",
            val_images="datasets/ADEChallengeData2016/images/validation",
            val_labels="datasets/ADEChallengeData2016/annotations/validation",
            image_size=512,
            min_scale=0.5,
            max_scale=2.0,
            test_short_edge=512,
            test_max_size=2048,
        )
        cfg.train.max_iter = 160000
        cfg.solver.steps = [135000, 150000]
    return cfg


def list_experiments() -> list[str]:
    return sorted(MODEL_PRESETS)


def get_experiment(name: str) -> ExperimentConfig:
    """The named experiment: ``tiny`` = the CPU demo; every other model preset = its official recipe."""
    if name == "tiny":
        cfg = _demo_experiment()
    elif name in MODEL_PRESETS:
        cfg = _coco_experiment(name)
    else:
        raise ConfigError(
            f"unknown experiment {name!r}; available: {list_experiments()} or a .yaml/.json file"
        )
    cfg.validate()
    return copy.deepcopy(cfg)


def _deep_merge(base: dict[str, Any], upd: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if k not in out:
            raise ConfigError(f"unknown config key {prefix + k!r}")
        if isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _deep_merge(out[k], v, prefix + k + ".")
        else:
            out[k] = v
    return out


def load_experiment(spec: str) -> ExperimentConfig:
    """A preset name, or a YAML/JSON file (optionally with ``base: PRESET``; default base: the R50 COCO recipe)."""
    path = Path(spec)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        return get_experiment(spec)
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", "coco-instance-r50-3s-d1-2048")
    merged = _deep_merge(get_experiment(base).to_dict(), data)
    try:
        return ExperimentConfig.from_dict(merged)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(cfg: ExperimentConfig, opts: list[str]) -> ExperimentConfig:
    """Apply ``key=value`` overrides (dotted keys, YAML values: ``train.max_iter=100``, ``solver.steps=[50,80]``)."""
    d = cfg.to_dict()
    for opt in opts:
        if "=" not in opt:
            raise ConfigError(f"override {opt!r} is not of the form key=value")
        key, raw = opt.split("=", 1)
        value = parse_value(raw)
        node = d
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(node[parts[-1]], str) and value is not None and not isinstance(value, str):
            value = raw  # YAML would read `dn=no` as False: a string field keeps the text as written
        node[parts[-1]] = value
    return ExperimentConfig.from_dict(d)
