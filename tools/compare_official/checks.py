"""Comparison rows of raw head outputs (with top-k tie handling) and of post-processed predictions.

Forward tensors pass when ``max|ours - official| <= atol * max|official|`` (float32 rounding). Two-stage query
selection takes the top-k encoder tokens by score; scores within ~1e-7 of each other may come out in another order.
The queries are then the same up to a permutation: it is found from the ``interm`` outputs (one row per selected
token: its class logits and box), our queries are put in the official order and compared again, and the rows are
reported as ``tie`` with the ranks that moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from detr_core.outputs import DetectionOutputs, QueryPredictions

from .matching import pairs_by_query
from .report import Report, Row

if TYPE_CHECKING:
    from maskdino.modeling.model import MaskDINO

__all__ = [
    "align_queries",
    "check_settings",
    "compare_levels",
    "compare_predictions",
    "compare_with_ties",
    "levels",
    "pair_instances",
    "max_abs_difference",
    "permute_queries",
]

_FIELDS = ("logits", "boxes", "masks")


def levels(out: DetectionOutputs) -> Iterator[tuple[str, QueryPredictions]]:
    """``(name, predictions)`` of the final, aux and interm outputs."""
    yield "final", out.final
    for i, aux in enumerate(out.aux):
        yield f"aux[{i}]", aux
    if out.interm is not None:
        yield "interm", out.interm


def compare_levels(report: Report, section: str, ours: DetectionOutputs, off: DetectionOutputs) -> list[Row]:
    """One row per tensor of every level present on both sides."""
    rows = []
    if len(ours.aux) != len(off.aux):
        rows.append(
            report.add(section, "aux levels", False, f"{len(ours.aux)} in ours, {len(off.aux)} official")
        )
    if (ours.interm is None) != (off.interm is None):
        rows.append(report.add(section, "interm", False, "present on one side only"))
    off_levels = dict(levels(off))
    for name, level in levels(ours):
        if name not in off_levels:
            continue
        for f in _FIELDS:
            a, b = getattr(level, f), getattr(off_levels[name], f)
            if a is None and b is None:
                continue  # e.g. the masks of aux levels in eval mode
            rows.append(report.tensor(section, f"{name} {f}", a, b))
    return rows


def max_abs_difference(a: DetectionOutputs, b: DetectionOutputs) -> float:
    """The largest ``|a - b|`` over every tensor of every level present on both sides."""
    worst = 0.0
    levels_b = dict(levels(b))
    for name, level in levels(a):
        for f in _FIELDS:
            x, y = getattr(level, f), getattr(levels_b[name], f) if name in levels_b else None
            if x is not None and y is not None:
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def permute_queries(out: DetectionOutputs, perm: list[Tensor]) -> DetectionOutputs:
    """A copy of ``out`` with the queries of image ``b`` reordered by ``perm[b]``."""

    def take(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.stack([t[b, p.to(t.device)] for b, p in enumerate(perm)])

    def level(q: QueryPredictions) -> QueryPredictions:
        return QueryPredictions(*(take(getattr(q, f)) for f in _FIELDS))  # type: ignore[arg-type]

    interm = None if out.interm is None else level(out.interm)
    return DetectionOutputs(final=level(out.final), aux=[level(a) for a in out.aux], interm=interm)


def align_queries(ours: DetectionOutputs, off: DetectionOutputs, atol: float) -> list[Tensor] | None:
    """Per image, the order of our queries that matches the official ones (``ours[perm] ~ official``), from the
    ``interm`` rows (class logits and box of each selected token). None when they cannot be matched one-to-one within
    tolerance (the top-k SETS differ, or the model is not two-stage)."""
    if ours.interm is None or off.interm is None or ours.interm.boxes is None or off.interm.boxes is None:
        return None
    fo = torch.cat([off.interm.logits, off.interm.boxes], -1).detach().double().cpu()
    fu = torch.cat([ours.interm.logits, ours.interm.boxes], -1).detach().double().cpu()
    if fo.shape != fu.shape:
        return None
    perms = []
    for b in range(fo.shape[0]):
        best, perm = torch.cdist(fo[b], fu[b], p=float("inf")).min(1)
        if perm.unique().numel() != perm.numel() or float(best.max()) > atol * max(
            float(fo[b].abs().max()), 1e-12
        ):
            return None
        perms.append(perm)
    return perms


def compare_with_ties(
    report: Report, section: str, ours: DetectionOutputs, off: DetectionOutputs
) -> list[Tensor] | None:
    """:func:`compare_levels`; if it fails, compare again after aligning the queries across a top-k near tie.

    Returns:
        The per-image permutation used, or None (matched as they are, or not alignable).
    """
    start = len(report.rows)
    if not any(r.status == "FAIL" for r in compare_levels(report, section, ours, off)):
        return None
    perm = align_queries(ours, off, report.atol)
    if perm is None or all(torch.equal(p, torch.arange(p.numel())) for p in perm):
        report.add(
            section, "top-k tie check", None, "queries cannot be aligned one-to-one by their interm outputs"
        )
        return None
    scratch = Report(report.atol)
    aligned = compare_levels(scratch, section, permute_queries(ours, perm), off)
    swapped = []
    for b, p in enumerate(perm):
        moved = (p != torch.arange(p.numel())).nonzero().flatten().tolist()
        if moved:
            shown = ", ".join(f"{r}->{int(p[r])}" for r in moved[:8]) + (", ..." if len(moved) > 8 else "")
            swapped.append(f"img{b}: official rank -> our rank {shown}")
    if any(r.status == "FAIL" for r in aligned):
        report.add(
            section, "top-k tie check", False, "aligned by token, still differs: " + "; ".join(swapped)
        )
        return perm
    del report.rows[start:]
    for r in aligned:
        r.status = "tie" if r.status == "ok" else r.status
    report.rows += aligned
    n = sum(int((p != torch.arange(p.numel())).sum()) for p in perm)
    report.add(
        section,
        "top-k near tie",
        True,
        f"{n} queries selected in another order (near-equal token scores), "
        "all within tolerance after aligning ours to the official order: " + "; ".join(swapped),
    )
    return perm


def check_settings(report: Report, off: Any, ours: MaskDINO) -> None:
    """The inference settings of both models (thresholds, top-k, normalisation, tasks) must be equal."""
    post = ours.postprocessor
    pairs: dict[str, tuple[Any, Any]] = {
        "num_classes": (off.sem_seg_head.num_classes, ours.predictor.num_classes),
        "num_queries": (off.num_queries, ours.predictor.num_queries),
        "size_divisibility": (off.size_divisibility, ours.size_divisibility),
        "tasks": (
            {
                t
                for t, on in zip(
                    ("instance", "panoptic", "semantic"), (off.instance_on, off.panoptic_on, off.semantic_on)
                )
                if on
            },
            set(post.tasks),
        ),
        "test_topk_per_image": (off.test_topk_per_image, post.top_k),
        "object_mask/overlap threshold": (
            (off.object_mask_threshold, off.overlap_threshold),
            (post.object_mask_threshold, post.overlap_threshold),
        ),
        "panoptic temperature": (off.pano_temp if off.transform_eval else None, post.temperature),
        "pixel_mean/std": (
            off.pixel_mean.flatten().tolist() + off.pixel_std.flatten().tolist(),
            ours.pixel_mean.flatten().tolist() + ours.pixel_std.flatten().tolist(),
        ),
    }
    if off.panoptic_on:
        pairs["thing classes"] = (
            sorted(off.metadata.thing_dataset_id_to_contiguous_id.values()),
            sorted(post.thing_classes),
        )
    bad = [
        f"{k}: official {a} vs ours {b}"
        for k, (a, b) in pairs.items()
        if a != b and not (isinstance(a, list) and torch.allclose(torch.tensor(a), torch.tensor(b)))
    ]
    report.add(
        "settings", "inference settings", not bad, "; ".join(bad) if bad else f"{len(pairs)} settings equal"
    )


def _official_instance_keys(logits: Tensor, top_k: int, things: set[int] | None) -> list[tuple[int, int]]:
    """``(query, label)`` of the official instances, in the order of its ``instance_inference`` (same topk call)."""
    num_classes = logits.shape[-1]
    _, idx = logits.sigmoid().flatten(0, 1).topk(top_k, sorted=False)
    keys = list(zip((idx // num_classes).tolist(), (idx % num_classes).tolist()))
    return [k for k in keys if k[1] in things] if things is not None else keys


def pair_instances(
    off_logits: Tensor,
    our_logits: Tensor,
    perm: Tensor | None,
    top_k: int,
    things: set[int] | None,
    atol: float,
) -> tuple[Tensor, Tensor, bool, str]:
    """Pair the official and our instances of one image by ``(query, label)``, our queries in the official order.

    Both sides keep the ``top_k`` best (query, class) probabilities; where several are equal at the k-th one (e.g.
    identical queries) each side may keep another of them. Such a difference is a tie (``ok``) when every unpaired
    instance's probability is within ``atol`` of the k-th; the paired ones are compared.

    Returns:
        ``(official indices, our indices, ok, description)``.
    """
    from maskdino.modeling.postprocess import _topk_instances

    ko = _official_instance_keys(off_logits, top_k, things)
    _, labels_u, q_u = _topk_instances(our_logits, top_k, True, things)
    probs_o, probs_u = off_logits.sigmoid().double().cpu(), our_logits.sigmoid().double().cpu()
    inv = None if perm is None else torch.argsort(perm.cpu())
    ku = [(int(inv[q]) if inv is not None else q, lab) for q, lab in zip(q_u.tolist(), labels_u.tolist())]
    score_u = {k: float(probs_u[q, lab]) for k, q, lab in zip(ku, q_u.tolist(), labels_u.tolist())}
    io, iu, n_o, n_u = pairs_by_query(ko, ku)
    detail = f"{len(ko)} official, {len(ku)} ours"
    if not (n_o or n_u):
        return io, iu, True, f"{detail}, same (query, label) set"
    only_o, only_u = sorted(set(ko) - set(ku)), sorted(set(ku) - set(ko))
    kth = min(float(probs_o[q, c]) for q, c in ko)
    near = all(abs(float(probs_o[q, c]) - kth) <= atol for q, c in only_o) and all(
        abs(score_u[k] - kth) <= atol for k in only_u
    )
    detail += f"; only official {only_o[:4]}, only ours {only_u[:4]}"
    if near:
        detail += f" (tie at the k-th probability {kth:.7f}: compared on the {io.numel()} common ones)"
    return io, iu, near, detail


def compare_predictions(
    report: Report,
    section: str,
    off_res: dict[str, Any],
    pred: Any,
    off_logits: Tensor,
    our_logits: Tensor,
    perm: Tensor | None,
    mask_tol: float,
    top_k: int,
    things: set[int] | None,
) -> None:
    """One image's official results dict against our :class:`maskdino.structures.Prediction`: instances paired by
    ``(query, label)`` (:func:`pair_instances`), panoptic segments and map, semantic map."""
    if "instances" in off_res:
        inst = off_res["instances"]
        io, iu, ok, detail = pair_instances(off_logits, our_logits, perm, top_k, things, report.atol)
        report.add(section, "instances (query,label) set", ok, detail)
        io_idx, iu_idx = io.to(inst.scores.device), iu
        ours_i = pred.instances
        report.tensor(section, "instances boxes", ours_i.boxes[iu_idx], inst.pred_boxes.tensor[io_idx])
        report.tensor(section, "instances scores", ours_i.scores[iu_idx], inst.scores[io_idx])
        lab_ok = torch.equal(ours_i.labels[iu_idx].cpu(), inst.pred_classes[io_idx].cpu().long())
        report.add(section, "instances labels", lab_ok, "equal" if lab_ok else "differ")
        mo, mu = inst.pred_masks[io_idx].bool().cpu(), ours_i.masks[iu_idx].cpu()
        if mo.shape != mu.shape:
            report.add(
                section,
                "instances masks",
                False,
                f"shape ours {tuple(mu.shape)} vs official {tuple(mo.shape)}",
            )
        else:
            n = int((mo != mu).sum())
            frac = n / max(mo.numel(), 1)
            report.add(
                section,
                "instances masks",
                frac <= mask_tol,
                f"{n} of {mo.numel()} pixels differ ({frac:.2e})",
                differing_pixels=n,
            )
    if "panoptic_seg" in off_res:
        compare_panoptic(report, section, off_res["panoptic_seg"], pred.panoptic, mask_tol)
    if "sem_seg" in off_res:
        report.tensor(section, "semantic", pred.semantic, off_res["sem_seg"])


def compare_panoptic(
    report: Report, section: str, official: tuple[Tensor, list], pan: Any, mask_tol: float
) -> None:
    """Panoptic ``segments_info`` (id, isthing, category) and the segment map, pixel by pixel."""
    seg_o, info_o = official
    info_u = [{k: d[k] for k in ("id", "isthing", "category_id")} for d in pan.segments_info]
    same = info_o == info_u
    report.add(
        section,
        "panoptic segments_info",
        same,
        f"{len(info_o)} official, {len(info_u)} ours, {'equal' if same else 'differ'}",
        official_segments=len(info_o),
        our_segments=len(info_u),
    )
    if seg_o.shape != pan.segments.shape:
        report.add(
            section, "panoptic map", False, f"shape ours {tuple(pan.segments.shape)} vs {tuple(seg_o.shape)}"
        )
        return
    n = int((seg_o.cpu() != pan.segments.cpu()).sum())
    frac = n / max(seg_o.numel(), 1)
    report.add(
        section, "panoptic map", frac <= mask_tol, f"{n} of {seg_o.numel()} pixels differ ({frac:.2e})"
    )
