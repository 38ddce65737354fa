"""End to end through the user-facing path, against the official evaluation path, on one photo.

Ours: ``maskdino convert SRC DST --preset NAME`` (a subprocess, as a user runs it) on an official-layout checkpoint
file, then ``maskdino.inference.predictor.load_model(DST)`` and ``ImagePredictor.from_model(...)``, which is what
``maskdino predict`` runs: read (EXIF), the config's test resize, normalise, pad, network, post-processing.
Official: detectron2's ``read_image`` and test augmentation (its ``DatasetMapper`` in evaluation), then
``MaskDINO.forward([{"image", "height", "width"}])``.

Targets (:data:`TARGETS`): instance scores within 1e-4, boxes within 1e-3 px, every mask IoU >= 0.999, the same
labels; the same panoptic segments with maps agreeing on >= 99.9% of the pixels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .checks import align_queries, pair_instances
from .matching import instance_metrics
from .official import detectron2_test_input
from .report import Report
from .stages import official_outputs

__all__ = ["TARGETS", "end_to_end"]

TARGETS = {"score": 1e-4, "box_px": 1e-3, "mask_iou": 0.999, "panoptic_agreement": 0.999}


def _convert(src: Path, dst: Path, preset: str) -> str:
    """``python -m maskdino convert SRC DST --preset NAME``; returns its output (raises on failure)."""
    cmd = [sys.executable, "-m", "maskdino", "convert", str(src), str(dst), "--preset", preset]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(
            f"maskdino convert failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return " | ".join(line for line in proc.stdout.splitlines() if line.strip())


@torch.no_grad()
def end_to_end(
    report: Report,
    off: Any,
    off_cfg: Any,
    checkpoint: Path,
    preset: str,
    photo: Path | None,
    original: Tensor | None,
    tmp: Path,
) -> None:
    """The end-to-end rows (see the module docstring). ``photo`` None: ``original`` is written to a PNG first."""
    from maskdino.data.coco import read_image
    from maskdino.inference.predictor import ImagePredictor, load_model

    section = "end-to-end"
    if photo is None:
        assert original is not None
        photo = tmp / "synthetic_photo.png"
        Image.fromarray(original.permute(1, 2, 0).numpy()).save(photo)
    dst = tmp / "converted.safetensors"
    report.add(section, "maskdino convert", True, _convert(checkpoint, dst, preset))
    loaded = load_model(dst)
    cfg = loaded.config
    embedded = (cfg.model.padding_mode, cfg.data.test_resize)
    report.add(
        section,
        "embedded config",
        embedded == ("official", "pil"),
        f"padding_mode={embedded[0]!r}, test_resize={embedded[1]!r} (expected 'official', 'pil')",
    )
    predictor = ImagePredictor.from_model(loaded.model, cfg)

    image_o, size = detectron2_test_input(photo, off_cfg)
    ours_in = predictor.resized(read_image(photo))
    same = tuple(ours_in.shape) == tuple(image_o.shape) and torch.equal(ours_in, image_o.float())
    report.add(
        section,
        "test resize",
        same,
        f"{size[0]}x{size[1]} -> ours {tuple(ours_in.shape[-2:])}, detectron2 "
        f"{tuple(image_o.shape[-2:])}; pixels {'equal' if same else 'DIFFER'} ({predictor.resize})",
    )

    captured: dict[str, Any] = {}
    hooks = [
        off.sem_seg_head.register_forward_hook(
            lambda m, i, o: captured.__setitem__("off", official_outputs(o[0]))
        ),
        loaded.model.predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("ours", o)),
    ]
    try:
        res_o = off([{"image": image_o, "height": size[0], "width": size[1]}])[0]
        _, pred = predictor.predict_file(photo)
    finally:
        for h in hooks:
            h.remove()
    raw_o, raw_u = captured["off"], captured["ours"]
    perm = align_queries(raw_u, raw_o, report.atol)
    post = loaded.model.postprocessor
    things = set(post.thing_classes) if "panoptic" in post.tasks else None
    if "instances" in res_o and pred.instances is not None:
        _instances(
            report,
            section,
            res_o["instances"],
            pred.instances,
            raw_o,
            raw_u,
            perm,
            post.top_k,
            things,
        )
    if "panoptic_seg" in res_o and pred.panoptic is not None:
        seg_o, info_o = res_o["panoptic_seg"]
        info_u = [{k: d[k] for k in ("id", "isthing", "category_id")} for d in pred.panoptic.segments_info]
        agree = float((seg_o.cpu() == pred.panoptic.segments.cpu()).double().mean())
        ok = info_o == info_u and agree >= TARGETS["panoptic_agreement"]
        report.add(
            section,
            "panoptic segments",
            ok,
            f"{len(info_o)} official, {len(info_u)} ours, segments_info "
            f"{'equal' if info_o == info_u else 'DIFFER'}; maps agree on {100 * agree:.4f}% of the pixels",
            official=len(info_o),
            ours=len(info_u),
            agree=agree,
        )
    if "sem_seg" in res_o and pred.semantic is not None:
        report.tensor(section, "semantic", pred.semantic, res_o["sem_seg"])


def _instances(
    report: Report,
    section: str,
    inst: Any,
    ours: Any,
    raw_o: Any,
    raw_u: Any,
    perm: list[Tensor] | None,
    top_k: int,
    things: set[int] | None,
) -> None:
    """Instances paired by ``(query, label)`` (:func:`~.checks.pair_instances`), measured against :data:`TARGETS`."""
    p = None if perm is None else perm[0]
    io, iu, paired_ok, detail = pair_instances(
        raw_o.final.logits[0], raw_u.final.logits[0], p, top_k, things, report.atol
    )
    off_t = (inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks.bool())
    m = instance_metrics(off_t, (ours.boxes, ours.scores, ours.labels, ours.masks), io, iu)
    ok = (
        paired_ok
        and m.labels_equal
        and m.max_score_diff <= TARGETS["score"]
        and m.max_box_diff <= TARGETS["box_px"]
        and m.min_iou >= TARGETS["mask_iou"]
    )
    report.add(
        section,
        "instances",
        ok,
        f"{detail}; {m.describe()} (targets: score <= {TARGETS['score']:g}, box <= {TARGETS['box_px']:g} px, "
        f"IoU >= {TARGETS['mask_iou']})",
        **vars(m),
    )
