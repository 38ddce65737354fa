"""Like-for-like latency of the official model and ours on the same input, with a per-stage split.

Both models hold the same weights; ours runs in ``padding_mode="official"`` (how a converted official checkpoint
runs). Each side goes from the same resized image tensor ``(3, h, w)`` to post-processed predictions at the photo's
original size: official ``MaskDINO.forward([{"image", "height", "width"}])`` (its deformable attention on the
pure-PyTorch fallback, as on any CPU) and our ``MaskDINO.predict``. Rounds alternate (official, ours, official, ...)
after one warm-up run each; every round is printed with the load average, then the medians and the median ratio.

The allocator setting is process-wide, so each setting runs in its own process: glibc's defaults, and
``maskdino.cpu_inference.allocator.retain_freed_memory()`` (called before anything is built), the same on both
sides. Stages: ``backbone``, ``pixel_decoder`` (incl. the deformable encoder), ``decoder`` (the predictor: query
selection, decoder layers, heads), ``postprocess`` (from the end of the predictor to the returned predictions:
mask resizing, instance / panoptic / semantic inference) and ``other`` (pre-processing).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from maskdino.modeling.model import MaskDINO

__all__ = ["STAGES", "cpu_description", "run_latency", "worker"]

STAGES = ("backbone", "pixel_decoder", "decoder", "postprocess", "other")


def cpu_description() -> dict[str, Any]:
    """CPU model (``lscpu``) and the vector extensions that matter for these kernels."""
    model, flags = platform.processor() or "unknown", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"model": model, "flags": [f for f in wanted if f in flags.split()], "cores": os.cpu_count()}


class StageClock:
    """Wall-clock stage times of one forward, from hooks at the stage boundaries."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def pre(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: self.mark(f"{name}>")

    def post(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: self.mark(f"{name}<")

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"{name}>")
            out = fn(*args, **kwargs)
            self.mark(f"{name}<")
            return out

        return timed

    def stages(self, start: float, end: float) -> dict[str, float]:
        m = self.marks
        out = {
            "backbone": m["backbone<"] - m["backbone>"],
            "pixel_decoder": m["pixel_decoder<"] - m["pixel_decoder>"],
            "decoder": m["decoder<"] - m["decoder>"],
            "postprocess": end - m["decoder<"],
        }
        out["other"] = (end - start) - sum(out.values())
        return out


def _instrument(model: Any, official: bool, clock: StageClock) -> None:
    model.backbone.register_forward_pre_hook(clock.pre("backbone"))
    model.backbone.register_forward_hook(clock.post("backbone"))
    if official:
        pd = model.sem_seg_head.pixel_decoder
        pd.forward_features = clock.wrap(
            pd.forward_features, "pixel_decoder"
        )  # called by name, not as a module
        predictor = model.sem_seg_head.predictor
    else:
        model.pixel_decoder.register_forward_pre_hook(clock.pre("pixel_decoder"))
        model.pixel_decoder.register_forward_hook(clock.post("pixel_decoder"))
        predictor = model.predictor
    predictor.register_forward_pre_hook(clock.pre("decoder"))
    predictor.register_forward_hook(clock.post("decoder"))


def worker(
    allocator: str,
    threads: int,
    rounds: int,
    build: Callable[[], tuple[Any, MaskDINO, Any]],
    out_path: Path,
) -> int:
    """One process: apply the allocator setting, build both models (``build() -> (official, ours, inputs)``), time
    alternating rounds, write the results as JSON to ``out_path``."""
    applied = False
    if allocator == "retain":
        from maskdino.cpu_inference.allocator import retain_freed_memory

        applied = retain_freed_memory()
        if not applied:
            raise SystemExit("retain_freed_memory() does not apply here (not glibc)")
    torch.set_num_threads(threads)
    off, ours, inputs = build()
    image = inputs.images[0]
    out_size = inputs.output_sizes[0]
    clocks = {"official": StageClock(), "ours": StageClock()}
    _instrument(off, True, clocks["official"])
    _instrument(ours, False, clocks["ours"])
    image_u8 = image.round().clamp(0, 255).to(torch.uint8)
    runs: dict[str, Callable[[], Any]] = {
        "official": lambda: off([{"image": image_u8, "height": out_size[0], "width": out_size[1]}]),
        "ours": lambda: ours.predict([image], original_sizes=[out_size]),
    }
    results: list[dict[str, Any]] = []
    print(
        f"[{allocator}] {threads} threads, input {tuple(image.shape)} -> output {out_size}; warm-up",
        flush=True,
    )
    with torch.no_grad():
        for r in range(-1, rounds):
            row: dict[str, Any] = {"round": r, "load": os.getloadavg()[0]}
            for side in ("official", "ours"):
                t0 = time.perf_counter()
                runs[side]()
                t1 = time.perf_counter()
                row[side] = t1 - t0
                row[f"{side}_stages"] = clocks[side].stages(t0, t1)
            if r >= 0:
                results.append(row)
                print(
                    f"[{allocator}] round {r + 1}/{rounds}: official {row['official']:.2f} s, ours {row['ours']:.2f} s, "
                    f"ratio {row['official'] / row['ours']:.2f}x (load {row['load']:.2f})",
                    flush=True,
                )
    summary = summarize(results)
    data = {
        "allocator": allocator,
        "applied": applied,
        "threads": threads,
        "input": list(image.shape),
        "output_size": list(out_size),
        "rounds": results,
        **summary,
    }
    out_path.write_text(json.dumps(data, indent=1))
    return 0


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per side and stage, the median of the per-round ratios."""
    med = {side: statistics.median(r[side] for r in results) for side in ("official", "ours")}
    stages = {
        side: {s: statistics.median(r[f"{side}_stages"][s] for r in results) for s in STAGES}
        for side in ("official", "ours")
    }
    ratio = statistics.median(r["official"] / r["ours"] for r in results)
    return {"median": med, "median_ratio": ratio, "stage_median": stages}


def print_summary(data: dict[str, Any]) -> None:
    label = {"glibc": "glibc defaults", "retain": "retain_freed_memory()"}[data["allocator"]]
    med, st = data["median"], data["stage_median"]
    print(f"\n{label}, {data['threads']} threads, input {data['input']}, {len(data['rounds'])} rounds:")
    print(
        f"  median official {med['official']:.2f} s, ours {med['ours']:.2f} s; median ratio {data['median_ratio']:.2f}x"
    )
    print(f"  {'stage':<14}{'official s':>11}{'share':>7}{'ours s':>9}{'share':>7}{'ratio':>7}")
    for s in STAGES:
        o, u = st["official"][s], st["ours"][s]
        print(
            f"  {s:<14}{o:>11.2f}{100 * o / med['official']:>6.0f}%{u:>9.2f}{100 * u / med['ours']:>6.0f}%"
            f"{(o / u if u > 0 else float('nan')):>6.2f}x"
        )


def run_latency(argv: list[str], json_path: Path | None, tmp: Path) -> int:
    """Run one worker process per allocator setting (the same command line plus ``--latency-worker``), print and
    return the results."""
    cpu = cpu_description()
    print(
        f"CPU: {cpu['model']} ({cpu['cores']} logical cores; {', '.join(cpu['flags'])}); torch {torch.__version__}"
    )
    print(f"load average before: {os.getloadavg()}")
    collected = []
    for allocator in ("glibc", "retain"):
        out = tmp / f"latency_{allocator}.json"
        cmd = [
            sys.executable,
            "-m",
            "tools.compare_official",
            *argv,
            "--latency-worker",
            allocator,
            "--latency-out",
            str(out),
        ]
        proc = subprocess.run(cmd, env=dict(os.environ))
        if proc.returncode != 0:
            print(f"latency worker ({allocator}) failed with status {proc.returncode}")
            return 1
        collected.append(json.loads(out.read_text()))
    for data in collected:
        print_summary(data)
    if json_path is not None:
        json_path.write_text(
            json.dumps({"cpu": cpu, "torch": torch.__version__, "latency": collected}, indent=1)
        )
        print(f"\nwrote {json_path}")
    return 0
