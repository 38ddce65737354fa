"""Training losses: both predictors in training mode (denoising off), then both criteria on the SAME raw outputs,
synthetic targets and seed: matcher indices per level, every loss, the weighted total and the gradients.

Denoising is off on both sides because the official denoising path hard-codes ``.cuda()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checks import compare_with_ties
from .report import Report
from .stages import official_outputs, pixel_output

if TYPE_CHECKING:
    from maskdino.modeling.criterion import MaskDINOCriterion
    from maskdino.modeling.model import MaskDINO

__all__ = ["compare_losses", "synthetic_targets"]


def synthetic_targets(
    counts: Sequence[int], size: tuple[int, int], num_classes: int, seed: int, device: str
) -> list[dict[str, Tensor]]:
    """Criterion targets: elliptic masks with their tight boxes (cxcywh normalised), random labels."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for n in counts:
        masks, boxes = [], []
        for _ in range(n):
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            ry, rx = (
                10 + float(torch.rand(1, generator=g)) * h / 3,
                10 + float(torch.rand(1, generator=g)) * w / 3,
            )
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            ys, xs = m.nonzero(as_tuple=True)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            boxes.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
            masks.append(m)
        out.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).to(device),
                "masks": torch.stack(masks).to(device),
            }
        )
    return out


def _leafify(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _leafify(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_leafify(v) for v in o]
    if isinstance(o, Tensor):
        return o.detach().clone().requires_grad_(True)
    return o


def _leaves(o: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _leaves(v, f"{prefix}[{i}]")
    elif isinstance(o, Tensor):
        yield prefix, o


def _official_levels(raw: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "final", raw
    for i, aux in enumerate(raw.get("aux_outputs") or []):
        yield f"aux[{i}]", aux
    if raw.get("interm_outputs") is not None:
        yield "interm", raw["interm_outputs"]


def _matcher_rows(
    report: Report, section: str, crit_o: Any, crit_u: MaskDINOCriterion, raw: dict, targets: list, seed: int
) -> None:
    bad = []
    ours = official_outputs(raw)
    our_levels = {"final": ours.final, **{f"aux[{i}]": a for i, a in enumerate(ours.aux)}}
    if ours.interm is not None:
        our_levels["interm"] = ours.interm
    for name, level in _official_levels(raw):
        torch.manual_seed(seed + 123)
        idx_o = crit_o.matcher(level, [dict(t) for t in targets])
        torch.manual_seed(seed + 123)
        idx_u = crit_u.matcher(our_levels[name], [dict(t) for t in targets])
        if not all(
            torch.equal(x[0].cpu(), y[0].cpu()) and torch.equal(x[1].cpu(), y[1].cpu())
            for x, y in zip(idx_o, idx_u)
        ):
            bad.append(name)
    n = len(list(_official_levels(raw)))
    report.add(section, "matcher indices", not bad, f"differ at {bad}" if bad else f"equal at all {n} levels")


def compare_losses(
    report: Report,
    off: Any,
    ours: MaskDINO,
    ms: list[Tensor],
    mf: Tensor,
    batch: Any,
    seed: int,
    loss_rtol: float,
    device: str,
) -> None:
    """The loss rows (see the module docstring); ``ms`` / ``mf``: the official pixel decoder outputs."""
    section = "losses"
    pred_o = off.sem_seg_head.predictor
    saved_dn = pred_o.dn
    pred_o.dn = "no"
    pred_o.train()
    ours.predictor.train()
    try:
        with torch.no_grad():
            raw, mask_dict = pred_o(ms, mf, None)
            raw_u = ours.predictor(pixel_output(ours, mf, ms), batch)
    finally:
        pred_o.eval()
        ours.predictor.eval()
        pred_o.dn = saved_dn
    if mask_dict is not None:
        report.add(section, "official mask_dict", False, "denoising was not off")
    compare_with_ties(report, "predictor(train)", raw_u, official_outputs(raw))

    b, _, h, w = mf.shape
    stride = off.sem_seg_head.pixel_decoder.common_stride
    counts = [3 + 2 * (i % 3) for i in range(b)]
    targets = synthetic_targets(
        counts, (h * stride, w * stride), raw["pred_logits"].shape[-1], seed + 3, device
    )
    crit_o, crit_u = off.criterion, ours.criterion
    saved_crit_dn = crit_o.dn
    crit_o.dn = "no"  # the official zero-denoising-loss branch hard-codes .to("cuda")
    try:
        _matcher_rows(report, section, crit_o, crit_u, raw, targets, seed)
        out_o, out_u = _leafify(raw), _leafify(raw)
        torch.manual_seed(seed + 7)
        lo = crit_o(out_o, [dict(t) for t in targets], None)
        rng_o = torch.rand(1).item()
        torch.manual_seed(seed + 7)
        lu = crit_u(official_outputs(out_u), [dict(t) for t in targets])
        rng_u = torch.rand(1).item()
    finally:
        crit_o.dn = saved_crit_dn
    report.add(
        section,
        "RNG state after the criterion",
        rng_o == rng_u,
        "same" if rng_o == rng_u else "differs (another number of random draws)",
    )
    _loss_rows(report, section, crit_o, crit_u, lo, lu, loss_rtol)
    _gradient_row(report, section, crit_o, crit_u, lo, lu, out_o, out_u, loss_rtol)


def _loss_rows(
    report: Report, section: str, crit_o: Any, crit_u: MaskDINOCriterion, lo: dict, lu: dict, loss_rtol: float
) -> None:
    ko, ku = set(lo), set(lu)
    if ko - ku:
        report.add(section, "loss keys", False, f"official only: {sorted(ko - ku)}")
    nonzero = sorted(k for k in ku - ko if float(lu[k].detach()) != 0)
    report.add(
        section,
        "loss keys",
        not nonzero,
        f"{len(ko & ku)} common; {len(ku - ko)} ours-only (denoising "
        "placeholders)" + (f", NON-ZERO: {nonzero[:5]}" if nonzero else ", all zero"),
    )
    worst: dict[str, tuple[float, str]] = {}
    for k in sorted(ko & ku):
        r = abs(float(lu[k]) - float(lo[k])) / max(abs(float(lo[k])), 1e-12)
        base = k.split("_")[1]
        worst[base] = max(worst.get(base, (-1.0, "")), (r, k))
    for base, (r, k) in sorted(worst.items()):
        report.add(
            section,
            f"loss_{base}",
            r <= loss_rtol,
            f"worst rel diff {r:.2e} at {k} (ours {float(lu[k]):.7f}, official {float(lo[k]):.7f})",
            rel=r,
        )


def _gradient_row(
    report: Report,
    section: str,
    crit_o: Any,
    crit_u: MaskDINOCriterion,
    lo: dict,
    lu: dict,
    out_o: Any,
    out_u: Any,
    loss_rtol: float,
) -> None:
    wd = crit_o.weight_dict
    tot_o = sum(lo[k] * wd[k] for k in lo if k in wd)
    wu = crit_u.weighted(lu)
    tot_u = sum(wu[k] for k in wu if k in lo)
    r = abs(float(tot_u) - float(tot_o)) / max(abs(float(tot_o)), 1e-12)
    report.add(
        section,
        "weighted total",
        r <= loss_rtol,
        f"ours {float(tot_u):.6f}, official {float(tot_o):.6f}, rel diff {r:.2e}",
    )
    assert isinstance(tot_o, Tensor) and isinstance(tot_u, Tensor)
    tot_o.backward()
    tot_u.backward()
    worst, where, one_sided = 0.0, "", 0
    for (name, a), (_, g) in zip(_leaves(out_u), _leaves(out_o)):
        if (a.grad is None) != (g.grad is None):
            one_sided += 1
            continue
        if a.grad is None or g.grad is None:
            continue
        d = float((a.grad.double() - g.grad.double()).abs().max())
        scale = max(float(g.grad.abs().max()), 1e-12)
        if d / scale > worst:
            worst, where = d / scale, f"{name} (max_abs {d:.2e}, |grad|max {scale:.2e})"
    report.add(
        section,
        "gradients w.r.t. outputs",
        worst <= report.atol and not one_sided,
        f"worst abs/|grad|max {worst:.2e} at {where}"
        + (f"; {one_sided} tensors with a gradient on one side only" if one_sided else ""),
    )
