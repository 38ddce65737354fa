"""``maskdino demo``: synthetic data -> train the tiny preset on CPU within a time budget -> evaluate ->
prediction pictures and a loss curve. Everything lands under ``--output`` (default ``outputs/demo``)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from maskdino.config import ExperimentConfig, apply_overrides, get_experiment
from maskdino.engine.metrics import format_metrics

__all__ = ["demo_config", "run_demo", "write_prediction_pictures"]


def demo_config(
    output: str | Path = "outputs/demo", time_budget_s: float | None = 720.0, opts=()
) -> ExperimentConfig:
    cfg = get_experiment("tiny")
    out = Path(output)
    cfg.data.root = str(out / "data")
    cfg.train.output_dir = str(out / "train")
    cfg.train.time_budget_s = time_budget_s
    if opts:
        cfg = apply_overrides(cfg, list(opts))
    return cfg


def choose_threads(requested: int | None = None) -> int:
    """Torch threads for the demo: all cores on an idle machine, fewer when other processes keep cores busy
    (oversubscribed OpenMP threads spin in barriers and can make a step many times slower)."""
    import os

    cores = os.cpu_count() or 1
    if requested:
        return max(1, requested)
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def _clean_train_dir(path: Path) -> None:
    """Remove what a previous demo run wrote (only our own file names)."""
    if not path.is_dir():
        return
    for p in list(path.glob("model_*.pth")) + [path / "last_checkpoint", path / "metrics.jsonl"]:
        p.unlink(missing_ok=True)
    for d in (path / "tensorboard", path / "eval"):
        if d.is_dir():
            shutil.rmtree(d)


@torch.no_grad()
def write_prediction_pictures(
    model, dataset, meta, out_dir: str | Path, num: int = 8, score_threshold: float = 0.3
):
    """For the first ``num`` images: input | instances (masks, boxes, labels, scores) | panoptic, side by side."""
    from maskdino.data.coco import read_image
    from maskdino.inference.visualize import draw_instances, draw_panoptic, save_image

    out_dir = Path(out_dir)
    model.eval()
    paths = []
    for i in range(min(num, len(dataset))):
        s = dataset[i]
        original = read_image(s["file_name"])
        # Small images (the 128-px synthetic ones) are drawn 3x larger so that labels and scores are readable.
        scale = max(1, 384 // max(s["height"], s["width"]))
        out_size = (s["height"] * scale, s["width"] * scale)
        pred = model.predict([s["image"].as_subclass(torch.Tensor).float()], original_sizes=[out_size])[0]
        if scale > 1:
            import torchvision.transforms.v2.functional as F

            original = F.resize(original, list(out_size), interpolation=F.InterpolationMode.NEAREST)
        panels = [original]
        if pred.instances is not None:
            panels.append(draw_instances(original, pred.instances, meta, score_threshold))
        if pred.panoptic is not None:
            panels.append(draw_panoptic(original, pred.panoptic, meta))
        gap = torch.full((3, original.shape[1], 4), 255, dtype=torch.uint8)
        row = torch.cat([x for p in panels for x in (p, gap)][:-1], dim=2)
        path = out_dir / f"{Path(s['file_name']).stem}.png"
        save_image(row, path)
        paths.append(path)
    return paths


def run_demo(
    output: str | Path = "outputs/demo",
    time_budget_s: float | None = 720.0,
    opts=(),
    resume: bool = False,
    num_pictures: int = 8,
    loss_png: str | Path | None = None,
    threads: int | None = None,
) -> dict:
    from maskdino.data.synthetic import generate_synthetic
    from maskdino.engine.trainer import Trainer
    from maskdino.inference.visualize import plot_loss_curve

    t0 = time.perf_counter()
    n_threads = choose_threads(threads)
    torch.set_num_threads(n_threads)
    cfg = demo_config(output, time_budget_s, opts)
    out = Path(output)
    d = cfg.data
    print(f"[maskdino] demo: synthetic shapes ({d.synthetic_train} train / {d.synthetic_val} val, {d.synthetic_size} px) "
          f"under {d.root}", flush=True)  # fmt: skip
    generate_synthetic(d.root, d.synthetic_seed, d.synthetic_train, d.synthetic_val, d.synthetic_size)
    if not resume:
        _clean_train_dir(Path(cfg.train.output_dir))
    budget = "no limit" if time_budget_s is None else f"{time_budget_s:.0f} s"
    print(f"[maskdino] demo: training the tiny preset on CPU with {n_threads} thread(s) (time budget {budget}, at most "
          f"{cfg.train.max_iter} iterations)", flush=True)  # fmt: skip
    trainer = Trainer(cfg, resume=resume)
    result = trainer.run()
    metrics = result.metrics
    pictures = write_prediction_pictures(
        trainer.model, trainer.val_ds, trainer.meta, out / "predictions", num_pictures
    )
    curve = out / "loss_curve.png"
    plotted = plot_loss_curve(
        Path(cfg.train.output_dir) / "metrics.jsonl", curve, "Mask DINO tiny on synthetic shapes"
    )
    if plotted and loss_png is not None:
        Path(loss_png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(curve, loss_png)
    total = time.perf_counter() - t0
    summary = {
        "iterations": result.iteration,
        "train_seconds": round(result.train_seconds, 1),
        "total_seconds": round(total, 1),
        "stopped_by_time_budget": result.stopped_early,
        "torch_threads": n_threads,
        "box_AP": metrics.get("bbox/AP"),
        "mask_AP": metrics.get("segm/AP"),
        "PQ": metrics.get("panoptic/PQ"),
        "mIoU": metrics.get("sem_seg/mIoU"),
        "checkpoint": str(result.final_checkpoint),
        "loss_curve": str(curve) if plotted else None,
        "pictures": [str(p) for p in pictures],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("", flush=True)
    print(f"[maskdino] demo finished in {total / 60:.1f} min ({result.iteration} iterations, "
          f"{result.train_seconds / 60:.1f} min of training)", flush=True)  # fmt: skip
    print(f"[maskdino] synthetic val: {format_metrics(metrics)}", flush=True)
    print(
        f"[maskdino] pictures: {out / 'predictions'}   loss curve: {curve if plotted else '(matplotlib missing)'}"
    )
    print(f"[maskdino] weights: {result.final_checkpoint}   summary: {out / 'summary.json'}", flush=True)
    return summary
