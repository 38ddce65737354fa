"""Masked GroupNorm (statistics over the valid pixels only, used by ``padding_mode="aware"``) against the
elementwise masked formulation and plain ``F.group_norm``, same inputs, same threads, one process.

``detr_core.neck.masked_group_norm`` reduces with batched matmuls of the valid mask against ``x`` in its own
memory layout; the reference below is the direct formula (multiply by the mask, sum, divide by the count),
which is what the function computed before. Plain GroupNorm (no mask) is the lower bound.

Usage::

    python benchmarks/bench_masked_group_norm.py --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import cpu_info

from detr_core.neck import masked_group_norm

# (input shape, valid height and width): the 1/8, 1/16 and 1/64 maps of an 800x1216 input padded from 800x1199
CASES = (((1, 256, 200, 304), (200, 300)), ((1, 256, 100, 152), (100, 150)), ((1, 256, 25, 38), (25, 38)))


def masked_reference(x: torch.Tensor, gn: nn.GroupNorm, padding: torch.Tensor) -> torch.Tensor:
    """Direct masked statistics: x [B, C, H, W], padding [B, H, W] (True = padded) -> [B, C, H, W]."""
    b, c, h, w = x.shape
    g = gn.num_groups
    xg = x.reshape(b, g, c // g, h, w)
    valid = (~padding).to(x.dtype)[:, None, None]
    count = valid.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1.0) * (c // g)
    mean = (xg * valid).sum(dim=(2, 3, 4), keepdim=True) / count
    var = (((xg - mean) ** 2) * valid).sum(dim=(2, 3, 4), keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + gn.eps)).view(b, c, h, w)
    return y * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per function (after one warm-up)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(
        f"CPU: {info['model']}; flags {' '.join(map(str, info['flags']))}; {args.threads} threads; median of {args.repeat}"
    )
    gn = nn.GroupNorm(32, 256)
    rows = []
    print("| input | reference ms | masked_group_norm ms | ratio | plain group_norm ms | max abs diff |")
    print("|---|---|---|---|---|---|")
    for shape, (vh, vw) in CASES:
        x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
        padding = torch.ones(shape[0], *shape[2:], dtype=torch.bool)
        padding[:, :vh, :vw] = False
        funcs = {
            "reference": lambda x=x, p=padding: masked_reference(x, gn, p),
            "masked_group_norm": lambda x=x, p=padding: masked_group_norm(x, gn, p),
            "plain_group_norm": lambda x=x: gn(x),
        }
        with torch.inference_mode():
            diff = float((funcs["reference"]() - funcs["masked_group_norm"]()).abs().max())
            ms = {}
            for name, f in funcs.items():
                f()
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t0)
                ms[name] = statistics.median(times) * 1e3
        ratio = ms["reference"] / ms["masked_group_norm"]
        print(f"| {list(shape)} | {ms['reference']:.1f} | {ms['masked_group_norm']:.1f} | {ratio:.2f}x | "
              f"{ms['plain_group_norm']:.1f} | {diff:.1e} |")  # fmt: skip
        rows.append(
            {"shape": list(shape), "valid_hw": [vh, vw], "ms": ms, "ratio": ratio, "max_abs_diff": diff}
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": cpu_info(), "threads": args.threads, "cases": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
