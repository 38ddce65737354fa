"""Inference latency of the full Mask DINO model, with the compiled ``deform_attn`` op and with the
pure-PyTorch reference op swapped in, in the same run.

Model: the R50 COCO instance preset ``coco-instance-r50-3s-d1-2048`` (the released 46.3 AP model's
architecture, 52.06 M parameters), random init, eval mode, ``model.predict`` on one RGB image (batch 1),
800x1216 by default (a COCO test image after the shorter-side-800 resize, padded to 32).

The reference op is swapped in by monkeypatching ``deform_attn.modules.ms_deform_attn`` (the function every
``MSDeformAttn`` module calls). Per-stage times come from forward hooks on ``model.backbone``,
``model.pixel_decoder`` and ``model.predictor`` and a timer around the post-processing call
(``maskdino.modeling.postprocess.postprocess_image``); "other" = pre-processing and glue. Times are medians over
``--repeat`` runs after one warm-up run (the fastest run is printed as well).

Like the ``maskdino`` command line, the benchmark first calls ``maskdino.cpu_inference.allocator.retain_freed_memory`` (glibc
malloc keeps freed memory for reuse instead of page-faulting it in again); ``--default-malloc`` measures with
glibc's defaults instead.

With a CUDA device, also images/s of ``predict`` in float32 and under bfloat16 autocast (compiled op only).

Usage::

    python benchmarks/bench_model.py                      # 800x1216, CPU, repeat 2
    python benchmarks/bench_model.py --size 512 768 --repeat 3
    python benchmarks/bench_model.py --no-reference       # skip the (slow) reference-op run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

import deform_attn
import deform_attn.modules
import maskdino.modeling.postprocess as maskdino_post
from maskdino.config import get_preset
from maskdino.cpu_inference.allocator import retain_freed_memory
from maskdino.modeling.model import build_model

STAGES = ("backbone", "pixel_decoder", "predictor", "postprocess")


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
    """Accumulates wall time per stage (forward hooks + a wrapped post-processing function)."""

    def __init__(self, model: torch.nn.Module, sync: Callable[[], None]):
        self.times: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.sync = sync
        self._start: dict[str, tuple[float, float]] = {}
        self._handles = []
        for name in ("backbone", "pixel_decoder", "predictor"):
            mod = getattr(model, name)
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        self._orig_post = maskdino_post.postprocess_image

        def timed_postprocess(*args, **kwargs):
            self.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            out = self._orig_post(*args, **kwargs)
            self.sync()
            self.times["postprocess"] += time.perf_counter() - t0
            self.cpu["postprocess"] += time.process_time() - c0
            return out

        maskdino_post.postprocess_image = timed_postprocess

    def _pre(self, name: str):
        def hook(module, args):
            self.sync()
            self._start[name] = (time.perf_counter(), time.process_time())

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self.sync()
            t0, c0 = self._start[name]
            self.times[name] += time.perf_counter() - t0
            self.cpu[name] += time.process_time() - c0

        return hook

    def reset(self) -> None:
        self.times = defaultdict(float)
        self.cpu = defaultdict(float)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        maskdino_post.postprocess_image = self._orig_post


def run(model, image: torch.Tensor, repeat: int, sync: Callable[[], None], autocast=None) -> dict[str, float]:
    """Median total and per-stage seconds of ``model.predict([image])`` over ``repeat`` runs (+1 warm-up)."""
    timer = StageTimer(model, sync)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    rows: list[dict[str, float]] = []
    try:
        for i in range(repeat + 1):
            timer.reset()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode(), ctx():
                model.predict([image])
            sync()
            total = time.perf_counter() - t0
            cpu = time.process_time() - c0
            if i == 0:
                continue  # warm-up
            row = {s: timer.times[s] for s in STAGES}
            row["total"] = total
            row["cpu"] = cpu
            row |= {f"cpu_{s}": timer.cpu[s] for s in STAGES}
            row["other"] = total - sum(row[s] for s in STAGES)
            rows.append(row)
    finally:
        timer.close()
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    # on a shared machine the fastest run is the one least disturbed by other jobs: report it too
    out["total_min"] = min(r["total"] for r in rows)
    out["cpu_min"] = min(r["cpu"] for r in rows)
    return out


def fmt_row(name: str, r: dict[str, float]) -> str:
    cells = " | ".join(f"{r[s]:.2f}" for s in (*STAGES, "other"))
    cpu = " / ".join(f"{r['cpu_' + s]:.1f}" for s in STAGES)
    return (
        f"| {name} | {r['total']:.2f} (min {r['total_min']:.2f}) | {cells} | {r['cpu']:.1f} ({cpu}; "
        f"min {r['cpu_min']:.1f}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument(
        "--repeat", type=int, default=2, help="timed runs per configuration (after 1 warm-up)"
    )
    parser.add_argument("--preset", default="coco-instance-r50-3s-d1-2048")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-reference", action="store_true", help="skip the pure-PyTorch op run")
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA measurements")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (the CLI, like this benchmark by default, calls "
        "maskdino.cpu_inference.allocator.retain_freed_memory)",
    )
    args = parser.parse_args()
    malloc = "glibc defaults" if args.default_malloc else "retain_freed_memory"
    if not args.default_malloc and not retain_freed_memory():
        malloc = "defaults (retain_freed_memory does not apply here)"
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    model = build_model(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_keys = len(model.state_dict())
    h, w = args.size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
    print(f"preset {args.preset}: {n_params:,} parameters, {n_keys} state-dict keys")
    print(f"{deform_attn.build_info()}; {torch.get_num_threads()} CPU threads; malloc: {malloc}")
    print(f"image {h}x{w}, batch 1, median of {args.repeat} run(s) after 1 warm-up; seconds")

    # On a shared machine wall time depends on the other processes: print the load and the process CPU time
    # (all threads) next to it.
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = "| op | total (min) | " + " | ".join((*STAGES, "other")) + " | process CPU s (per stage; min) |"
    print(header)
    print("|" + "---|" * (len(STAGES) + 4))
    if not args.no_cpu:
        nosync = lambda: None  # noqa: E731
        ours = run(model, image, args.repeat, nosync)
        print(fmt_row("compiled deform_attn (CPU)", ours), flush=True)
        if not args.no_reference:
            with reference_op():
                ref = run(model, image, args.repeat, nosync)
            print(fmt_row("pure-PyTorch reference op (CPU)", ref))
            print(
                f"ratio reference / compiled, wall: total {ref['total'] / ours['total']:.2f}x, pixel decoder "
                f"{ref['pixel_decoder'] / ours['pixel_decoder']:.2f}x, predictor "
                f"{ref['predictor'] / ours['predictor']:.2f}x; CPU time: total {ref['cpu'] / ours['cpu']:.2f}x, "
                f"pixel decoder {ref['cpu_pixel_decoder'] / ours['cpu_pixel_decoder']:.2f}x, "
                f"predictor {ref['cpu_predictor'] / ours['cpu_predictor']:.2f}x"
            )

    print(f"load average after the CPU runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        model = model.to(dev)
        img = image.to(dev)
        sync = torch.cuda.synchronize
        reps = max(args.repeat, 5)
        print(f"\nCUDA: {torch.cuda.get_device_name(0)}; median of {reps} runs after 1 warm-up")
        for label, ac in (
            ("float32", None),
            ("bfloat16 autocast", lambda: torch.autocast("cuda", dtype=torch.bfloat16)),
        ):
            try:
                r = run(model, img, reps, sync, autocast=ac)
            except Exception as exc:  # report and continue: one dtype failing must not hide the others
                print(f"| {label} | failed: {type(exc).__name__}: {exc} |")
                continue
            print(fmt_row(f"CUDA {label}", r) + f"  {1.0 / r['total']:.1f} images/s")
        if not args.no_reference:
            with reference_op():
                r = run(model, img, reps, sync)
            print(fmt_row("CUDA float32, reference op", r) + f"  {1.0 / r['total']:.1f} images/s")


if __name__ == "__main__":
    main()
