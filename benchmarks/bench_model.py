"""Inference latency of the full Mask DINO model by precision (and with the pure-PyTorch op), in one run.

Model: the R50 COCO instance preset ``coco-instance-r50-3s-d1-2048`` (the released 46.3 AP model's architecture,
52.06 M parameters), random init, eval mode, ``model.predict`` on one RGB image (batch 1), 800x1216 by default (a
COCO test image after the shorter-side-800 resize, padded to 32).

Every precision of ``--precision`` (``fp32``, ``bf16``: the network under bfloat16 autocast, decisions in float32)
runs once per round, rounds alternate (fp32, bf16, fp32, bf16, ...), the first round is a warm-up; medians over
``--repeat`` rounds. Per-stage times come from forward hooks on ``model.backbone``, ``model.pixel_decoder`` and
``model.predictor`` and a timer around the post-processing (``maskdino.modeling.postprocess.postprocess_image``);
"other" = pre-processing and glue. The accuracy cost of each precision against fp32 on the same image: max abs
difference of the raw outputs (class logits, boxes, mask logits) and agreement of the final instances (top-100
labels, box IoU and mask IoU of same-rank instances).

``--reference-op`` adds the fp32 model with the pure-PyTorch (grid_sample) op swapped in (monkeypatching
``deform_attn.modules.ms_deform_attn``), for the op's share of the time.

Like the ``maskdino`` command line, the benchmark first calls ``maskdino.cpu_inference.allocator.retain_freed_memory``
(glibc malloc keeps freed memory for reuse instead of page-faulting it in again); ``--default-malloc`` measures with
glibc's defaults. With a CUDA device the same table is printed for CUDA.

Usage::

    python benchmarks/bench_model.py                              # 800x1216, fp32 and bf16, repeat 3
    python benchmarks/bench_model.py --precision fp32 --repeat 5 --reference-op
    python benchmarks/bench_model.py --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torchvision.ops import box_iou

import deform_attn
import deform_attn.modules
import maskdino.modeling.postprocess as maskdino_post
from maskdino.config import get_preset
from maskdino.cpu_inference.allocator import retain_freed_memory
from maskdino.modeling.model import build_model
from maskdino.modeling.precision import autocast, native_bf16

STAGES = ("backbone", "pixel_decoder", "predictor", "postprocess")


def cpu_info() -> dict[str, object]:
    """CPU model and the flags that decide which kernels run."""
    info: dict[str, object] = {"model": "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(
            ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")
        )
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_bf16", "amx_tile", "f16c")  # fmt: skip
        info["flags"] = [f for f in wanted if f in flags]
    except (OSError, StopIteration):
        pass
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["threads"] = torch.get_num_threads()
    return info


@contextlib.contextmanager
def reference_op() -> Iterator[None]:
    """Make every ``MSDeformAttn`` use the pure-PyTorch op."""
    original = deform_attn.modules.ms_deform_attn
    deform_attn.modules.ms_deform_attn = deform_attn.ms_deform_attn_reference
    try:
        yield
    finally:
        deform_attn.modules.ms_deform_attn = original


class StageTimer:
    """Wall time per stage (forward hooks + a wrapped post-processing function)."""

    def __init__(self, model: torch.nn.Module, sync: Callable[[], None]):
        self.times: dict[str, float] = defaultdict(float)
        self.sync = sync
        self._start: dict[str, float] = {}
        self._handles = []
        for name in ("backbone", "pixel_decoder", "predictor"):
            mod = getattr(model, name)
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        self._orig_post = maskdino_post.postprocess_image

        def timed_postprocess(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = self._orig_post(*args, **kwargs)
            self.sync()
            self.times["postprocess"] += time.perf_counter() - t0
            return out

        maskdino_post.postprocess_image = timed_postprocess

    def _pre(self, name: str):
        def hook(module, args):
            self.sync()
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self.sync()
            self.times[name] += time.perf_counter() - self._start[name]

        return hook

    def reset(self) -> None:
        self.times = defaultdict(float)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        maskdino_post.postprocess_image = self._orig_post


def one_run(
    model, image: torch.Tensor, precision: str, sync: Callable[[], None], timer: StageTimer
) -> dict[str, float]:
    timer.reset()
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.predict([image], precision=precision)
    sync()
    row = {s: timer.times[s] for s in STAGES}
    row["total"] = time.perf_counter() - t0
    row["other"] = row["total"] - sum(row[s] for s in STAGES)
    return row


def timed(model, image, configs: list[str], repeat: int, sync) -> dict[str, dict[str, object]]:
    """Alternating rounds over ``configs`` (precision names, or "reference" = fp32 with the pure-PyTorch op)."""
    timer = StageTimer(model, sync)
    rows: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    try:
        for r in range(repeat + 1):
            for c in configs:
                ctx = reference_op() if c == "reference" else contextlib.nullcontext()
                with ctx:
                    row = one_run(model, image, "fp32" if c == "reference" else c, sync, timer)
                if r > 0:  # round 0 warms up
                    rows[c].append(row)
    finally:
        timer.close()
    out: dict[str, dict[str, object]] = {}
    for c, rs in rows.items():
        out[c] = {
            "median_s": statistics.median(x["total"] for x in rs),
            "min_s": min(x["total"] for x in rs),
            "rounds_s": [x["total"] for x in rs],
            "stages": {s: statistics.median(x[s] for x in rs) for s in (*STAGES, "other")},
        }
    return out


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@torch.inference_mode()
def accuracy_cost(model, image: torch.Tensor, precision: str) -> dict[str, float]:
    """``precision`` against fp32 on the same image: raw outputs and final instances."""
    batch = model.preprocess([image])
    ref = model._inference(batch)
    with autocast(precision, model.device):  # type: ignore[arg-type]
        got = tuple(o.float() for o in model._inference(batch))
    names = ("pred_logits", "pred_boxes", "pred_masks")
    out = {}
    for name, g, r in zip(names, (got[0], got[2], got[1]), (ref[0], ref[2], ref[1])):
        d = (g - r).abs().flatten()
        out[f"max_abs_{name}"] = float(d.max())
        # a near-tied top-k selection can swap a few queries (a large max): the 99th percentile shows the rest
        out[f"p99_abs_{name}"] = float(d.kthvalue(max(1, int(0.99 * d.numel()))).values)
        out[f"scale_{name}"] = float(r.abs().max())
    a = model.predict([image], precision="fp32")[0].instances
    b = model.predict([image], precision=precision)[0].instances
    n = min(len(a), len(b))
    out["top100_same_labels"] = float((a.labels[:n] == b.labels[:n]).float().mean()) if n else 1.0
    out["median_box_iou"] = float(box_iou(a.boxes[:n], b.boxes[:n]).diagonal().median()) if n else 1.0
    out["median_mask_iou"] = float(_mask_iou(a.masks[:n], b.masks[:n]).median()) if n else 1.0
    return out


def print_table(results: dict[str, dict[str, object]], base: str) -> None:
    print(
        "| configuration | median s (min) | "
        + " | ".join((*STAGES, "other"))
        + " | speed-up vs "
        + base
        + " |"
    )
    print("|" + "---|" * (len(STAGES) + 4))
    for c, r in results.items():
        stages = r["stages"]
        assert isinstance(stages, dict)
        cells = " | ".join(f"{stages[s]:.2f}" for s in (*STAGES, "other"))
        speed = float(results[base]["median_s"]) / float(r["median_s"])  # type: ignore[arg-type]
        print(f"| {c} | {r['median_s']:.2f} ({r['min_s']:.2f}) | {cells} | {speed:.2f}x |")
    for c, r in results.items():
        print(f"{c} rounds: " + ", ".join(f"{t:.2f}" for t in r["rounds_s"]))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (after 1 warm-up round)")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--preset", default="coco-instance-r50-3s-d1-2048")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--padding-mode",
        choices=("aware", "official"),
        default=None,
        help="the model's padding_mode (default: the preset's, 'aware'; converted official checkpoints run 'official')",
    )
    parser.add_argument("--reference-op", action="store_true", help="also fp32 with the pure-PyTorch op")
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA measurements")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (the CLI, like this benchmark by default, calls "
        "maskdino.cpu_inference.allocator.retain_freed_memory)",
    )
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    malloc = "glibc defaults" if args.default_malloc else "retain_freed_memory"
    if not args.default_malloc and not retain_freed_memory():
        malloc = "defaults (retain_freed_memory does not apply here)"
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = get_preset(args.preset)
    if args.padding_mode:
        model_cfg.padding_mode = args.padding_mode
    torch.manual_seed(0)
    model = build_model(model_cfg).eval()
    h, w = args.size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
    info = cpu_info()
    print(
        f"preset {args.preset} (padding_mode={model_cfg.padding_mode}): "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    print(f"{deform_attn.build_info()}; {torch.get_num_threads()} CPU threads; malloc: {malloc}")
    print(f"CPU: {info['model']}; flags {' '.join(info['flags'])}; native bf16: {native_bf16()}")  # type: ignore[arg-type]
    print(f"image {h}x{w}, batch 1, median of {args.repeat} alternating round(s) after 1 warm-up; seconds")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report: dict[str, object] = {
        "cpu": info,
        "image": [h, w],
        "preset": args.preset,
        "padding_mode": model_cfg.padding_mode,
        "malloc": malloc,
    }
    if not args.no_cpu:
        configs = precisions + (["reference"] if args.reference_op else [])
        results = timed(model, image, configs, args.repeat, lambda: None)
        print_table(results, precisions[0])
        report.update(results)
        diff = {p: accuracy_cost(model, image, p) for p in precisions if p != "fp32"}
        for p, d in diff.items():
            print(f"{p} vs fp32: " + ", ".join(f"{k} {v:.3g}" for k, v in d.items()))
        report["diff"] = diff
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        cuda_model = model.to(dev)
        img = image.to(dev)
        print(f"\nCUDA: {torch.cuda.get_device_name(0)}")
        cuda = timed(cuda_model, img, precisions, max(args.repeat, 5), torch.cuda.synchronize)
        print_table(cuda, precisions[0])
        for c, r in cuda.items():
            print(f"CUDA {c}: {1.0 / float(r['median_s']):.1f} images/s")  # type: ignore[arg-type]
        report["cuda"] = {"device": torch.cuda.get_device_name(0), **cuda}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
