"""``maskdino convert``: official Mask DINO checkpoint -> our key names (``.safetensors`` or ``.pt``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import (
    convert_official_state_dict,
    load_into_model,
    load_state_dict_file,
    match_aliases,
    save_checkpoint,
)

__all__ = ["build_parser", "convert_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdino convert",
        description="Convert an official (detectron2) Mask DINO checkpoint to this package's key names.",
    )
    parser.add_argument("src", help="official checkpoint (.pth / .pkl / .safetensors)")
    parser.add_argument(
        "dst", help="output file: .safetensors (state dict) or .pt/.pth ({'model': state dict})"
    )
    parser.add_argument(
        "--backbone",
        choices=["resnet", "swin"],
        default=None,
        help="backbone layout (default: detect from keys)",
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="verify the result by a strict load into the model of this preset (e.g. coco-instance-r50-3s-d1-2048)",
    )
    return parser


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskdino convert SRC DST [--backbone resnet|swin] [--preset NAME]``; returns the exit code.

    With ``--preset`` the converted weights are loaded strictly into the model built from that preset
    first; a mismatch raises :class:`maskdino.checkpoint.CheckpointMismatchError` naming every key.
    The output is written atomically.
    """
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    raw = load_state_dict_file(args.src)
    sd = convert_official_state_dict(raw, backbone=args.backbone)
    if args.preset:
        from .config import get_preset
        from .model import build_model

        model = build_model(get_preset(args.preset))
        sd = match_aliases(sd, model.state_dict().keys())
        load_into_model(model, sd, strict=True)
        print(f"verified: strict load into preset {args.preset!r}: all {len(sd)} keys matched")
    dst = Path(args.dst)
    if dst.suffix == ".safetensors":
        save_checkpoint(sd, dst, metadata={"format": "pt", "source": Path(args.src).name})
    else:
        save_checkpoint({"model": sd}, dst)
    print(f"{args.src}: {len(raw)} keys -> {dst}: {len(sd)} keys")
    return 0
