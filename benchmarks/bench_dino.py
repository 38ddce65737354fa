"""Inference latency of the detr-core DINO example (DINO-4scale R50) against a reference in the same run.

Reference: the official DINO (IDEA-Research/DINO, imported from ``--dino-repo`` by tools/compare_dino, its only
CPU path: the pure-PyTorch deformable attention), with the same random weights converted through the example's key
map; without ``--dino-repo``, our model with detr-core's pure-PyTorch reference op swapped in for the compiled
``deform_attn`` kernels. Both run eval / no_grad / float32 on one image (batch 1) in alternating rounds (reference,
ours, reference, ...) after ``--warmup`` rounds; medians and the ratio are printed. Per-stage times come from
forward hooks (backbone, encoder, decoder; "other" = input projections, query selection, heads, padding).
Nothing touches the allocator (glibc defaults unless the environment says otherwise, recorded in the output).

Usage::

    python benchmarks/bench_dino.py --dino-repo ~/src/DINO --threads 2 --repeat 3 --json dino.json
    python benchmarks/bench_dino.py --threads 2            # reference op instead of the official code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.compare_dino.official import build_official, normalize_image, randomize_, run_official  # noqa: E402
from tools.compare_dino.ours import config_from_official_args, import_example  # noqa: E402

STAGES = ("backbone", "encoder", "decoder")


def cpu_info() -> dict[str, str]:
    model, flags = platform.processor(), ""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            flags = " ".join(
                f
                for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
                if f in have
            )
            break
    return {"model": model, "flags": flags}


@contextlib.contextmanager
def reference_op() -> Iterator[None]:
    """Every ``MSDeformAttn`` of detr-core runs the pure-PyTorch op."""
    import deform_attn
    import deform_attn.modules

    original = deform_attn.modules.ms_deform_attn
    deform_attn.modules.ms_deform_attn = deform_attn.ms_deform_attn_reference
    try:
        yield
    finally:
        deform_attn.modules.ms_deform_attn = original


def timed_ours(model, images) -> dict[str, float]:
    """One forward of our model with per-stage wall times."""
    t: dict[str, float] = {}
    hooks = []
    for name in STAGES:
        module = getattr(model, name)
        hooks.append(
            module.register_forward_pre_hook(lambda m, a, n=name: t.__setitem__(n + "0", time.perf_counter()))
        )
        hooks.append(
            module.register_forward_hook(
                lambda m, a, o, n=name: t.__setitem__(n, time.perf_counter() - t[n + "0"])
            )
        )
    try:
        t0 = time.perf_counter()
        model(images)
        total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    out = {s: t[s] for s in STAGES}
    out["total"] = total
    out["other"] = total - sum(out[s] for s in STAGES)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dino-repo", type=Path, default=None, help="IDEA-Research/DINO checkout (the reference)")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    p.add_argument(
        "--image",
        type=Path,
        default=ROOT.parent / "shared/data/coco-panoptic-sample/input_images/000000142238.jpg",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    from tools.compare_dino.__main__ import load_image

    x = normalize_image(load_image(args.image if args.image.is_file() else None, tuple(args.size), 0))
    dino = import_example()
    from detr_core.checkpoint import match_aliases

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        if args.dino_repo is not None:
            off = build_official(args.dino_repo, Path(tmp))
            randomize_(off.model, 1)
            ours = dino.DINO(config_from_official_args(off.args)).eval()
            sd = match_aliases(
                dino.OFFICIAL_KEY_MAP.convert(off.model.state_dict()), ours.state_dict().keys(), dino.ALIASES
            )
            ours.load_state_dict(sd)
            reference_name = "official DINO (pure-PyTorch MSDA)"

            def reference() -> dict[str, float]:
                return run_official(off, [x]).seconds
        else:
            torch.manual_seed(0)
            ours = dino.DINO(dino.DINOConfig()).eval()
            reference_name = "ours with the pure-PyTorch reference op"

            def reference() -> dict[str, float]:
                with reference_op():
                    return timed_ours(ours, [x])

        runs: dict[str, list[dict[str, float]]] = {"reference": [], "ours": []}
        for r in range(args.warmup + args.repeat):
            for name, fn in (("reference", reference), ("ours", lambda: timed_ours(ours, [x]))):
                res = fn()
                if r >= args.warmup:
                    runs[name].append(res)
    med = {
        k: {s: statistics.median(run[s] for run in v) for s in (*STAGES, "other", "total")}
        for k, v in runs.items()
    }
    result = {
        "benchmark": "bench_dino",
        "model": "DINO-4scale R50 (random weights), eval, no_grad, float32, batch 1",
        "input": f"{args.image.name if args.image.is_file() else 'synthetic'} resized to {args.size[0]}x{args.size[1]}",
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": cpu_info(),
        "allocator": {k: os.environ.get(k, "unset") for k in ("GLIBC_TUNABLES", "LD_PRELOAD")},
        "load_avg_1min_at_start": load_at_start,
        "reference": reference_name,
        "median_s": med,
        "runs_total_s": {k: [round(run["total"], 3) for run in v] for k, v in runs.items()},
        "ratio_reference_over_ours": med["reference"]["total"] / med["ours"]["total"],
    }
    for k in ("reference", "ours"):
        m = med[k]
        stages = ", ".join(f"{s} {m[s]:.3f}" for s in (*STAGES, "other"))
        print(
            f"{k:9s} ({reference_name if k == 'reference' else 'detr-core DINO'}): total {m['total']:.3f} s ({stages})"
        )
    print(
        f"ratio reference / ours: {result['ratio_reference_over_ours']:.2f}x  ({args.threads} threads, CPU {result['cpu']})"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
