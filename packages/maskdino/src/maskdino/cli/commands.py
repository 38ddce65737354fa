"""The handlers of the ``maskdino`` subcommands (argument parsing and error reporting: :mod:`maskdino.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["COMMANDS"]


def _log(msg: str) -> None:
    print(f"[maskdino] {msg}", file=sys.stderr, flush=True)


def _load_cfg(args: argparse.Namespace):
    from maskdino.config import apply_overrides, load_experiment

    cfg = load_experiment(args.config)
    if args.opts:
        cfg = apply_overrides(cfg, args.opts)
    return cfg


def _precision_opts(args: argparse.Namespace) -> list[str]:
    """``--opts`` plus the override of ``--precision`` (if given)."""
    opts = list(getattr(args, "opts", None) or [])
    if getattr(args, "precision", None):
        opts.append(f"model.inference.precision={args.precision}")
    return opts


def _retain_freed_memory() -> None:
    from maskdino.cpu_inference.allocator import retain_freed_memory

    # inference processes: reuse freed CPU memory instead of page-faulting it in again for every image.
    # Not for training: long runs with many image sizes would keep a fragmented peak heap for no gain.
    retain_freed_memory()


def cmd_synth(args: argparse.Namespace) -> int:
    from maskdino.data.synthetic import generate_synthetic

    out = generate_synthetic(args.out_dir, args.seed, args.train, args.val, args.size)
    print(f"synthetic dataset written to {out} ({args.train} train, {args.val} val, {args.size} px)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from maskdino.engine.trainer import NonFiniteLossError, train

    cfg = _load_cfg(args)
    if args.output:
        cfg.train.output_dir = args.output
    if args.time_budget is not None:
        cfg.train.time_budget_s = args.time_budget if args.time_budget > 0 else None
    try:
        train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"maskdino train: training diverged: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from maskdino.data.build import build_datasets
    from maskdino.engine.distributed import get_rank, init_distributed
    from maskdino.engine.evaluation import evaluate, format_metrics
    from maskdino.inference.predictor import load_model

    _retain_freed_memory()
    loaded = load_model(args.weights, args.config, _precision_opts(args), log=_log)
    cfg = loaded.config
    _, _, device = init_distributed(cfg.train.device)
    _, val_ds, meta, spec = build_datasets(cfg.data, cfg.model.num_classes, splits=("val",))
    model = loaded.model.to(device)
    out = Path(args.output) if args.output else Path(args.weights).parent / "eval"
    with torch.no_grad():
        results = evaluate(model, val_ds, meta, spec, device, output_dir=out, progress=True)
    if get_rank() == 0:
        print(f"[maskdino] {format_metrics(results)}")
        headline = {
            k: v for k, v in results.items() if "/AP-" not in k and "IoU-" not in k and "ACC-" not in k
        }
        print(json.dumps(headline, indent=1))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from coco_eval import instances_to_coco_json
    from maskdino.data.errors import DataError
    from maskdino.inference.predictor import (
        ImagePredictor,
        ImageTooLargeError,
        expand_image_paths,
        load_model,
    )
    from maskdino.inference.visualize import draw_instances, save_image

    if args.backend == "torch" and (not args.weights or args.model):
        raise DataError(
            "--backend torch runs --weights (a .pth/.safetensors file); --model is for exported models"
        )
    if args.backend != "torch" and (not args.model or args.weights or args.config or args.opts):
        raise DataError(f"--backend {args.backend} runs --model (the file of `maskdino export`), which records its "
                        "own config: --weights, --config and --opts are for the torch backend")  # fmt: skip
    paths = expand_image_paths(args.images)
    _retain_freed_memory()
    if args.backend == "torch":
        loaded = load_model(args.weights, args.config, _precision_opts(args), log=_log)
        predictor = ImagePredictor.from_model(loaded.model, loaded.config)
        meta = loaded.metadata
    else:
        from maskdino.data.coco import DatasetMetadata
        from maskdino.export.runtime import ExportedModel, exported_predictor

        exported = ExportedModel(args.model, backend=args.backend)
        predictor = exported_predictor(exported)
        meta = DatasetMetadata.from_dict(exported.metadata.classes)
    if "instance" not in predictor.postprocessor.tasks:
        raise DataError(
            "the model has instance inference off (model.inference.instance_on=false); nothing to draw"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    failed: list[tuple[Path, str]] = []
    stems: dict[str, int] = {}
    for idx, path in enumerate(paths):
        try:
            image, pred = predictor.predict_file(
                path, tasks=["instance"], score_threshold=args.score_threshold
            )
        except (DataError, ImageTooLargeError, OSError, MemoryError) as e:
            # one bad image costs that image only
            failed.append((path, str(e) or type(e).__name__))
            print(f"{path}: failed: {failed[-1][1]}", file=sys.stderr, flush=True)
            continue
        inst = pred.instances
        assert inst is not None
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        name = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"  # same name in two folders
        image_id = int(stem) if stem.isdigit() else idx
        save_image(draw_instances(image, inst, meta, args.score_threshold), out / f"{name}.png")
        labels = inst.labels.tolist()
        cat_ids = np.asarray([meta.dataset_ids[k] for k in labels], dtype=np.int64)
        for k in range(len(inst)):  # one mask at a time: RLE-encoding them together copies them all
            (rec,) = instances_to_coco_json(
                image_id,
                inst.boxes[k : k + 1],
                inst.scores[k : k + 1],
                cat_ids[k : k + 1],
                inst.masks[k : k + 1],
            )
            rec.update({"file_name": str(path), "category_name": meta.names[labels[k]]})
            results.append(rec)
        print(
            f"{path}: {len(inst)} instances with score >= {args.score_threshold} -> {out / (name + '.png')}"
        )
    _write_json_atomic(out / "predictions.json", results)
    print(f"COCO-format results of {len(paths) - len(failed)} image(s): {out / 'predictions.json'}")
    if failed:
        print(f"maskdino predict: {len(failed)} of {len(paths)} image(s) failed:", file=sys.stderr)
        for path, why in failed:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


def _write_json_atomic(path: Path, obj: object) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_export(args: argparse.Namespace) -> int:
    from maskdino.export import export_onnx, export_openvino
    from maskdino.inference.predictor import load_model

    loaded = load_model(args.weights, args.config, args.opts, log=_log)
    export = export_onnx if args.format == "onnx" else export_openvino
    if args.format == "onnx" and args.precision == "bf16":
        from maskdino.export.metadata import ExportError

        raise ExportError("--precision bf16 is not available for ONNX (no bfloat16 kernels in onnxruntime's CPU "
                          "provider): use --format openvino --precision bf16")  # fmt: skip
    meta = export(loaded, args.output, args.height, args.width, args.dynamic, args.precision, args.op_form)
    size = "dynamic size" if meta.dynamic else f"{meta.height}x{meta.width}"
    print(f"{args.output}: {args.format} ({size}, {meta.precision}, deformable attention as {meta.op_form}, "
          f"padding_mode={meta.padding_mode})")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from maskdino.engine.demo import run_demo

    budget = args.time_budget if args.time_budget and args.time_budget > 0 else None
    run_demo(args.output, budget, _precision_opts(args), resume=args.resume, loss_png=args.loss_png,
             threads=args.threads)  # fmt: skip
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": cmd_synth,
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "export": cmd_export,
    "demo": cmd_demo,
}
