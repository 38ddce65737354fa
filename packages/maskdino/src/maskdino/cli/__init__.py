"""Command line: ``maskdino {synth,train,eval,predict,convert,demo}`` (also ``python -m maskdino``).

    maskdino demo                                        # synthetic data -> train tiny on CPU -> eval -> pictures
    maskdino synth OUT_DIR --seed 0 --train 200 --val 50 --size 128
    maskdino train --config tiny --opts train.max_iter=100 solver.base_lr=2e-4 [--resume] [--output DIR]
    torchrun --nproc_per_node 8 -m maskdino train --config coco-instance-r50-3s-d1-2048
    maskdino eval --config tiny --weights outputs/demo/train/model_final.pth
    maskdino predict img1.jpg photos/ --weights model_final.pth --out preds/ --score-threshold 0.5
    maskdino convert official.pth converted.pth --preset coco-instance-r50-3s-d1-2048
    maskdino export --weights converted.pth --format onnx --output model.onnx [--dynamic]
    maskdino predict photo.jpg --backend onnxruntime --model model.onnx --out preds/

Exit status: 0 success; 1 some work failed (e.g. images that could not be read; each named on stderr); 2 a user error
(bad arguments, a missing or invalid file, an invalid config), reported in one line without a traceback. A traceback
means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config", required=required, help="experiment preset name (e.g. tiny) or a .yaml/.json file"
    )
    p.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.max_iter=100"
    )


def _add_precision_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="inference precision " + (what + " " if what else "") + "(default: the model config's, fp32): "
                   "bf16 runs the network under bfloat16 autocast, decisions stay float32")  # fmt: skip


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its error message
    return parse


_positive_int = _int_at_least(1)


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdino", description="Mask DINO: train, evaluate and run (no detectron2)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "synth", help="write the synthetic shapes dataset (COCO instance + panoptic + semantic)"
    )
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=_positive_int, default=200, help="number of training images")
    p.add_argument("--val", type=_positive_int, default=50, help="number of validation images")
    p.add_argument("--size", type=_int_at_least(32), default=128, help="image side in pixels (>= 32)")

    p = sub.add_parser("train", help="train (single process, or under torchrun for DDP)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last_checkpoint (exactly)")
    p.add_argument("--output", help="output folder (overrides train.output_dir)")
    p.add_argument(
        "--time-budget", type=_nonnegative_float, help="stop cleanly after this many seconds of training"
    )

    p = sub.add_parser("eval", help="evaluate weights on the config's val split")
    _add_config_args(p, required=False)
    p.add_argument("--weights", required=True)
    _add_precision_arg(p)
    p.add_argument("--output", help="where to write metrics.json (default: next to the weights)")

    p = sub.add_parser("predict", help="draw predictions on images and write COCO-format results")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="torch: the PyTorch model (--weights); onnxruntime / openvino: an exported model (--model)")  # fmt: skip
    p.add_argument("--weights", help="PyTorch backend: the weights file")
    p.add_argument("--model", help="exported backends: the .onnx / .xml file written by `maskdino export`")
    p.add_argument("--config", help="experiment (default: the config stored in the weights file)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="output folder for PNGs and predictions.json")
    p.add_argument("--score-threshold", type=_probability, default=0.5)
    _add_precision_arg(p)

    p = sub.add_parser("export", help="export the network to ONNX or OpenVINO for deployment")
    p.add_argument("--weights", required=True)
    _add_config_args(p, required=False)
    p.add_argument("--format", choices=["onnx", "openvino"], required=True)
    p.add_argument("--output", required=True, help="the .onnx file, or the OpenVINO .xml (+ .bin)")
    p.add_argument("--height", type=_positive_int, help="fixed input height (default: the config's test resize, "
                   "rounded up to size_divisibility)")  # fmt: skip
    p.add_argument("--width", type=_positive_int, help="fixed input width")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--op-form", choices=["grid_sample", "gather", "custom"], default="grid_sample",
                   help="deformable attention in ONNX: GridSample per level, Gather + arithmetic (for TensorRT), or "
                   "custom: one deform_attn::MSDeformAttn node that OpenVINO runs with the op's own kernels "
                   "(compiled on first use; fastest, OpenVINO only)")  # fmt: skip

    p = sub.add_parser(
        "convert", help="convert an official Mask DINO checkpoint (arguments: see maskdino convert -h)"
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the CPU demo: synthetic data, tiny model, evaluation, pictures")
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--time-budget", type=_nonnegative_float, default=720.0,
                   help="seconds of training (default 720 = 12 min; 0 = no limit)")  # fmt: skip
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--loss-png", help="also copy the loss curve here")
    p.add_argument(
        "--threads", type=_positive_int, help="torch threads (default: the idle cores, from the load average)"
    )
    _add_precision_arg(p, "of the evaluation and the pictures (training is float32)")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (reported in one line, exit 2), not a bug."""
    from detr_core.checkpoint import CheckpointError, CheckpointMismatchError, KeyMapError
    from maskdino.config import ConfigError
    from maskdino.data.errors import DataError
    from maskdino.export.metadata import ExportError

    return (ConfigError, DataError, CheckpointError, CheckpointMismatchError, KeyMapError, ExportError,
            FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `convert` passes everything after it through untouched (its own parser owns those options).
    command = argv[0] if argv else None
    try:
        if command == "convert":
            from maskdino.cli.convert import convert_main

            return int(convert_main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        from maskdino.cli import commands

        return int(commands.COMMANDS[args.command](args) or 0)
    except _user_errors() as e:
        print(f"maskdino {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"maskdino {command}: interrupted", file=sys.stderr)
        return 130
