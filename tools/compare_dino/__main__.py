"""``python -m tools.compare_dino``: run the official DINO (from your checkout) on an image; see README.md.

Only the official side exists so far (``--official-only``): it builds the official model from a patched temporary
copy of the checkout, randomises every parameter and buffer, runs it in eval mode and prints the shape of every
intermediate, the two-stage top-k margin and the time of each stage.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .official import (
    DEFAULT_CONFIG,
    TINY_OVERRIDES,
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
        description="Run the official DINO (IDEA-Research/DINO, imported from your checkout) on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dino-repo", type=Path, required=True, help="IDEA-Research/DINO checkout")
    p.add_argument(
        "--official-only",
        action="store_true",
        help="run only the official model (the comparison with detr-core's DINO is not written yet)",
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
    p.add_argument("--seed", type=int, default=0, help="seed of the official init and of the randomisation")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=1, help="timed forwards (the median is printed)")
    p.add_argument("--warmup", type=int, default=0, help="untimed forwards before --repeat")
    p.add_argument(
        "--keys-out", type=Path, default=None, help="write the state-dict layout 'name shape dtype'"
    )
    p.add_argument(
        "--losses",
        action="store_true",
        help="also one training-mode forward with denoising and the criterion on synthetic targets",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.official_only:
        raise SystemExit(
            "only the official side exists so far: pass --official-only "
            "(the comparison with detr-core's DINO is not written yet)"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = dict(TINY_OVERRIDES) if args.tiny else {}
    overrides.update(dict(args.set))
    image = load_image(args.image, tuple(args.size) if args.size else None, args.seed)
    x = normalize_image(image)
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

        h, w = x.shape[-2:]
        print(
            f"input: {args.image or 'synthetic'} -> {h}x{w}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), float32, eval, no_grad; CPU: {_cpu()}; "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}, LD_PRELOAD={os.environ.get('LD_PRELOAD', 'unset')}"
        )
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
        if res.results is not None:
            r = res.results[0]
            print(
                f"  postprocess      scores {_shape(r['scores'])} labels {_shape(r['labels'])} boxes {_shape(r['boxes'])}"
            )
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
            f"\ntime (median of {len(runs)} after {args.warmup} warm-up): total {med['total']:.3f} s ({stages} s); "
            f"each run: {each} s"
        )
        if args.losses:
            gt = [
                {
                    "labels": torch.tensor([1, 2, 3]) % off.args.num_classes,
                    "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.8, 0.9]]),
                }
            ]
            out, losses, total = official_losses(off, [x], gt, seed=args.seed)
            meta = out["dn_meta"]
            print(
                f"\nlosses (training mode, denoising {meta['num_dn_group']} groups, pad_size {meta['pad_size']}): "
                f"{len(losses)} keys, weighted total {float(total.detach()):.4f} over "
                f"{sum(k in off.criterion.weight_dict for k in losses)} weighted keys"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
