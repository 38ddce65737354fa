"""Training-step benchmark: iterations/s and peak memory of full training steps (forward, losses, backward,
AdamW step with full-model clipping) through the same code as ``maskdino train``.

Configurations:
  - tiny preset, 128x128 images, batch 4, CPU (the demo's setting);
  - R50 COCO preset (300 queries, 12544 points), one 512x512 image, CPU;
  - R50 COCO preset, two 1024x1024 images, AMP (float16 + GradScaler), CUDA, when a GPU is present.
Reference: the same step with ``deform_attn.ms_deform_attn_reference`` (pure PyTorch) swapped in for the
dispatching ``ms_deform_attn`` (compiled kernel when built). Each measurement runs in a fresh subprocess so that
peak RSS (CPU) / peak CUDA memory belong to that configuration alone.

    /work/venv/bin/python benchmarks/bench_train.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [
    {"name": "tiny 128px b4 CPU", "preset": "tiny", "size": 128, "batch": 4, "device": "cpu", "warmup": 2, "iters": 10},
    {"name": "R50 512px b1 CPU", "preset": "coco-instance-r50-3s-d1-2048", "size": 512, "batch": 1, "device": "cpu",
     "warmup": 1, "iters": 3},
    {"name": "R50 1024px b2 AMP CUDA", "preset": "coco-instance-r50-3s-d1-2048", "size": 1024, "batch": 2,
     "device": "cuda", "warmup": 3, "iters": 10, "amp": True},
]  # fmt: skip


def _targets(batch: int, size: int, num_classes: int, gen):
    import torch

    out = []
    for _ in range(batch):
        n = 6
        xy = torch.rand(n, 2, generator=gen) * size * 0.6
        wh = torch.rand(n, 2, generator=gen) * size * 0.3 + size * 0.05
        boxes = torch.cat([xy, xy + wh], 1).floor()
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        out.append(
            {"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": boxes, "masks": masks}
        )
    return out


def child(spec: dict) -> dict:
    import torch

    import deform_attn
    import deform_attn.modules as modules
    from maskdino.config import get_experiment
    from maskdino.engine.optim import build_optimizer, clip_gradients
    from maskdino.modeling.model import build_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["reference"]:
        modules.ms_deform_attn = deform_attn.ms_deform_attn_reference
    exp = get_experiment(spec["preset"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_model(exp.model)
    if device.type != "cpu":
        model = model.to(device)
    model.train()
    opt = build_optimizer(model, exp.solver)
    amp = bool(spec.get("amp")) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, spec["size"], spec["size"], generator=gen).to(device) * 255
        for _ in range(spec["batch"])
    ]
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets(spec["batch"], spec["size"],
                                                                         exp.model.num_classes, gen)]  # fmt: skip

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip_gradients(model.parameters(), exp.solver.clip_value)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(spec["iters"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {"it_per_s": spec["iters"] / dt, "s_per_it": dt / spec["iters"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "kernel": deform_attn.build_info() if hasattr(deform_attn, "build_info") else None}  # fmt: skip
    if device.type == "cuda":
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def run(spec: dict, reference: bool) -> dict:
    payload = json.dumps({**spec, "reference": reference})
    out = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true", help="tiny preset only")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} CPU threads, CUDA: {torch.cuda.is_available()}")
    print(
        f"{'configuration':26s} {'op':10s} {'it/s':>8s} {'s/it':>8s} {'peak RSS MiB':>13s} {'peak CUDA MiB':>14s}"
    )
    for spec in CONFIGS[:1] if args.quick else CONFIGS:
        if spec["device"] == "cuda" and not torch.cuda.is_available():
            print(f"{spec['name']:26s} skipped (no CUDA device)")
            continue
        results = {}
        for reference in (False, True):
            r = run({**spec, "threads": args.threads}, reference)
            results[reference] = r
            cuda_mem = f"{r['peak_cuda_mib']:14.0f}" if "peak_cuda_mib" in r else f"{'-':>14s}"
            op = "reference" if reference else "default"
            print(
                f"{spec['name']:26s} {op:10s} {r['it_per_s']:8.3f} {r['s_per_it']:8.3f} {r['peak_rss_mib']:13.0f} {cuda_mem}"
            )
        ratio = results[False]["it_per_s"] / results[True]["it_per_s"]
        print(f"{spec['name']:26s} speed-up of the default op over the pure-PyTorch reference: {ratio:.2f}x")


if __name__ == "__main__":
    main()
