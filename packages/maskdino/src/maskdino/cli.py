"""Command line: ``maskdino {synth,train,eval,predict,convert,demo}`` (also ``python -m maskdino``).

    maskdino demo                                        # synthetic data -> train tiny on CPU -> eval -> pictures
    maskdino synth OUT_DIR --seed 0 --train 200 --val 50 --size 128
    maskdino train --config tiny --opts train.max_iter=100 solver.base_lr=2e-4 [--resume] [--output DIR]
    torchrun --nproc_per_node 8 -m maskdino train --config coco-instance-r50-3s-d1-2048
    maskdino eval --config tiny --weights outputs/demo/train/model_final.pth
    maskdino predict img1.jpg img2.jpg --weights model_final.pth --out preds/ --score-threshold 0.5
    maskdino convert ...                                 # official checkpoint -> ours (see maskdino.convert)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment preset name (e.g. tiny) or a .yaml/.json file")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.max_iter=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdino", description="Mask DINO: train, evaluate and run (no detectron2).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic shapes dataset (COCO instance + panoptic + semantic)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=200, help="number of training images")
    p.add_argument("--val", type=int, default=50, help="number of validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")

    p = sub.add_parser("train", help="train (single process, or under torchrun for DDP)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last_checkpoint (exactly)")
    p.add_argument("--output", help="output folder (overrides train.output_dir)")
    p.add_argument("--time-budget", type=float, help="stop cleanly after this many seconds of training")

    p = sub.add_parser("eval", help="evaluate weights on the config's val split")
    _add_config_args(p)
    p.add_argument("--weights", required=True)
    p.add_argument("--output", help="where to write metrics.json (default: next to the weights)")

    p = sub.add_parser("predict", help="draw predictions on images and write COCO-format results")
    p.add_argument("images", nargs="+")
    p.add_argument("--weights", required=True)
    p.add_argument("--config", help="experiment (default: the config stored in the checkpoint)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="output folder for PNGs and predictions.json")
    p.add_argument("--score-threshold", type=float, default=0.5)

    p = sub.add_parser("convert", help="convert an official Mask DINO checkpoint (arguments: see maskdino convert -h)")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the CPU demo: synthetic data, tiny model, evaluation, pictures")
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--time-budget", type=float, default=720.0, help="seconds of training (default 720 = 12 min)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--loss-png", help="also copy the loss curve here")
    p.add_argument("--threads", type=int, help="torch threads (default: the idle cores, from the load average)")
    return parser


def _load_cfg(args):
    from maskdino.engine.config import apply_overrides, load_experiment

    cfg = load_experiment(args.config)
    if args.opts:
        cfg = apply_overrides(cfg, args.opts)
    return cfg


def _cmd_synth(args) -> int:
    from maskdino.data.synthetic import generate_synthetic

    out = generate_synthetic(args.out_dir, args.seed, args.train, args.val, args.size)
    print(f"synthetic dataset written to {out} ({args.train} train, {args.val} val, {args.size} px)")
    return 0


def _cmd_train(args) -> int:
    from maskdino.engine.trainer import train

    cfg = _load_cfg(args)
    if args.output:
        cfg.train.output_dir = args.output
    if args.time_budget is not None:
        cfg.train.time_budget_s = args.time_budget
    train(cfg, resume=args.resume)
    return 0


def _build(cfg, weights: str):
    from maskdino.engine.checkpointing import load_model_weights
    from maskdino.model import build_model

    model = build_model(cfg.model)
    load_model_weights(model, weights)
    model.eval()
    return model


def _cmd_eval(args) -> int:
    import torch

    from maskdino.data.build import build_datasets
    from maskdino.engine.distributed import get_rank, init_distributed
    from maskdino.engine.evaluation import evaluate, format_metrics

    cfg = _load_cfg(args)
    _, _, device = init_distributed(cfg.train.device)
    _, val_ds, meta, spec = build_datasets(cfg.data, cfg.model.num_classes, splits=("val",))
    model = _build(cfg, args.weights).to(device) if device.type != "cpu" else _build(cfg, args.weights)
    out = Path(args.output) if args.output else Path(args.weights).parent / "eval"
    with torch.no_grad():
        results = evaluate(model, val_ds, meta, spec, device, output_dir=out, progress=True)
    if get_rank() == 0:
        print(f"[maskdino] {format_metrics(results)}")
        print(json.dumps({k: v for k, v in results.items() if "/AP-" not in k and "IoU-" not in k and "ACC-" not in k},
                         indent=1))  # fmt: skip
    return 0


def _checkpoint_extras(weights: str):
    import torch

    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception:  # safetensors or a foreign format: no embedded config
        return None, None
    if isinstance(ckpt, dict):
        return ckpt.get("config"), ckpt.get("metadata")
    return None, None


def _cmd_predict(args) -> int:
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    from maskdino.data.coco import DatasetMetadata, read_image
    from maskdino.data.transforms import ResizeShortestEdge
    from maskdino.engine.config import ExperimentConfig, apply_overrides
    from maskdino.engine.visualize import draw_instances, save_image

    cfg_dict, meta_dict = _checkpoint_extras(args.weights)
    if args.config:
        cfg = _load_cfg(args)
    elif cfg_dict is not None:
        cfg = ExperimentConfig.from_dict(cfg_dict)
        if args.opts:
            cfg = apply_overrides(cfg, args.opts)
    else:
        print("error: the weights file has no embedded config; pass --config", file=sys.stderr)
        return 2
    if meta_dict is not None:
        meta = DatasetMetadata.from_dict(meta_dict)
    else:
        n = cfg.model.num_classes
        meta = DatasetMetadata(names=[f"class_{k}" for k in range(n)], dataset_ids=list(range(1, n + 1)))
    model = _build(cfg, args.weights)
    resize = ResizeShortestEdge(cfg.data.test_short_edge, cfg.data.test_max_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for idx, path in enumerate(args.images):
        image = read_image(path)
        h, w = image.shape[-2:]
        from torchvision import tv_tensors

        resized = resize({"image": tv_tensors.Image(image)})["image"].as_subclass(torch.Tensor).float()
        with torch.no_grad():
            pred = model.predict([resized], original_sizes=[(h, w)])[0]
        inst = pred.instances
        if inst is None:
            print(f"{path}: the model has instance inference off; nothing to draw", file=sys.stderr)
            continue
        keep = inst.scores >= args.score_threshold
        inst = type(inst)(boxes=inst.boxes[keep], scores=inst.scores[keep], labels=inst.labels[keep],
                          masks=inst.masks[keep] if inst.masks is not None else None)  # fmt: skip
        stem = Path(path).stem
        image_id = int(stem) if stem.isdigit() else idx
        save_image(draw_instances(image, inst, meta, args.score_threshold), out / f"{stem}.png")
        for k in range(len(inst.scores)):
            x0, y0, x1, y1 = (float(v) for v in inst.boxes[k])
            rec = {
                "image_id": image_id,
                "file_name": str(path),
                "category_id": int(meta.dataset_ids[int(inst.labels[k])]),
                "category_name": meta.names[int(inst.labels[k])],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(inst.scores[k]),
            }
            if inst.masks is not None:
                rle = mask_utils.encode(np.asfortranarray(inst.masks[k].cpu().numpy().astype(np.uint8)))
                rec["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            results.append(rec)
        print(f"{path}: {int(keep.sum())} instances with score >= {args.score_threshold} -> {out / (stem + '.png')}")
    (out / "predictions.json").write_text(json.dumps(results))
    print(f"COCO-format results: {out / 'predictions.json'}")
    return 0


def _cmd_convert(args) -> int:
    from maskdino.convert import convert_main

    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return int(convert_main(rest) or 0)


def _cmd_demo(args) -> int:
    from maskdino.engine.demo import run_demo

    budget = args.time_budget if args.time_budget and args.time_budget > 0 else None
    run_demo(args.output, budget, args.opts, resume=args.resume, loss_png=args.loss_png, threads=args.threads)
    return 0


COMMANDS = {
    "synth": _cmd_synth,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "predict": _cmd_predict,
    "convert": _cmd_convert,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `convert` passes everything after it through untouched (its own parser owns those options).
    if argv and argv[0] == "convert":
        from maskdino.convert import convert_main

        return int(convert_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from maskdino.config import ConfigError

    if args.command in ("eval", "predict"):
        from maskdino.allocator import retain_freed_memory

        # inference processes: reuse freed CPU memory instead of page-faulting it in again for every image.
        # Not for training: long runs with many image sizes would keep a fragmented peak heap for no gain.
        retain_freed_memory()

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"maskdino {args.command}: error: {e}", file=sys.stderr)
        return 2
