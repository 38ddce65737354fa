"""Padding-aware mode against the official code: how far each output is from the official one, and why.

In ``padding_mode="aware"`` the padding of a batch is masked everywhere, so an image gets the same prediction alone or
padded; the official code treats the padding as image content. Each stage of ours is fed the OFFICIAL output of the
stage before, so a difference is attributed to the stage whose padding handling makes it (see :data:`WHY`); then the
whole model and the post-processed predictions. These rows are ``info`` (an expected difference, measured), except
the unpadded check: on an input that needs no padding both modes compute the same thing, so aware mode must match
the official outputs to float32 rounding there (``ok``/``FAIL``), which proves the differences come from the padding.

Queries: the two-stage selection picks the top-k encoder tokens; aware mode picks some other tokens, so queries are
compared by rank as they come out (what a user sees) and, for the tokens both sides selected, token by token.
Boxes are compared in pixels: aware boxes are normalised by each image's valid size, official ones by the padded
size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from detr_core.box_ops import box_cxcywh_to_xyxy
from detr_core.outputs import DetectionOutputs
from detr_core.padding import padding_mask

from .checks import compare_with_ties
from .matching import instance_metrics, pairs_by_iou
from .report import Report
from .stages import OfficialRun, capture_our_selection, our_batch, pixel_output, run_official

if TYPE_CHECKING:
    from maskdino.modeling.model import MaskDINO

__all__ = ["WHY", "aware_checks", "unpadded_check"]

#: what padding-aware mode does differently in each stage (why its outputs move when there is padding).
WHY = {
    "backbone": "aware zeroes the padding before every 3x3/7x7 conv and the max-pool; official: padded zeros become "
    "BN-shifted activations that leak into the image through the convolutions (a band along the padding border)",
    "pixel_decoder": "aware: padded tokens masked in the deformable encoder, valid ratios for reference points, sine "
    "position embedding normalised by the valid extent, GroupNorm statistics over valid positions, zeros before the "
    "stride-2 extra level, 1/8 map edge-replicated before upsampling (global: attention spreads it to every token)",
    "predictor": "aware: padded memory tokens masked in cross-attention and excluded from the top-k, proposals and "
    "mask-enhanced anchors normalised by the valid size, valid ratios scale the reference points, query position "
    "from the unscaled box",
}


def _region(
    ours: Tensor, ref: Tensor, sizes: Tensor, padded: tuple[int, int], stride: int, tol: float
) -> dict[str, Any]:
    """Differences of two ``(B, C, H, W)`` maps at ``stride``: inside the valid region, the fraction of its positions
    beyond ``tol * max|ref|``, how far (input pixels) from the padding border those reach, and in the padding."""
    d = (ours.double() - ref.double()).abs().amax(1)  # (B, H, W)
    pad = padding_mask(sizes, d.shape[-2:], stride)
    valid = ~pad
    scale = max(float(ref.abs().max()), 1e-12)
    beyond = (d > tol * scale) & valid
    h, w = d.shape[-2:]
    # distance of a position (its top-left input pixel) to the bottom / right padding border, along padded axes only
    ys = (torch.arange(h) * stride).double()[None, :, None]
    xs = (torch.arange(w) * stride).double()[None, None, :]
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    dy = torch.where(sizes[:, 0, None, None] < padded[0], sizes[:, 0, None, None] - ys, inf)
    dx = torch.where(sizes[:, 1, None, None] < padded[1], sizes[:, 1, None, None] - xs, inf)
    dist = torch.minimum(dy, dx).expand_as(d)
    return {
        "max_abs_valid": float(d[valid].max()),
        "ref_max": scale,
        "rel_of_max_valid": float(d[valid].max()) / scale,
        "fraction_beyond": float(beyond.sum()) / max(int(valid.sum()), 1),
        "reach_px": float(dist[beyond].max()) if bool(beyond.any()) else 0.0,
        "padded_positions": int(pad.sum()),
        "max_abs_padding": float(d[pad].max()) if bool(pad.any()) else 0.0,
    }


def _describe_region(v: dict[str, Any]) -> str:
    reach = (
        "nowhere" if v["fraction_beyond"] == 0 else f"up to {v['reach_px']:.0f} px from the padding border"
    )
    pad = (
        f"padded region max_abs={v['max_abs_padding']:.2e}"
        if v["padded_positions"]
        else "no padded position at this stride"
    )
    return (
        f"valid region: max_abs={v['max_abs_valid']:.2e} (abs/|ref|max={v['rel_of_max_valid']:.2e}), "
        f"{100 * v['fraction_beyond']:.1f}% of positions beyond tolerance, reaching {reach}; {pad}"
    )


def _pixel_boxes(boxes: Tensor, frame: Tensor) -> Tensor:
    """cxcywh in [0, 1] of ``frame (B, 2)`` ``(h, w)`` -> xyxy pixels."""
    wh = frame.flip(-1).to(boxes).repeat(1, 2)[:, None]  # (B, 1, 4) = (w, h, w, h)
    return box_cxcywh_to_xyxy(boxes) * wh


def _compare_queries(
    report: Report,
    section: str,
    ours: DetectionOutputs,
    off: DetectionOutputs,
    sel_u: Tensor | None,
    sel_o: Tensor | None,
    sizes: Tensor,
    padded: tuple[int, int],
) -> None:
    """Final logits by rank; then on the tokens selected by both sides: logits, boxes in pixels, masks (valid)."""
    report.tensor(section, "final logits (by rank)", ours.final.logits, off.final.logits, info=True)
    if sel_u is None or sel_o is None:
        return
    frame_o = torch.tensor([padded] * sizes.shape[0])
    for b in range(sizes.shape[0]):
        u, o = sel_u[b].tolist(), sel_o[b].tolist()
        pos_u = {t: i for i, t in enumerate(u)}
        common = [t for t in o if t in pos_u]
        io = torch.tensor([o.index(t) for t in common], dtype=torch.long)
        iu = torch.tensor([pos_u[t] for t in common], dtype=torch.long)
        sub = f"{section} img{b}"
        report.add(
            sub,
            "selected tokens",
            None,
            f"{len(common)} of {len(o)} official tokens also selected by aware "
            "mode (the rest are compared by rank only)",
            common=len(common),
            total=len(o),
        )
        if not common:
            continue
        fo, fu = off.final, ours.final
        report.tensor(sub, "final logits (same tokens)", fu.logits[b, iu], fo.logits[b, io], info=True)
        if fo.boxes is not None and fu.boxes is not None:
            bo = _pixel_boxes(fo.boxes[b : b + 1, io], frame_o[b : b + 1])
            bu = _pixel_boxes(fu.boxes[b : b + 1, iu], sizes[b : b + 1])
            report.tensor(sub, "final boxes px (same tokens)", bu, bo, info=True)
        if fo.masks is not None and fu.masks is not None:
            s = -(-padded[0] // fo.masks.shape[-2])  # the mask stride (4)
            hv, wv = ((sizes[b] + s - 1) // s).tolist()
            report.tensor(
                sub,
                "final masks valid (same tokens)",
                fu.masks[b, iu, :hv, :wv],
                fo.masks[b, io, :hv, :wv],
                info=True,
            )
        _anchor_row(report, sub, ours, off, b, io, iu, sizes, padded)


def _anchor_row(
    report: Report,
    section: str,
    ours: DetectionOutputs,
    off: DetectionOutputs,
    b: int,
    io: Tensor,
    iu: Tensor,
    sizes: Tensor,
    padded: tuple[int, int],
) -> None:
    """Mask-enhanced anchors (the initial prediction's boxes are the boxes of the proposals' masks): how many official
    proposal masks have foreground in the PADDING (the official box then reaches into it) and the anchor
    differences with and without such foreground."""
    if off.interm is None or off.interm.masks is None or not off.aux or off.aux[0].boxes is None:
        return
    if ours.interm is None or ours.interm.masks is None:
        return  # initialize_box_type "no": the anchors are the proposals' boxes, not their masks' boxes
    masks = off.interm.masks[b, io] > 0  # (n, h, w) at the mask stride
    s = -(-padded[0] // masks.shape[-2])
    hv, wv = ((sizes[b] + s - 1) // s).tolist()
    in_pad = masks.clone()
    in_pad[:, :hv, :wv] = False
    touches = in_pad.flatten(1).any(1)
    if ours.aux[0].boxes is None:
        return
    bo = _pixel_boxes(off.aux[0].boxes[b : b + 1, io], torch.tensor([padded]))[0]
    bu = _pixel_boxes(ours.aux[0].boxes[b : b + 1, iu], sizes[b : b + 1])[0]
    d = (bo.double() - bu.double()).abs().amax(-1)

    def worst(sel: Tensor) -> str:
        return f"{float(d[sel].max()):.1f} px" if bool(sel.any()) else "-"

    report.add(
        section,
        "mask-enhanced anchors",
        None,
        f"{int(touches.sum())} of {len(io)} official proposal masks have foreground in the padding (their box then "
        f"reaches into it; aware mode ignores padded pixels): anchor max|diff| {worst(touches)} for those, "
        f"{worst(~touches)} for the others",
        touching_padding=int(touches.sum()),
        max_diff_touching=float(d[touches].max()) if bool(touches.any()) else 0.0,
        max_diff_others=float(d[~touches].max()) if bool((~touches).any()) else 0.0,
    )


@torch.no_grad()
def aware_checks(
    report: Report,
    off: Any,
    aware: MaskDINO,
    run: OfficialRun,
    x: Tensor,
    sizes: list[tuple[int, int]],
) -> DetectionOutputs:
    """Stage-by-stage and whole-model rows of aware mode against the official run on the padded tensor ``x``.

    Returns:
        Our whole-model aware outputs.
    """
    batch = our_batch(aware, x, sizes)
    st = batch.image_sizes.cpu()
    padded = batch.padded_size
    if not batch.masked:
        report.add("aware", "padding", None, "nothing is padded: aware mode is official mode here")
    feats = aware.backbone(batch)
    strides = {k: spec.stride for k, spec in aware.backbone.output_shape().items()}  # type: ignore[operator]
    for k in sorted(run.features):
        stride = strides[k]
        v = _region(feats[k], run.features[k], st, padded, stride, report.atol)
        report.add("aware backbone", k, None, _describe_region(v), **v)
    report.add("aware backbone", "why", None, WHY["backbone"])
    pd = aware.pixel_decoder(run.features, batch)
    v = _region(pd.mask_features, run.mask_features, st, padded, pd.mask_stride, report.atol)
    report.add("aware pixel_decoder", "mask_features", None, _describe_region(v), **v)
    for i, (a, b, s) in enumerate(zip(pd.multi_scale_features, run.multi_scale, pd.strides)):
        v = _region(a, b, st, padded, s, report.atol)
        report.add("aware pixel_decoder", f"multi_scale[{i}] (1/{s})", None, _describe_region(v), **v)
    report.add(
        "aware pixel_decoder", "why", None, WHY["pixel_decoder"] + " (fed the official backbone features)"
    )
    with capture_our_selection() as sel:
        head = aware.predictor(pixel_output(aware, run.mask_features, run.multi_scale), batch)
    _compare_queries(
        report, "aware predictor", head, run.outputs, sel.get("indices"), run.selected, st, padded
    )
    report.add("aware predictor", "why", None, WHY["predictor"] + " (fed the official pixel decoder outputs)")
    with capture_our_selection() as sel:
        whole = aware.network(batch)
    _compare_queries(
        report, "aware whole model", whole, run.outputs, sel.get("indices"), run.selected, st, padded
    )
    return whole


def aware_postprocess(
    report: Report, section: str, off_res: dict[str, Any], pred: Any, official_pair: bool = False
) -> None:
    """Post-processed predictions against the official ones: instances paired by mask IoU (same label), panoptic
    segment counts. ``pred``: our :class:`~maskdino.structures.Prediction`, or (``official_pair``) another official
    results dict."""

    def instances(res: Any) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        if official_pair:
            inst = res.get("instances")
            return (
                None
                if inst is None
                else (inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks.bool())
            )
        ui = res.instances
        return None if ui is None else (ui.boxes, ui.scores, ui.labels, ui.masks)

    def panoptic(res: Any) -> tuple[Tensor, list] | None:
        if official_pair:
            return res.get("panoptic_seg")
        return None if res.panoptic is None else (res.panoptic.segments, res.panoptic.segments_info)

    theirs = instances(pred)
    if "instances" in off_res and theirs is not None:
        inst = off_res["instances"]
        off_t = (inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks.bool())
        io, iu = pairs_by_iou(off_t[3], off_t[2], theirs[3], theirs[2])
        m = instance_metrics(off_t, theirs, io, iu)
        report.add(
            section,
            "instances (paired by mask IoU)",
            None,
            f"{len(inst)} official, {len(theirs[0])} here; {m.describe()}",
            **vars(m),
        )
    pan = panoptic(pred)
    if "panoptic_seg" in off_res and pan is not None:
        seg_o, info_o = off_res["panoptic_seg"]
        agree = float((seg_o.cpu() == pan[0].cpu()).double().mean())
        report.add(
            section,
            "panoptic segments",
            None,
            f"{len(info_o)} official, {len(pan[1])} here; the maps agree on {100 * agree:.2f}% of the pixels",
            official=len(info_o),
            here=len(pan[1]),
            agree=agree,
        )


@torch.no_grad()
def unpadded_check(
    report: Report, off: Any, aware: MaskDINO, x: Tensor, sizes: list[tuple[int, int]]
) -> None:
    """Aware mode on an input that needs no padding must match the official outputs to float32 rounding."""
    run = run_official(off, x)
    batch = our_batch(aware, x, sizes)
    report.add(
        "aware unpadded", "input", None, f"{tuple(x.shape)}, image sizes {sizes}: masked={batch.masked}"
    )
    compare_with_ties(report, "aware unpadded", aware.network(batch), run.outputs)


@torch.no_grad()
def official_padding_sensitivity(
    report: Report, off: Any, images: list[Tensor], out_sizes: list[tuple[int, int]], res_o: list
) -> None:
    """How much the OFFICIAL predictions themselves move when only the amount of padding changes (its
    ``size_divisibility`` multiplied by the smallest factor that changes the padded size): the scale of the
    differences that padding-aware mode removes."""
    saved = off.size_divisibility
    shape = [max(int(im.shape[k]) for im in images) for k in (-2, -1)]

    def padded(d: int) -> list[int]:
        return [-(-s // d) * d for s in shape]

    d = next((f * saved for f in range(2, 9) if padded(f * saved) != padded(saved)), None)
    if d is None:
        report.add("official more padding", "padding", None, f"{shape}: no larger divisibility pads more")
        return
    report.add(f"official padded to /{d}", "padding", None, f"{padded(saved)} -> {padded(d)}")
    off.size_divisibility = d
    try:
        res_2 = off([{"image": im, "height": h, "width": w} for im, (h, w) in zip(images, out_sizes)])
    finally:
        off.size_divisibility = saved
    for i, (a, b) in enumerate(zip(res_o, res_2)):
        aware_postprocess(report, f"official padded to /{d} img{i}", a, b, official_pair=True)
