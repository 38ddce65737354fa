"""Peak memory (RSS) of ``maskdino predict`` on one photo, by photo size, against keeping every query's mask.

Each measurement runs in a fresh process (peak RSS is per process): the R50 COCO instance preset with random weights
(the `predict` pipeline: read, resize to 800 / max 1333, network, instance post-processing at the photo's resolution
with ``--score-threshold``), on a synthetic photo of each size. Reference in the same run: the same pipeline with
the threshold applied after all ``top_k`` masks were made (what ``predict`` did before masks were thresholded first),
so the ratio is the memory the thresholding saves.

    python benchmarks/bench_predict_memory.py [--sizes 1200x800 3000x2000 6000x4000] [--threshold 0.5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def _child(width: int, height: int, threshold: float, late: bool, preset: str) -> None:
    import resource

    import torch

    from maskdino.config import get_experiment
    from maskdino.cpu_inference.allocator import retain_freed_memory
    from maskdino.inference.predictor import ImagePredictor
    from maskdino.modeling import build_model

    retain_freed_memory()  # as `maskdino predict`
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = get_experiment(preset)
    model = build_model(cfg.model).eval()
    predictor = ImagePredictor.from_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    # a smooth random photo (cheap to make at 24 MP): low-resolution noise upsampled
    small = torch.rand(1, 3, max(1, height // 64), max(1, width // 64), generator=g)
    image = (torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear")[0] * 255).to(
        torch.uint8
    )
    del small
    t0 = time.perf_counter()
    if late:
        pred = predictor(image, tasks=["instance"], score_threshold=None)
        inst = pred.instances
        keep = inst.scores >= threshold
        kept = int(keep.sum())
        inst = inst.select(keep)
    else:
        inst = predictor(image, tasks=["instance"], score_threshold=threshold).instances
        kept = len(inst)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_gb": peak_kib / 2**20, "kept": kept, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1216x800", "3000x2000", "6000x4000"], help="WIDTHxHEIGHT")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--preset", default="coco-instance-r50-3s-d1-2048")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        w, h, late, preset = args.child
        _child(int(w), int(h), args.threshold, late == "1", preset)
        return
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    rows = []
    print(f"{args.preset}, random weights, score threshold {args.threshold}, 2 threads; CPU: {cpu}")
    print("| photo | peak RSS, threshold first | kept | peak RSS, all masks then threshold | ratio |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        res = {}
        for late in ("0", "1"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(w), str(h), late, args.preset, "--threshold",
                 str(args.threshold)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            res[late] = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = res["1"]["peak_rss_gb"] / res["0"]["peak_rss_gb"]
        print(f"| {w}x{h} | {res['0']['peak_rss_gb']:.2f} GB | {res['0']['kept']} | {res['1']['peak_rss_gb']:.2f} GB "
              f"| {ratio:.2f}x |")  # fmt: skip
        rows.append({"width": w, "height": h, "threshold_first": res["0"], "all_masks_first": res["1"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"cpu": cpu, "preset": args.preset, "threshold": args.threshold, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
