"""Command line of ``python -m tools.compare_official`` (see the package docstring and tools/README.md)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .inputs import Inputs, photo_inputs, synthetic_batch, synthetic_photo, unpadded_crop
from .official import build_official, import_official, official_yaml_for
from .report import Report
from .weights import load_converted, randomize_official, save_official_checkpoint

if TYPE_CHECKING:
    from maskdino.modeling.model import MaskDINO

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.compare_official",
        description="Check this Mask DINO implementation against the official code (imported from your checkouts).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--maskdino-repo", type=Path, required=True, help="IDEA-Research/MaskDINO checkout")
    p.add_argument(
        "--detectron2-repo", type=Path, default=None, help="detectron2 checkout (default: the installed one)"
    )
    p.add_argument("--config", default="coco-instance-r50-3s-d1-2048", help="our preset")
    p.add_argument(
        "--official-yaml", type=Path, default=None, help="official config (overrides the preset's)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="official checkpoint (.pth/.pkl); default: random"
    )
    p.add_argument("--image", type=Path, default=None, help="input photo (default: a synthetic 480x640 one)")
    p.add_argument(
        "--resize",
        type=int,
        nargs=2,
        default=(800, 1333),
        metavar=("SHORT", "MAX"),
        help="test resize of the photo (shortest edge, longest at most), PIL bilinear as detectron2",
    )
    p.add_argument("--no-resize", action="store_true", help="feed the photo at its own size")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        action="append",
        metavar=("H", "W"),
        default=None,
        help="synthetic images of this size instead of a photo (repeat for a padded batch)",
    )
    p.add_argument("--batch", type=int, default=1, help="synthetic images per --size")
    p.add_argument(
        "--output-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="post-processing output size (default: the photo's size before the resize)",
    )
    p.add_argument(
        "--padding-mode",
        choices=["official", "aware", "both"],
        default="both",
        help="official: must agree to float32 rounding; aware: how far and why it differs",
    )
    p.add_argument("--no-end-to-end", action="store_true", help="skip maskdino convert + predict vs official")
    p.add_argument("--losses", action="store_true", help="also compare matcher, losses and gradients")
    p.add_argument(
        "--latency", action="store_true", help="time official vs ours instead of comparing outputs"
    )
    p.add_argument("--rounds", type=int, default=5, help="--latency: timed rounds per allocator setting")
    p.add_argument("--threads", type=int, default=2, help="--latency: torch.set_num_threads")
    p.add_argument("--latency-worker", choices=["glibc", "retain"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--latency-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--record-fixture",
        type=Path,
        default=None,
        metavar="PATH",
        help="record the official outputs of the parity test's tiny model to PATH and exit",
    )
    p.add_argument("--json", type=Path, default=None, help="write the rows (or latency results) as JSON")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--allow-tf32", action="store_true", help="keep TF32 on CUDA (off by default)")
    p.add_argument("--atol", type=float, default=1e-4, help="forward tensors: max abs diff / max|official|")
    p.add_argument("--loss-rtol", type=float, default=1e-5, help="losses: relative difference")
    p.add_argument(
        "--mask-tol", type=float, default=1e-4, help="post-processed masks: fraction of pixels that differ"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class Setup:
    """Both models with the same weights, and the input."""

    off: Any
    off_cfg: Any
    ours: MaskDINO  # padding_mode="official"
    official_sd: dict[str, Tensor]
    converted: dict[str, Tensor]
    inputs: Inputs
    report: Report


def _inputs(args: argparse.Namespace) -> Inputs:
    if args.size:
        if args.image is not None:
            raise SystemExit("--size makes synthetic images: do not pass --image with it")
        return synthetic_batch([tuple(s) for s in args.size], args.batch, args.seed)
    return photo_inputs(args.image, None if args.no_resize else tuple(args.resize), args.seed)


def setup(args: argparse.Namespace, tmp: Path) -> Setup:
    """Import and build the official model, build ours in official mode, give both the same weights."""
    from detr_core.checkpoint import load_state_dict_file
    from maskdino.config import get_preset
    from maskdino.modeling.model import build_model

    repo = args.maskdino_repo.resolve()
    import_official(repo, args.detectron2_repo.resolve() if args.detectron2_repo else None, tmp)
    yaml_path = official_yaml_for(args.config, repo, args.official_yaml)
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # emitted by the official code
    if args.device == "cuda" and not args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"official config: {yaml_path}\nour preset: {args.config}; device: {args.device}")
    report = Report(args.atol)
    off, off_cfg = build_official(yaml_path, args.device, args.seed)
    cfg = get_preset(args.config)
    cfg.padding_mode = "official"
    ours = build_model(cfg).to(args.device).eval()
    if args.weights is not None:
        official_sd = load_state_dict_file(args.weights)
        res = off.load_state_dict(official_sd, strict=False)
        missing = [k for k in res.missing_keys if not k.startswith("criterion.")]
        report.add(
            "keys",
            "checkpoint -> official model",
            not missing and not res.unexpected_keys,
            f"{len(official_sd)} keys; missing {missing[:5]} ({len(missing)}), unexpected "
            f"{res.unexpected_keys[:5]} ({len(res.unexpected_keys)})",
        )
    else:
        randomize_official(off, args.seed + 1)
        official_sd = {k: v.detach() for k, v in off.state_dict().items()}
    converted, key_report = load_converted(ours, official_sd)
    report.add(
        "keys",
        "converted -> ours (strict)",
        key_report.ok,
        f"{len(converted)} keys: {key_report.describe(5)}",
    )
    own = ours.state_dict()
    unequal = [k for k in converted if k in own and not torch.equal(converted[k].to(own[k]), own[k])]
    report.add("keys", "loaded values", not unequal, f"differ: {unequal[:5]}" if unequal else "all equal")
    n_off, n_ours = (sum(p.numel() for p in m.parameters()) for m in (off, ours))
    report.add("keys", "parameter count", n_off == n_ours, f"official {n_off:,}, ours {n_ours:,}")
    return Setup(off, off_cfg, ours, official_sd, converted, _inputs(args), report)


def _aware_model(s: Setup, preset: str, device: str) -> MaskDINO:
    from detr_core.checkpoint import load_into_model
    from maskdino.config import get_preset
    from maskdino.modeling.model import build_model

    cfg = get_preset(preset)
    cfg.padding_mode = "aware"
    aware = build_model(cfg).to(device).eval()
    load_into_model(aware, s.converted, strict=True)
    return aware


def _official_predictions(
    off: Any, images: list[Tensor], out_sizes: list[tuple[int, int]]
) -> tuple[list, Any]:
    """``MaskDINO.forward`` on the images, and its raw head outputs (captured)."""
    from .stages import official_outputs

    captured: dict[str, Any] = {}
    hook = off.sem_seg_head.register_forward_hook(
        lambda m, i, o: captured.__setitem__("raw", official_outputs(o[0]))
    )
    try:
        with torch.no_grad():
            res = off([{"image": im, "height": h, "width": w} for im, (h, w) in zip(images, out_sizes)])
    finally:
        hook.remove()
    return res, captured["raw"]


def _our_predictions(
    model: MaskDINO, images: list[Tensor], out_sizes: list[tuple[int, int]]
) -> tuple[list, Any]:
    captured: dict[str, Any] = {}
    hook = model.predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("raw", o))
    try:
        preds = model.predict(images, original_sizes=out_sizes)
    finally:
        hook.remove()
    return preds, captured["raw"]


@dataclass
class Run:
    """The shared state of one comparison: the setup, the inputs on the device, the official outputs."""

    s: Setup
    args: argparse.Namespace
    images: list[Tensor]
    out_sizes: list[tuple[int, int]]
    x: Tensor
    sizes: list[tuple[int, int]]
    official: Any  # stages.OfficialRun
    res_o: list
    raw_o: Any


def compare(args: argparse.Namespace, tmp: Path) -> int:
    """The whole comparison; returns the exit status."""
    from .checks import check_settings, max_abs_difference
    from .stages import official_batch, run_official

    s = setup(args, tmp)
    report, off = s.report, s.off
    check_settings(report, off, s.ours)
    images = [im.to(args.device) for im in s.inputs.images]
    out_sizes = [tuple(args.output_size)] * len(images) if args.output_size else s.inputs.output_sizes
    x, sizes = official_batch(off, images)
    print(
        f"input: {s.inputs.description}; batch {tuple(x.shape)}, image sizes {sizes}, output sizes {out_sizes}"
    )
    report.tensor("input", "normalised batch", s.ours.preprocess(images).tensor, x)
    official = run_official(off, x)
    res_o, raw_o = _official_predictions(off, images, out_sizes)
    same = max_abs_difference(raw_o, official.outputs)
    report.add(
        "input",
        "official forward = staged run",
        same == 0.0,
        f"MaskDINO.forward's head outputs and backbone -> pixel decoder -> predictor called one by one: "
        f"max_abs={same:.2e}",
    )
    r = Run(s, args, images, out_sizes, x, sizes, official, res_o, raw_o)
    if args.padding_mode in ("official", "both"):
        _official_mode(r)
    if args.padding_mode in ("aware", "both"):
        _aware_mode(r)
    if not args.no_end_to_end:
        from .endtoend import end_to_end

        ckpt = args.weights
        if ckpt is None:
            ckpt = tmp / "official_random.pth"
            save_official_checkpoint(s.official_sd, ckpt)
        original = s.inputs.original if s.inputs.original is not None else synthetic_photo(seed=args.seed)
        end_to_end(report, off, s.off_cfg, ckpt, args.config, s.inputs.photo, original, tmp)
    return _finish(report, args.json)


def _official_mode(r: Run) -> None:
    """Official mode: every stage fed the official output of the stage before, the whole network, the
    post-processing, the losses."""
    from .checks import compare_predictions, compare_with_ties
    from .losses import compare_losses
    from .stages import our_batch, pixel_output

    report, ours, run = r.s.report, r.s.ours, r.official
    batch = our_batch(ours, r.x, r.sizes)
    with torch.no_grad():
        feats = ours.backbone(batch)
        for k in sorted(run.features):
            report.tensor("backbone", k, feats.get(k), run.features[k])
        pd = ours.pixel_decoder(run.features, batch)
        report.tensor("pixel_decoder", "mask_features", pd.mask_features, run.mask_features)
        for i, (a, b) in enumerate(zip(pd.multi_scale_features, run.multi_scale)):
            report.tensor("pixel_decoder", f"multi_scale[{i}]", a, b)
        head = ours.predictor(pixel_output(ours, run.mask_features, run.multi_scale), batch)
        compare_with_ties(report, "predictor", head, run.outputs)
        perm = compare_with_ties(report, "whole model", ours.network(batch), run.outputs)
    preds, raw_u = _our_predictions(ours, r.images, r.out_sizes)
    post = ours.postprocessor
    things = set(post.thing_classes) if "panoptic" in post.tasks else None
    for i in range(len(r.images)):
        compare_predictions(
            report,
            f"postprocess img{i}",
            r.res_o[i],
            preds[i],
            r.raw_o.final.logits[i],
            raw_u.final.logits[i],
            None if perm is None else perm[i],
            r.args.mask_tol,
            int(r.s.off.test_topk_per_image),
            things,
        )
    if r.args.losses:
        a = r.args
        compare_losses(
            report, r.s.off, ours, run.multi_scale, run.mask_features, batch, a.seed, a.loss_rtol, a.device
        )


def _aware_mode(r: Run) -> None:
    """Padding-aware mode: per stage and whole, post-processing, the official model with more padding, and the
    unpadded crop that must match."""
    from .aware import aware_checks, aware_postprocess, official_padding_sensitivity, unpadded_check
    from .stages import official_batch

    report, off = r.s.report, r.s.off
    aware = _aware_model(r.s, r.args.config, r.args.device)
    aware_checks(report, off, aware, r.official, r.x, r.sizes)
    preds, _ = _our_predictions(aware, r.images, r.out_sizes)
    for i in range(len(r.images)):
        aware_postprocess(report, f"aware postprocess img{i}", r.res_o[i], preds[i])
    official_padding_sensitivity(report, off, r.images, r.out_sizes, r.res_o)
    crops = [unpadded_crop(im, off.size_divisibility) for im in r.images[:1]]
    xc, sizes_c = official_batch(off, crops)
    unpadded_check(report, off, aware, xc, sizes_c)


def _finish(report: Report, json_path: Path | None) -> int:
    print()
    report.print()
    failures = report.failures
    print()
    if json_path is not None:
        report.save_json(json_path)
    if failures:
        print(f"FAILED: {len(failures)} check(s) out of tolerance:")
        report.print(failures)
        return 1
    ties = [r for r in report.rows if r.name == "top-k near tie"]
    print(
        f"PASSED: all {len(report.rows)} checks within tolerance"
        + (f" ({len(ties)} top-k near tie(s) aligned)" if ties else "")
    )
    return 0


def _latency_build(args: argparse.Namespace, tmp: Path):
    def build():
        s = setup(args, tmp)
        return s.off, s.ours, s.inputs

    return build


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    with tempfile.TemporaryDirectory(prefix="compare_official_") as tmp_name:
        tmp = Path(tmp_name)
        if args.record_fixture is not None:
            from .record import record_fixture

            return record_fixture(
                args.record_fixture,
                args.maskdino_repo.resolve(),
                args.detectron2_repo.resolve() if args.detectron2_repo else None,
                tmp,
            )
        if args.latency_worker is not None:
            from .latency import worker

            if args.latency_out is None:
                raise SystemExit("--latency-worker needs --latency-out")
            return worker(
                args.latency_worker, args.threads, args.rounds, _latency_build(args, tmp), args.latency_out
            )
        if args.latency:
            from .latency import run_latency

            return run_latency([a for a in argv if a != "--latency"], args.json, tmp)
        return compare(args, tmp)
