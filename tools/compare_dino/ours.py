"""Our side of the DINO comparison: the detr-core DINO example (``packages/detr-core/examples/dino``), the checks that
need no official code (state-dict layout against a recorded one), and the comparison rows.

Tolerances: the decoder's ``pred_logits`` / ``pred_boxes`` (every layer) and the encoder proposals' predictions pass
when ``max|ours - official| <= atol`` (1e-4, float32), compared with the two-stage selection pinned to the official
indices (see :func:`compare_forward`); the other tensors when ``max|ours - official| <= atol * max(1, max|official|)``
(feature maps reach ~30 with random weights); a loss when its relative difference is ``<= loss_rtol``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

EXAMPLES = Path(__file__).resolve().parents[2] / "packages" / "detr-core" / "examples"

__all__ = [
    "Report",
    "Row",
    "capture_ours",
    "compare_forward",
    "compare_losses",
    "config_from_official_args",
    "import_example",
    "key_rows",
    "official_arithmetic",
    "tensor_diff",
    "training_step",
]


def import_example() -> Any:
    """The ``dino`` example package (``packages/detr-core/examples/dino``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import dino

    return dino


@contextlib.contextmanager
def official_arithmetic(model: nn.Module) -> Iterator[None]:
    """Within the block our model computes in the official operation order: the backbone applies each frozen norm
    after its convolution (no folding) and every deformable attention runs deform_attn's pure-PyTorch reference,
    the official ``ms_deform_attn_core_pytorch`` formula (``grid_sample`` per level, weighted sum). Outside it our
    inference defaults apply (folded norms, the compiled kernels): the same function, other rounding."""
    import deform_attn
    import deform_attn.modules

    kernel = deform_attn.modules.ms_deform_attn
    fold = model.backbone.fold_norms
    deform_attn.modules.ms_deform_attn = deform_attn.ms_deform_attn_reference
    model.backbone.fold_norms = False
    try:
        yield
    finally:
        deform_attn.modules.ms_deform_attn = kernel
        model.backbone.fold_norms = fold


# ============================================================================================ report


@dataclass
class Row:
    """One line of the report; ``status`` is ``ok``, ``FAIL`` or ``info``."""

    section: str
    name: str
    status: str
    detail: str


@dataclass
class Report:
    atol: float = 1e-4
    loss_rtol: float = 1e-4
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, name: str, ok: bool | None, detail: str) -> Row:
        row = Row(section, name, "info" if ok is None else ("ok" if ok else "FAIL"), detail)
        self.rows.append(row)
        return row

    def tensor(self, section: str, name: str, ours: Tensor, ref: Tensor, absolute: bool = False) -> Row:
        ok, detail = tensor_diff(ours, ref, self.atol, absolute)
        return self.add(section, name, ok, detail)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def print(self, rows: Sequence[Row] | None = None) -> None:
        rows = self.rows if rows is None else rows
        width = max((len(f"{r.section} {r.name}") for r in rows), default=0)
        for r in rows:
            print(f"  {(r.section + ' ' + r.name).ljust(width)}  {r.status:<4}  {r.detail}")


def tensor_diff(ours: Tensor, ref: Tensor, atol: float, absolute: bool = False) -> tuple[bool, str]:
    """``(max|ours - ref| <= atol * max(1, max|ref|), description)`` (``absolute``: ``<= atol``); infinities must sit
    at the same places."""
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != b.shape:
        return False, f"shape mismatch: ours {tuple(a.shape)} vs official {tuple(b.shape)}"
    if a.dtype == torch.bool or b.dtype == torch.bool:
        same = torch.equal(ours.cpu(), ref.cpu())
        return same, f"{'equal' if same else 'differ'} {tuple(a.shape)}"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    same_inf = torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b])
    fin = ~inf_b
    d = (a[fin] - b[fin]).abs()
    max_abs = float(d.max()) if d.numel() else 0.0
    scale = float(b[fin].abs().max()) if d.numel() else 0.0
    limit = atol if absolute else atol * max(1.0, scale)
    ok = same_inf and bool(torch.isfinite(a[fin]).all()) and max_abs <= limit
    extra = f", {int(inf_b.sum())} inf (same places: {same_inf})" if inf_b.any() or inf_a.any() else ""
    return ok, f"max_abs={max_abs:.2e} (limit {limit:.0e}) |ref|max={scale:.2e} {tuple(a.shape)}{extra}"


# ============================================================================================ config, keys


def config_from_official_args(args: argparse.Namespace | Mapping[str, Any]) -> Any:
    """The example's ``DINOConfig`` for the official ``args`` (config + overrides); raises ``SystemExit`` for a
    setting the example does not implement (another variant of DINO)."""
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    fixed = {
        "two_stage_type": "standard",
        "num_patterns": 0,
        "dec_pred_bbox_embed_share": True,
        "dec_pred_class_embed_share": True,
        "two_stage_bbox_embed_share": False,
        "two_stage_class_embed_share": False,
        "embed_init_tgt": True,
        "use_dn": True,
        "dilation": False,
        "backbone": "resnet50",
        "pe_temperatureH": a.get("pe_temperatureW"),
        "return_interm_indices": [1, 2, 3],
        "decoder_layer_noise": False,
        "dec_layer_number": None,
        "transformer_activation": "relu",
        "pre_norm": False,
        "two_stage_add_query_num": 0,
        "two_stage_pat_embed": 0,
        "use_deformable_box_attn": False,
    }
    bad = {k: a.get(k) for k, v in fixed.items() if a.get(k) != v}
    if bad:
        raise SystemExit(
            f"the DINO example implements DINO_4scale's variant only; these settings differ: {bad}"
        )
    dino = import_example()
    return dino.DINOConfig(
        num_classes=a["num_classes"],
        num_queries=a["num_queries"],
        hidden_dim=a["hidden_dim"],
        nheads=a["nheads"],
        dim_feedforward=a["dim_feedforward"],
        enc_layers=a["enc_layers"],
        dec_layers=a["dec_layers"],
        enc_n_points=a["enc_n_points"],
        dec_n_points=a["dec_n_points"],
        num_feature_levels=a["num_feature_levels"],
        pe_temperature=a["pe_temperatureW"],
        dn_number=a["dn_number"],
        dn_label_noise_ratio=a["dn_label_noise_ratio"],
        dn_box_noise_scale=a["dn_box_noise_scale"],
        dn_labelbook_size=a["dn_labelbook_size"],
        focal_alpha=a["focal_alpha"],
        set_cost_class=a["set_cost_class"],
        set_cost_bbox=a["set_cost_bbox"],
        set_cost_giou=a["set_cost_giou"],
        cls_loss_coef=a["cls_loss_coef"],
        bbox_loss_coef=a["bbox_loss_coef"],
        giou_loss_coef=a["giou_loss_coef"],
        num_select=a["num_select"],
    )


def key_rows(
    report: Report, layout: Mapping[str, tuple[int, ...]], model: nn.Module, what: str
) -> dict[str, Any]:
    """Check an official state-dict layout (names and shapes) against our model through the key map: every
    official key maps to a key of ours, every key of ours is covered, shapes agree; and the map round-trips
    (ours -> official names -> ours). Works on meta tensors (no values). Returns the converted shapes."""
    from detr_core.checkpoint import match_aliases

    dino = import_example()
    own = model.state_dict()
    src = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    conv = match_aliases(dino.OFFICIAL_KEY_MAP.convert(src), own.keys(), dino.ALIASES)
    missing = sorted(set(own) - set(conv))
    unexpected = sorted(set(conv) - set(own))
    shapes = [
        f"{k}: {tuple(conv[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in conv and conv[k].shape != own[k].shape
    ]
    report.add(
        "keys",
        f"{what} -> ours",
        not (missing or unexpected or shapes),
        f"{len(layout)} official entries -> {len(set(map(dino.OFFICIAL_KEY_MAP.map_key, layout)))} tensors -> "
        f"{len(own)} of ours; missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} "
        f"({len(unexpected)}), shape mismatches {shapes[:3]} ({len(shapes)})",
    )
    back = dino.to_official({k: v.to("meta") for k, v in own.items()}, layout)
    again = match_aliases(dino.OFFICIAL_KEY_MAP.convert(back), own.keys(), dino.ALIASES)
    same = sorted(back) == sorted(layout) and all(tuple(back[k].shape) == layout[k] for k in layout)
    same = same and sorted(again) == sorted(own)
    report.add(
        "keys",
        f"round trip ours -> {what} names -> ours",
        same,
        f"{len(back)} official names, {len(again)} ours",
    )
    return conv


# ============================================================================================ forward


@dataclass
class OursOutputs:
    """What one forward of our model produced (hooked): the same stages as ``OfficialOutputs``."""

    outputs: Any
    backbone: list[Tensor]
    srcs: list[Tensor]
    pos: list[Tensor]
    memory: Tensor
    output_memory: Tensor
    selection: Any
    hs: list[Tensor]
    references: list[Tensor]


def capture_ours(
    model: nn.Module, images: Sequence[Tensor], indices: Tensor | None = None, targets: Any = None
) -> OursOutputs:
    """One forward of our model (current mode and grad setting) with its intermediates recorded."""
    data: dict[str, Any] = {"pos": []}

    def keep(name: str):
        def hook(module, args, out):
            data[name] = out

        return hook

    handles = [
        model.backbone.register_forward_hook(keep("backbone")),
        model.input_proj.register_forward_hook(keep("srcs")),
        model.position_embedding.register_forward_hook(lambda m, a, o: data["pos"].append(o)),
        model.encoder.register_forward_hook(keep("memory")),
        model.query_selection.enc_output_norm.register_forward_hook(keep("output_memory")),
        model.query_selection.register_forward_hook(keep("selection")),
        model.decoder.register_forward_hook(keep("decoder")),
    ]
    try:
        out = model(list(images), targets, indices=indices)
    finally:
        for h in handles:
            h.remove()
    hs, refs = data["decoder"]
    return OursOutputs(
        out,
        list(data["backbone"].values()),
        data["srcs"],
        data["pos"],
        data["memory"],
        data["output_memory"],
        data["selection"],
        hs,
        refs,
    )


def compare_forward(report: Report, off_res: Any, ours: OursOutputs, pinned: OursOutputs, k: int) -> None:
    """Rows for every stage, in order: backbone, projections and masks, encoder, two-stage scores and selection
    (unpinned run), then the decoder and heads of the run pinned to the official selection."""
    for i, (a, b) in enumerate(zip(ours.backbone, off_res.backbone)):
        report.tensor("backbone", f"res{i + 3}", a, b)
    for i, (a, b) in enumerate(zip(ours.srcs, off_res.srcs)):
        report.tensor("input_proj", f"level {i}", a, b)
    for i, (a, b) in enumerate(zip(ours.pos, off_res.pos)):
        report.tensor("position", f"sine level {i}", a, b)
    report.tensor("encoder", "memory", ours.memory, off_res.memory)
    report.tensor("selection", "output_memory", ours.output_memory, off_res.output_memory)
    sel = ours.selection
    report.tensor("selection", "token scores (all tokens)", sel.token_scores, off_res.enc_scores)
    o_idx, u_idx = off_res.topk_indices, sel.indices
    ranked = off_res.enc_scores.sort(dim=1, descending=True).values
    for b in range(o_idx.shape[0]):
        gap = float(ranked[b, k - 1] - ranked[b, k]) if ranked.shape[1] > k else float("inf")
        common = len(set(o_idx[b].tolist()) & set(u_idx[b].tolist()))
        same = torch.equal(o_idx[b], u_idx[b])
        # scores tied with the official boundary score (padded / invalid tokens share one value) may be selected in
        # any order: the sets agree up to those exact ties
        boundary = off_res.enc_scores[b].gather(0, o_idx[b][-1:])
        tied = int((off_res.enc_scores[b] == boundary).sum())
        report.add(
            "selection",
            f"top-{k} img{b}",
            None,
            f"{common}/{k} tokens in common, same order: {same}; rank {k} gap {gap:.2e}; {tied} token(s) at the boundary score",
        )
    report.tensor(
        "selection (pinned)", "interm pred_logits", pinned.outputs.interm.logits, off_res.interm_logits, True
    )
    report.tensor(
        "selection (pinned)", "interm pred_boxes", pinned.outputs.interm.boxes, off_res.interm_boxes, True
    )
    for i, (a, b) in enumerate(zip(pinned.references, off_res.references)):
        report.tensor("decoder (pinned)", f"reference {i}", a, b)
    decoder_rows(report, "decoder (pinned)", pinned.outputs, off_res, absolute=True)


def decoder_rows(
    report: Report, section: str, outputs: Any, off_res: Any, absolute: bool, last_only: bool = False
) -> None:
    """``pred_logits`` / ``pred_boxes`` of every decoder layer (or the last) against the official ones."""
    levels = list(outputs.aux) + [outputs.final]
    for i, level in enumerate(levels):
        if last_only and i < len(levels) - 1:
            continue
        name = "final" if i == len(levels) - 1 else f"layer {i}"
        report.tensor(section, f"{name} pred_logits", level.logits, off_res.pred_logits[i], absolute)
        report.tensor(section, f"{name} pred_boxes", level.boxes, off_res.pred_boxes[i], absolute)


def compare_postprocess(report: Report, off_results: list[dict[str, Tensor]], ours: list[Any]) -> None:
    """Official ``PostProcess`` (on the official outputs) vs ``topk_detections`` (on ours, pinned)."""
    for b, (o, u) in enumerate(zip(off_results, ours)):
        report.tensor("postprocess", f"img{b} scores", u.scores, o["scores"])
        same = torch.equal(u.labels.cpu(), o["labels"].cpu())
        report.add(
            "postprocess", f"img{b} labels", same, f"{'equal' if same else 'differ'} ({u.labels.numel()})"
        )
        report.tensor("postprocess", f"img{b} boxes", u.boxes, o["boxes"])


# ============================================================================================ losses


def training_step(
    model: nn.Module, criterion: Any, images: Sequence[Tensor], targets: list, indices: Tensor, seed: int
):
    """One training-mode forward + criterion + backward after ``torch.manual_seed(seed)``; returns ``(outputs,
    unweighted losses, weighted total, {canonical parameter name: grad})``."""
    dino = import_example()
    model.train()
    model.zero_grad()
    try:
        torch.manual_seed(seed)
        out = model(list(images), [dict(t) for t in targets], indices=indices)
        losses = criterion(out, targets)
        total = sum(criterion.weighted(losses).values())
        total.backward()
    finally:
        model.eval()

    def canonical(name: str) -> str:  # a shared module's parameters are listed under its first name
        for alias, canon in dino.ALIASES.items():
            name = canon + name.removeprefix(alias) if name.startswith(alias) else name
        return name

    grads = {canonical(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, losses, total, grads


def compare_grads(
    report: Report, name: str, ours: Mapping[str, Tensor], official: Mapping[str, Tensor], limit: float
) -> None:
    """``max|diff| / max|official|`` of every parameter's gradient (the official names mapped to ours)."""
    worst, worst_name = 0.0, ""
    for n, g in ours.items():
        if n in official:
            err = float((g - official[n]).abs().max()) / max(float(official[n].abs().max()), 1e-12)
            if err > worst:
                worst, worst_name = err, n
    missing = sorted(set(official) ^ set(ours))
    report.add(
        "losses",
        name,
        worst <= limit and not missing,
        f"{len(ours)} tensors; worst {worst:.1e} ({worst_name}) (limit {limit:.0e}); unmatched: {missing[:3]}",
    )


def compare_losses(
    report: Report,
    off_losses: Mapping[str, Tensor],
    off_total: Tensor,
    our_losses: Mapping[str, Tensor],
    our_total: Tensor,
    weight_dict: Mapping[str, float],
) -> None:
    """Every weighted loss key (unweighted values) and the weighted total; the official logging-only keys
    (``class_error``, ``cardinality_error``, ``loss_xy``, ``loss_hw``) have no counterpart."""
    keys = [k for k in off_losses if k in weight_dict]
    missing = [k for k in keys if k not in our_losses]
    extra = [k for k in our_losses if k not in off_losses]
    report.add(
        "losses",
        "weighted keys",
        not missing and not extra,
        f"{len(keys)} official; missing {missing[:4]}, extra {extra[:4]}",
    )
    for k in keys:
        if k in our_losses:
            a, b = float(our_losses[k].detach()), float(off_losses[k].detach())
            rel = abs(a - b) / max(abs(b), 1e-12)
            report.add("losses", k, rel <= report.loss_rtol, f"ours {a:.6f} official {b:.6f} rel {rel:.1e}")
    a, b = float(our_total.detach()), float(off_total.detach())
    rel = abs(a - b) / max(abs(b), 1e-12)
    report.add(
        "losses", "weighted total", rel <= report.loss_rtol, f"ours {a:.6f} official {b:.6f} rel {rel:.1e}"
    )
