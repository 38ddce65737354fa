"""Evaluation glue: run ``model.predict`` over the val split and feed coco_eval's streaming evaluators.

Which metrics run follows the data (:class:`~maskdino.data.build.EvalSpec`) and the model's inference flags:
box/mask AP when an instance json exists and instance inference is on, PQ when panoptic ground truth
exists and panoptic inference is on, mIoU when a semantic ground truth exists and semantic inference is on.
Predictions use contiguous class ids; here they are mapped to the dataset's category ids. Under
torch.distributed every rank predicts its shard and the evaluators gather to rank 0 (other ranks get {}).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from maskdino.data.ade import ade_label_to_contiguous, read_label_png
from maskdino.data.build import EvalSpec, build_test_loader
from maskdino.data.coco import DatasetMetadata
from maskdino.data.panoptic import panoptic_to_targets, read_panoptic_png
from maskdino.engine.distributed import get_rank, get_world_size
from maskdino.engine.metrics import format_metrics, json_safe

__all__ = [
    "evaluate",
    "format_metrics",
    "gt_semantic_map",
    "instances_to_eval_output",
    "panoptic_to_eval_output",
]


def gt_semantic_map(sample: dict[str, Any]) -> np.ndarray:
    """Ground-truth semantic map (contiguous ids, 255 = ignore) at the ORIGINAL image size."""
    if "sem_seg_file_name" in sample:
        return ade_label_to_contiguous(read_label_png(sample["sem_seg_file_name"]))
    if "pan_seg_file_name" in sample:
        ids = read_panoptic_png(sample["pan_seg_file_name"])
        return panoptic_to_targets(ids, sample["segments_info"], sample["pan_seg_file_name"])[2]
    raise ValueError("sample has no semantic ground truth")


def instances_to_eval_output(inst, meta: DatasetMetadata, allowed_ids: set[int] | None) -> dict[str, Any]:
    """Instances (contiguous labels) -> COCOInstanceEvaluator output with dataset category ids.

    ``allowed_ids``: dataset ids present in the instance ground truth (e.g. only things for a panoptic
    dataset); predictions of other classes are dropped.
    """
    labels = inst.labels.cpu().long()
    cat_ids = torch.tensor(meta.dataset_ids, dtype=torch.long)[labels] if len(labels) else labels
    keep = torch.ones(len(labels), dtype=torch.bool)
    if allowed_ids is not None and len(labels):
        keep = torch.tensor([int(c) in allowed_ids for c in cat_ids], dtype=torch.bool)
    return {
        "boxes": inst.boxes.detach().float().cpu()[keep].numpy(),
        "scores": inst.scores.detach().float().cpu()[keep].numpy(),
        "category_ids": cat_ids[keep].numpy(),
        "masks": inst.masks.cpu()[keep].numpy() if inst.masks is not None else None,
    }


def panoptic_to_eval_output(pan, meta: DatasetMetadata) -> dict[str, Any]:
    return {
        "panoptic_seg": pan.segments.cpu().numpy().astype(np.int64),
        "segments_info": [
            {
                "id": int(s["id"]),
                "category_id": meta.dataset_ids[int(s["category_id"])],
                "isthing": bool(s["isthing"]),
            }
            for s in pan.segments_info
        ],
    }


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    meta: DatasetMetadata,
    spec: EvalSpec,
    device: torch.device | str = "cpu",
    output_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = False,
    precision: Literal["fp32", "bf16"] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``dataset`` (the val split with its test-time transform).

    The evaluators are coco-eval's streaming ones with its fastest exact backend (hotcoco when installed; the
    result's ``*/backend`` key says which ran): each image's predictions are reduced to compact records (masks to
    RLE) as they come, so memory stays bounded by the dataset's size in records, not in masks. Under
    torch.distributed every rank predicts its shard and the evaluators gather to rank 0.

    Args:
        progress: tqdm bars (rank 0) for the predictions and the evaluation itself.
        precision: the inference precision (default the model's own, ``model.precision``).

    Returns flat metrics (``bbox/AP``, ``segm/AP``, ``panoptic/PQ``, ``sem_seg/mIoU``, ...) on rank 0 ({} on other
    ranks). With ``output_dir``, rank 0 also writes ``metrics.json`` and ``coco_instances_results.json`` there.
    """
    from coco_eval import COCOInstanceEvaluator, COCOPanopticEvaluator, SemSegEvaluator

    net = _unwrap(model)
    was_training = net.training
    net.eval()
    post = getattr(net, "postprocessor", None)
    default_tasks = post.tasks if post is not None else frozenset({"instance"})
    instance_on = "instance" in default_tasks
    panoptic_on = "panoptic" in default_tasks
    semantic_on = "semantic" in default_tasks

    inst_eval = pan_eval = sem_eval = None
    allowed = None
    show = progress and get_rank() == 0
    if spec.instances_json and instance_on:
        inst_eval = COCOInstanceEvaluator(spec.instances_json, backend="auto", progress=show)
        allowed = {int(c["id"]) for c in inst_eval.gt["categories"]}
    if spec.panoptic_json and spec.panoptic_dir and panoptic_on:
        pan_eval = COCOPanopticEvaluator(spec.panoptic_json, spec.panoptic_dir)
    if spec.semantic and semantic_on:
        sem_eval = SemSegEvaluator(meta.num_classes, ignore_label=255)
    tasks = {
        "instance": inst_eval is not None,
        "panoptic": pan_eval is not None,
        "semantic": sem_eval is not None,
    }

    loader = build_test_loader(dataset, get_rank(), get_world_size(), batch_size=1, num_workers=num_workers)
    it = loader
    if show:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    # Evaluation must not move the training RNG (exact resume; same stream on every rank).
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        for batch in it:
            images = [s["image"].as_subclass(torch.Tensor).to(device).float() for s in batch]
            sizes = [(int(s["height"]), int(s["width"])) for s in batch]
            chosen = [k for k, v in tasks.items() if v] or None
            preds = cast(Any, net).predict(images, original_sizes=sizes, tasks=chosen, precision=precision)
            for s, p in zip(batch, preds):
                if inst_eval is not None and p.instances is not None:
                    inst_eval.process(
                        [{"image_id": s["image_id"]}], [instances_to_eval_output(p.instances, meta, allowed)]
                    )
                if pan_eval is not None and p.panoptic is not None:
                    png = Path(s["pan_seg_file_name"]).name
                    pan_eval.process(
                        [{"image_id": s["image_id"], "file_name": png}],
                        [panoptic_to_eval_output(p.panoptic, meta)],
                    )
                if sem_eval is not None and p.semantic is not None:
                    pred = p.semantic.argmax(0).cpu().numpy()
                    sem_eval.process([{"sem_seg": gt_semantic_map(s)}], [{"sem_seg": pred}])
    seconds = time.perf_counter() - start
    results: dict[str, float] = {}
    for ev in (inst_eval, pan_eval, sem_eval):
        if ev is not None:
            results.update(ev.evaluate())
    if was_training:
        net.train()
    if get_rank() == 0:
        results["eval/seconds"] = seconds
        if output_dir is not None:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(json_safe(results), indent=1))
            if inst_eval is not None and get_world_size() == 1:
                inst_eval.save_results(out / "coco_instances_results.json")
    return results
