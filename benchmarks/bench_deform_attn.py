"""Benchmark the compiled ``deform_attn`` op against the pure-PyTorch reference, in the same run.

Sizes (Mask DINO R50, 4 levels at 1/8..1/64 of an 800x1200 image, 8 heads x 32 channels, 4 points):
* encoder: every token is a query (Q = S = 19947),
* decoder: 900 queries on the same value.

Timings are the best of ``--repeat`` runs after one warm-up, forward and forward+backward (the backward
of all three differentiable inputs). Peak memory on CPU is the growth of the process's peak resident set
(``VmHWM`` in ``/proc/self/status``) caused by one call, measured in a fresh subprocess per
(implementation, pass) so that the high-water mark of one does not hide the other; it includes the output
and gradients. On CUDA it is ``torch.cuda.max_memory_allocated`` growth.

Usage::

    python benchmarks/bench_deform_attn.py               # CPU (+ CUDA, all dtypes, when available)
    python benchmarks/bench_deform_attn.py --check-cuda  # GPU machine: correctness of every CUDA dtype
    python benchmarks/bench_deform_attn.py --channels 8 16 32 64  # time vs D (gather/cache-bound check)
    python benchmarks/bench_deform_attn.py --locality              # time vs sampling pattern (same FMAs)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import deform_attn
from deform_attn import ms_deform_attn, ms_deform_attn_reference

LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 900


def make_inputs(
    queries: int | None,
    channels: int = CHANNELS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Inputs with realistic locality: encoder queries sit at their own token, decoder queries at random
    points; each sample is a few pixels away (as the trained offsets are). ``queries=None``: encoder."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    num_levels = len(LEVELS)
    if queries is None:  # encoder: token centres of all levels
        refs = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(refs).expand(batch, s, 2)
    else:
        ref = torch.rand(batch, queries, 2, generator=g)
    q = ref.shape[1]
    wh = shapes.flip(-1).to(torch.float64)  # (L, 2) as (W, H)
    offsets = torch.randn(batch, q, HEADS, num_levels, POINTS, 2, generator=g, dtype=torch.float64) * 2.0
    loc = ref[:, :, None, None, None, :].double() + offsets / wh[None, None, None, :, None, :]
    attn = torch.rand(batch, q, HEADS, num_levels * POINTS, generator=g).softmax(-1)
    attn = attn.view(batch, q, HEADS, num_levels, POINTS)
    value = torch.randn(batch, s, HEADS, channels, generator=g)
    cast = dict(device=device, dtype=dtype)
    return (
        value.to(**cast),
        shapes.to(device),
        starts.to(device),
        loc.to(**cast),
        attn.to(**cast),
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Best (minimum) seconds of ``fn`` over ``repeat`` runs after one warm-up call: on a shared machine
    other processes only ever add time, so the minimum is the least noisy estimate."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


IMPLS = {"op": ms_deform_attn, "reference": ms_deform_attn_reference}


def run_pass(impl: str, inputs: tuple[torch.Tensor, ...], backward: bool) -> Callable[[], object]:
    fn = IMPLS[impl]
    value, shapes, starts, loc, attn = inputs
    if not backward:

        def forward() -> object:
            with torch.no_grad():
                return fn(value, shapes, starts, loc, attn)

        return forward
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]

    def forward_backward() -> object:
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return forward_backward


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(spec: str) -> None:
    """Subprocess entry: print the peak-RSS growth (MiB) of one call described by ``spec`` (json).

    Uses /proc/self/status VmHWM of this fresh process (ru_maxrss would not do: Linux carries the parent's
    high-water mark across fork/exec), reset to the current RSS just before the call where the kernel
    allows it (clear_refs 5)."""
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    inputs = make_inputs(cfg["queries"], cfg["channels"])
    fn = run_pass(cfg["impl"], inputs, cfg["backward"])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = max(_status_kib("VmRSS"), 0)
    if _status_kib("VmHWM") > before + 1024:  # reset not allowed: report nothing rather than a wrong number
        print(json.dumps({"peak_mib": float("nan")}))
        return
    fn()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_rss_mib(impl: str, queries: int | None, channels: int, backward: bool) -> float:
    spec = json.dumps(
        dict(
            impl=impl, queries=queries, channels=channels, backward=backward, threads=torch.get_num_threads()
        )
    )
    res = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def bench_cpu(repeat: int, memory: bool) -> None:
    print(f"\nCPU, {torch.get_num_threads()} threads, float32 (best of {repeat}; peak = VmHWM growth)")
    header = f"{'size':<8} {'pass':<9} {'reference':>11} {'op':>10} {'speed-up':>9} {'ref peak':>10} {'op peak':>9}"
    print(header)
    for name, queries in (("encoder", None), ("decoder", DECODER_QUERIES)):
        inputs = make_inputs(queries)
        for backward in (False, True):
            times = {impl: time_fn(run_pass(impl, inputs, backward), "cpu", repeat) for impl in IMPLS}
            label = "fwd+bwd" if backward else "fwd"
            mem = ""
            if memory:
                ref_mb = peak_rss_mib("reference", queries, CHANNELS, backward)
                op_mb = peak_rss_mib("op", queries, CHANNELS, backward)
                mem = f" {ref_mb:8.0f}MB {op_mb:7.0f}MB"
            print(
                f"{name:<8} {label:<9} {times['reference'] * 1e3:9.1f}ms {times['op'] * 1e3:8.1f}ms "
                f"{times['reference'] / times['op']:8.1f}x{mem}"
            )


def bench_channels(channels: list[int], repeat: int) -> None:
    """Op time vs D at encoder size: flat time per channel => fixed per-sample cost (address/weight
    computation, cache misses of the corner rows); linear => channel arithmetic or bandwidth."""
    print("\nCPU op vs channels D (encoder size, float32)")
    print(f"{'D':>4} {'fwd':>9} {'fwd/D':>9} {'fwd+bwd':>9} {'GFMA/s fwd':>11}")
    for d in channels:
        inputs = make_inputs(None, channels=d)
        fwd = time_fn(run_pass("op", inputs, False), "cpu", repeat)
        both = time_fn(run_pass("op", inputs, True), "cpu", repeat)
        q = inputs[3].shape[1]
        fmas = q * HEADS * len(LEVELS) * POINTS * 4 * d
        print(
            f"{d:4d} {fwd * 1e3:7.1f}ms {fwd * 1e3 / d:7.2f}ms {both * 1e3:7.1f}ms {fmas / fwd / 1e9:10.2f}"
        )


def bench_locality(repeat: int) -> None:
    """Same arithmetic, different gather patterns (encoder size, float32, op only): if time tracks the
    locality of the sampled rows rather than the FMA count, the kernel is gather/cache bound."""
    value, shapes, starts, loc, attn = make_inputs(None)
    g = torch.Generator().manual_seed(1)
    patterns = {
        "all samples at one point (cache-resident)": torch.full_like(loc, 0.5),
        "realistic (near own token)": loc,
        "uniform random": torch.rand(loc.shape, generator=g),
        "all outside (no gathers)": torch.full_like(loc, 5.0),
    }
    q = loc.shape[1]
    fmas = q * HEADS * len(LEVELS) * POINTS * 4 * CHANNELS
    print(f"\nCPU op vs sampling pattern (encoder size, D={CHANNELS}, {fmas / 1e6:.0f}M FMAs in the forward)")
    print(f"{'pattern':<44} {'fwd':>9} {'fwd+bwd':>9} {'GFMA/s fwd':>11}")
    for name, pattern in patterns.items():
        inputs = (value, shapes, starts, pattern, attn)
        fwd = time_fn(run_pass("op", inputs, False), "cpu", repeat)
        both = time_fn(run_pass("op", inputs, True), "cpu", repeat)
        print(f"{name:<44} {fwd * 1e3:7.1f}ms {both * 1e3:7.1f}ms {fmas / fwd / 1e9:10.2f}")


def bench_cuda(repeat: int) -> None:
    print(f"\nCUDA {torch.cuda.get_device_name()} (best of {repeat}; peak = max_memory_allocated growth)")
    print(
        f"{'size':<8} {'dtype':<9} {'pass':<8} {'reference':>11} {'op':>10} {'speed-up':>9} {'ref peak':>9} {'op peak':>8}"
    )
    for name, queries in (("encoder", None), ("decoder", DECODER_QUERIES)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            inputs = make_inputs(queries, device="cuda", dtype=dtype)
            for backward in (False, True):
                row = {}
                for impl in IMPLS:
                    fn = run_pass(impl, inputs, backward)
                    row[impl] = time_fn(fn, "cuda", repeat)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    row[impl + "_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                label = "fwd+bwd" if backward else "fwd"
                print(
                    f"{name:<8} {str(dtype).split('.')[-1]:<9} {label:<8} {row['reference'] * 1e3:9.2f}ms "
                    f"{row['op'] * 1e3:8.2f}ms {row['reference'] / row['op']:8.1f}x "
                    f"{row['reference_mb']:7.0f}MB {row['op_mb']:6.0f}MB"
                )


def check_cuda() -> int:
    """Compare every CUDA dtype with the float64 reference (forward and the three gradients); returns the
    number of failures. Meant for a GPU machine: `python benchmarks/bench_deform_attn.py --check-cuda`."""
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if not deform_attn.kernel_available("cuda", torch.float32):
        print("the CUDA kernel is not built:", deform_attn.build_info())
        return 1
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
    failures = 0
    for name, queries, channels in (
        ("decoder", DECODER_QUERIES, 32),
        ("decoder-D48", 300, 48),
        ("encoder", None, 32),
    ):
        ref_inputs = make_inputs(queries, channels=channels, device="cuda", dtype=torch.float64)
        leaves = [ref_inputs[i].clone().requires_grad_() for i in (0, 3, 4)]
        out = ms_deform_attn_reference(leaves[0], ref_inputs[1], ref_inputs[2], leaves[1], leaves[2])
        grad_out = torch.randn_like(out)
        expected = [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]
        for dtype in tol:
            xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
            got_out = ms_deform_attn(xs[0], ref_inputs[1], ref_inputs[2], xs[1], xs[2])
            got = [got_out.detach(), *torch.autograd.grad(got_out, xs, grad_out.to(dtype))]
            for what, g, e in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, expected):
                err = ((g.double() - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
                ok = err <= tol[dtype]
                failures += not ok
                print(
                    f"{name:<12} {str(dtype).split('.')[-1]:<9} {what:<10} rel.err {err:.2e} {'ok' if ok else 'FAIL'}"
                )
    print("all CUDA checks passed" if failures == 0 else f"{failures} CUDA checks FAILED")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--check-cuda", action="store_true", help="correctness of every CUDA dtype, then exit"
    )
    parser.add_argument("--channels", type=int, nargs="*", help="also time the op for these D (CPU, encoder)")
    parser.add_argument(
        "--locality", action="store_true", help="also time the op for several sampling patterns"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(deform_attn.build_info())
    if args.check_cuda:
        sys.exit(1 if check_cuda() else 0)
    bench_cpu(args.repeat, not args.no_memory)
    if args.channels:
        bench_channels(args.channels, args.repeat)
    if args.locality:
        bench_locality(args.repeat)
    if torch.cuda.is_available() and deform_attn.kernel_available("cuda", torch.float32):
        bench_cuda(max(args.repeat, 20))


if __name__ == "__main__":
    main()
