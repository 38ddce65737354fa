"""``maskdino convert``: an official Mask DINO checkpoint -> a weights file of this package."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from maskdino.checkpoints.convert import convert_official_checkpoint

__all__ = ["build_parser", "convert_main"]


def build_parser() -> argparse.ArgumentParser:
    from maskdino.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="maskdino convert",
        description="Convert an official (detectron2) Mask DINO checkpoint to this package's key names.",
    )
    parser.add_argument("src", help="official checkpoint (.pth / .pkl / .safetensors)")
    parser.add_argument("dst", help="output file: .safetensors or .pth/.pt")
    parser.add_argument(
        "--backbone",
        choices=["resnet", "swin"],
        default=None,
        help="backbone layout (default: detect from keys)",
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="the official config the checkpoint was trained with: verifies it by a strict load into that model "
        "and embeds the config (padding_mode=official, the official test resize) and the class names, so that "
        "`maskdino predict/eval --weights DST` runs it with no other flag",
    )
    return parser


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskdino convert SRC DST [--backbone resnet|swin] [--preset NAME]``; returns the exit code.

    Errors (a missing or invalid file, a checkpoint that does not fit the preset) propagate to
    :func:`maskdino.cli.main`, which reports them in one line.
    """
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    result = convert_official_checkpoint(args.src, args.dst, preset=args.preset, backbone=args.backbone)
    if args.preset:
        print(f"verified: strict load into preset {args.preset!r}: all {result.converted_keys} keys matched")
        print("embedded: the preset's config with padding_mode='official' and the official test-time resize")
    else:
        print("no --preset: the file has no embedded config; pass --config to predict/eval (with "
              "--opts model.padding_mode=official to reproduce the official outputs)")  # fmt: skip
    print(f"{args.src}: {result.source_keys} keys -> {result.output}: {result.converted_keys} keys")
    return 0
