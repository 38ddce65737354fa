"""``python -m tools.compare_dino``: the detr-core DINO example against the official DINO (from your checkout) on the
same random weights and the same image; see README.md.

Builds the official model from a patched temporary copy of the checkout, randomises every parameter and buffer,
converts its state dict to ours through the example's key map (strictly), runs both and prints one row per check:
keys, backbone, input projections, position embeddings, encoder memory, two-stage scores and selection, then the
decoder and heads with the selection pinned to the official indices, the post-processing, optionally the losses and
gradients of a training step with denoising (same seed), and the latency of both in alternating rounds. Exit status 1
when a check fails. ``--official-only`` runs the official side alone (shapes, top-k margin, time per stage).
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .official import (
    DEFAULT_CONFIG,
    TINY_OVERRIDES,
    Official,
    build_official,
    checkout_revision,
    eval_resize_size,
    median_seconds,
    normalize_image,
    official_losses,
    randomize_,
    run_official,
    state_dict_layout,
)
from .ours import (
    Report,
    capture_ours,
    compare_forward,
    compare_grads,
    compare_losses,
    compare_postprocess,
    config_from_official_args,
    decoder_rows,
    import_example,
    key_rows,
    official_arithmetic,
    training_step,
)


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.compare_dino",
        description="Compare the detr-core DINO example with the official DINO (imported from your checkout) on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dino-repo", type=Path, required=True, help="IDEA-Research/DINO checkout")
    p.add_argument(
        "--official-only", action="store_true", help="run only the official model (shapes, timing)"
    )
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help="official config (path, or relative to the checkout)"
    )
    p.add_argument("--tiny", action="store_true", help=f"apply the tiny overrides {TINY_OVERRIDES}")
    p.add_argument(
        "--set",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config setting (Python literal), after --tiny; repeatable",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="input image (default: a synthetic one); resized as the official eval transform unless --size",
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="resize the input to exactly H x W",
    )
    p.add_argument(
        "--second-image",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="add a synthetic second image of H x W to the batch (padding: DETR masks, valid ratios)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the official init and of the randomisation")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=0, help="timed forwards of each model, alternating (median)")
    p.add_argument("--warmup", type=int, default=0, help="untimed forwards of each model before --repeat")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="tensor tolerance: max|diff| <= atol * max(1, max|ref|)"
    )
    p.add_argument("--loss-rtol", type=float, default=1e-4, help="relative tolerance of losses and gradients")
    p.add_argument(
        "--float64",
        action="store_true",
        help="also run both in float64 (pinned) and print how far each float32 run is from ours in float64",
    )
    p.add_argument(
        "--keys-out", type=Path, default=None, help="write the official state-dict layout 'name shape dtype'"
    )
    p.add_argument(
        "--losses",
        action="store_true",
        help="also a training step with denoising on synthetic targets: losses, total and gradients (same seed)",
    )
    return p


def load_image(path: Path | None, size: tuple[int, int] | None, seed: int) -> Tensor:
    """``(3, H, W)`` float RGB in ``[0, 255]``: the file (PIL, as the official loader) resized with PIL bilinear to
    ``size`` or by the official eval rule, or a synthetic image of ``size`` (default 512 x 640)."""
    if path is None:
        h, w = size or (512, 640)
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(1, 3, max(h // 32, 1), max(w // 32, 1), generator=g)
        return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0] * 255
    from PIL import Image

    if not path.is_file():
        raise SystemExit(f"--image: {path} not found")
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise SystemExit(f"--image: {path} is not a readable image ({e})") from None
    h, w = size or eval_resize_size(img.height, img.width)
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    return (
        torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).float()
    )


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _topk_margin(scores: Tensor, k: int) -> str:
    """How close the top-k boundary is: the gap between ranks k and k+1 and how many tokens lie within 1e-5."""
    s = scores[0].sort(descending=True).values
    if s.numel() <= k:
        return f"all {s.numel()} tokens selected"
    gap = float(s[k - 1] - s[k])
    near = int(((s - s[k - 1]).abs() <= 1e-5).sum())
    return f"score[{k - 1}]={float(s[k - 1]):.6f}, gap to rank {k}: {gap:.2e}; {near - 1} other tokens within 1e-5 of it"


def _cpu() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have)
                break
    except OSError:
        pass
    return f"{model} [{flags}]"


def synthetic_targets(n_images: int, num_classes: int, seed: int) -> list[dict[str, Tensor]]:
    """Per image 3 boxes (cxcywh normalised, one touching the border) with labels in ``[1, num_classes)``."""
    g = torch.Generator().manual_seed(seed + 17)
    out = []
    for i in range(n_images):
        centres = torch.rand(3, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(3, 2, generator=g) * 0.3 + 0.05
        boxes = torch.cat([centres, sizes], 1)
        boxes[2] = torch.tensor([0.5, 0.5, 1.0, 1.0]) if i == 0 else boxes[2]
        labels = torch.randint(1, num_classes, (3,), generator=g)
        out.append({"labels": labels, "boxes": boxes})
    return out


def official_only(args: argparse.Namespace, off: Official, x: Tensor) -> int:
    h, w = x.shape[-2:]
    for _ in range(args.warmup):
        run_official(off, [x])
    runs = [run_official(off, [x], target_sizes=[(h, w)]) for _ in range(max(args.repeat, 1))]
    res = runs[-1]
    k = res.topk_indices.shape[1]
    print("\nshapes:")
    print(
        f"  backbone         {[_shape(t) for t in res.backbone]} masks {[_shape(t) for t in res.backbone_masks]}"
    )
    print(f"  srcs             {[_shape(t) for t in res.srcs]}")
    print(f"  pos              {[_shape(t) for t in res.pos]}")
    print(f"  spatial_shapes   {res.spatial_shapes}")
    print(f"  memory           {_shape(res.memory)}  output_memory {_shape(res.output_memory)}")
    print(f"  enc_scores       {_shape(res.enc_scores)}  topk_indices {_shape(res.topk_indices)}")
    print(f"  interm           logits {_shape(res.interm_logits)} boxes {_shape(res.interm_boxes)}")
    print(
        f"  decoder hs       {len(res.hs)} x {_shape(res.hs[0])}; references {len(res.references)} x {_shape(res.references[0])}"
    )
    print(f"  pred_logits      {len(res.pred_logits)} layers x {_shape(res.pred_logits[-1])}")
    print(f"  pred_boxes       {len(res.pred_boxes)} layers x {_shape(res.pred_boxes[-1])}")
    finite = all(bool(torch.isfinite(t).all()) for t in res.pred_logits + res.pred_boxes)
    last = res.pred_logits[-1]
    print(
        f"values: all decoder outputs finite: {finite}; last-layer logits mean {float(last.mean()):.3f} "
        f"std {float(last.std()):.3f}; top-k: {_topk_margin(res.enc_scores, k)}"
    )
    med = median_seconds([r.seconds for r in runs])
    stages = ", ".join(f"{s} {med[s]:.3f}" for s in ("backbone", "encoder", "decoder", "other"))
    each = ", ".join(f"{r.seconds['total']:.3f}" for r in runs)
    print(
        f"\ntime (median of {len(runs)} after {args.warmup} warm-up): total {med['total']:.3f} s ({stages} s); each run: {each} s"
    )
    if args.losses:
        gt = synthetic_targets(1, off.args.num_classes, args.seed)
        out, losses, total = official_losses(off, [x], gt, seed=args.seed)
        meta = out["dn_meta"]
        print(
            f"\nlosses (training mode, denoising {meta['num_dn_group']} groups, pad_size {meta['pad_size']}): "
            f"{len(losses)} keys, weighted total {float(total.detach()):.4f} over "
            f"{sum(k in off.criterion.weight_dict for k in losses)} weighted keys"
        )
    return 0


def _recorded_layout(overrides: dict[str, Any], config: str) -> str | None:
    if config != DEFAULT_CONFIG:
        return None
    return {(): "dino-4scale-r50", tuple(sorted(TINY_OVERRIDES.items())): "dino-tiny"}.get(
        tuple(sorted(overrides.items()))
    )


def compare(args: argparse.Namespace, off: Official, images: list[Tensor], overrides: dict[str, Any]) -> int:
    from detr_core.checkpoint import load_into_model, match_aliases
    from detr_core.padding import PaddedBatch
    from detr_core.postprocess import topk_detections

    dino = import_example()
    report = Report(args.atol, args.loss_rtol)
    cfg = config_from_official_args(off.args)
    ours = dino.DINO(cfg).eval()

    # ------------------------------------------------------------------ keys and weights
    official_sd = {k: v.detach().clone() for k, v in off.model.state_dict().items()}
    layout = {k: tuple(v.shape) for k, v in official_sd.items()}
    recorded = _recorded_layout(overrides, args.config)
    if recorded is not None:
        rec = dino.read_layout(dino.LAYOUTS[recorded])
        same = list(rec.items()) == list(layout.items())
        report.add(
            "keys",
            f"official layout == recorded {recorded}",
            same,
            f"{len(layout)} entries, names and shapes in order",
        )
    key_rows(report, layout, ours, "official")
    conv = match_aliases(dino.OFFICIAL_KEY_MAP.convert(official_sd), ours.state_dict().keys(), dino.ALIASES)
    load = load_into_model(ours, conv, strict=False)
    report.add("keys", "strict load of the converted random weights", load.ok, load.describe(limit=3))
    own = ours.state_dict()
    unequal = [k for k in own if not torch.equal(own[k], conv[k])]
    report.add(
        "keys", "every parameter and buffer equal", not unequal, f"{len(own)} tensors; differ: {unequal[:3]}"
    )
    n_off, n_ours = sum(p.numel() for p in off.model.parameters()), sum(p.numel() for p in ours.parameters())
    report.add("keys", "parameter count", n_off == n_ours, f"official {n_off:,}, ours {n_ours:,}")

    # ------------------------------------------------------------------ forward (eval)
    sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.no_grad():
        off_res = run_official(off, images, target_sizes=sizes)
        with official_arithmetic(ours):  # the official operation order; our inference defaults follow below
            ours_res = capture_ours(ours, images)
            pinned = capture_ours(ours, images, indices=off_res.topk_indices)
        default = capture_ours(ours, images, indices=off_res.topk_indices)
    batch = PaddedBatch.from_images(images, mask_rule="nearest")
    for i, (m, (h, w)) in enumerate(zip(off_res.masks, off_res.spatial_shapes)):
        mine = batch.padding_mask((h, w), 1)
        mine = torch.zeros_like(m) if mine is None else mine
        report.tensor("input_proj", f"padding mask level {i}", mine, m)
    compare_forward(report, off_res, ours_res, pinned, cfg.num_queries)
    decoder_rows(report, "decoder (pinned, kernels)", default.outputs, off_res, absolute=False)
    final = pinned.outputs.final
    dets = topk_detections(final.logits, final.boxes, sizes, cfg.num_select)
    assert off_res.results is not None
    compare_postprocess(report, off_res.results, dets)

    # ------------------------------------------------------------------ losses (training, denoising)
    if args.losses:
        targets = synthetic_targets(len(images), cfg.num_classes, args.seed)
        off.model.zero_grad()
        out_o, losses_o, total_o = official_losses(off, images, targets, seed=args.seed)
        total_o.backward()
        grads_o = dino.OFFICIAL_KEY_MAP.convert(
            {n: p.grad for n, p in off.model.named_parameters() if p.grad is not None}
        )
        topk = off.mods.harness.last_topk
        criterion = dino.build_criterion(cfg)
        with official_arithmetic(ours):
            out_u, losses_u, total_u, grads_u = training_step(
                ours, criterion, images, targets, topk, args.seed
            )
        meta = out_o["dn_meta"]
        dn = out_u.denoising
        report.add(
            "losses",
            "denoising layout",
            dn is not None
            and dn.meta.pad_size == meta["pad_size"]
            and dn.meta.num_groups == meta["num_dn_group"],
            f"official {meta['num_dn_group']} groups, pad_size {meta['pad_size']}",
        )
        compare_losses(report, losses_o, total_o, losses_u, total_u, off.criterion.weight_dict)
        compare_grads(report, "gradients (max|diff| / max|official|)", grads_u, grads_o, 100 * args.loss_rtol)
        _, losses_k, total_k, grads_k = training_step(ours, criterion, images, targets, topk, args.seed)
        rel = abs(float(total_k.detach()) - float(total_o.detach())) / abs(float(total_o.detach()))
        report.add(
            "losses (kernels)",
            "weighted total",
            rel <= report.loss_rtol,
            f"ours {float(total_k.detach()):.6f} official {float(total_o.detach()):.6f} rel {rel:.1e}",
        )
        compare_grads(report, "gradients (kernels)", grads_k, grads_o, 100 * args.loss_rtol)

    # ------------------------------------------------------------------ latency
    if args.repeat:
        times: dict[str, list[float]] = {"official": [], "ours": []}
        with torch.no_grad():
            for r in range(args.warmup + args.repeat):
                for name in ("official", "ours"):
                    t0 = time.perf_counter()
                    if name == "official":
                        off.model(list(images))
                    else:
                        ours(images)
                    dt = time.perf_counter() - t0
                    if r >= args.warmup:
                        times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        detail = ", ".join(
            f"{k} median {med[k]:.3f} s (runs {', '.join(f'{t:.3f}' for t in v)})" for k, v in times.items()
        )
        report.add(
            "latency",
            f"{len(images)} image(s) {sizes}",
            None,
            f"{detail}; official / ours = {med['official'] / med['ours']:.2f}x",
        )

    # ------------------------------------------------------------------ float64 reference (the float32 noise floor)
    if args.float64:
        idx = off_res.topk_indices
        ours.double()
        off.model.double()
        with torch.no_grad(), official_arithmetic(ours):
            ref = capture_ours(ours, [im.double() for im in images], indices=idx).outputs
            off64 = run_official(off, [im.double() for im in images], pin_topk=idx)
        runs = {
            "official float32": off_res,
            "ours float32": pinned.outputs,
            "ours float32 (kernels)": default.outputs,
            "official float64": off64,
        }
        for name, run in runs.items():
            logits = run.pred_logits[-1] if hasattr(run, "pred_logits") else run.final.logits
            d = float((logits.double() - ref.final.logits).abs().max())
            report.add(
                "float64 reference", f"{name} final pred_logits vs ours float64", None, f"max_abs={d:.2e}"
            )
        ours.float()
        off.model.float()

    print()
    report.print()
    print()
    if report.failures:
        print(f"FAILED: {len(report.failures)} check(s) out of tolerance:")
        report.print(report.failures)
        return 1
    print(f"PASSED: all {sum(r.status == 'ok' for r in report.rows)} checks within tolerance")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = dict(TINY_OVERRIDES) if args.tiny else {}
    overrides.update(dict(args.set))
    image = load_image(args.image, tuple(args.size) if args.size else None, args.seed)
    images = [normalize_image(image)]
    if args.second_image is not None:
        images.append(normalize_image(load_image(None, tuple(args.second_image), args.seed + 5)))
    with tempfile.TemporaryDirectory(prefix="dino_official_") as tmp:
        off = build_official(args.dino_repo, Path(tmp), args.config, overrides, seed=args.seed)
        names = randomize_(off.model, seed=args.seed + 1)
        mods = off.mods
        print(f"official DINO: {mods.source} (patches: {mods.patches})")
        print(f"config: {args.config}  overrides: {overrides or 'none'}")
        n_params = sum(p.numel() for p in off.model.parameters())
        print(
            f"state dict: {len(off.model.state_dict())} entries ({len(names)} randomised), {n_params:,} parameters"
        )
        if args.keys_out is not None:
            lines = state_dict_layout(off.model)
            header = [
                f"# IDEA-Research/DINO {checkout_revision(args.dino_repo)} {args.config} "
                f"overrides={overrides or {}}: model.state_dict() layout",
                "# name (shape) dtype",
            ]
            args.keys_out.write_text("\n".join(header + lines) + "\n")
            print(f"layout: {len(lines)} entries -> {args.keys_out}")
        print(
            f"input: {args.image or 'synthetic'} -> {[tuple(im.shape[-2:]) for im in images]}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), float32; CPU: {_cpu()}; "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}, LD_PRELOAD={os.environ.get('LD_PRELOAD', 'unset')}"
        )
        if args.official_only:
            return official_only(args, off, images[0])
        return compare(args, off, images, overrides)


if __name__ == "__main__":
    sys.exit(main())
