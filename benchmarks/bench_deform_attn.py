"""Benchmark the compiled ``deform_attn`` op against the pure-PyTorch reference, in the same run.

Sizes (Mask DINO R50, 4 levels at 1/8..1/64 of an 800x1200 image, 8 heads x 32 channels, 4 points):
* encoder: every token is a query (Q = S = 19947),
* decoder: 900 queries on the same value.

CPU: one row per (kernel copy the CPU supports, precision, pass), each with its ratio to the grid_sample
reference in float32 measured in the same run. Precisions: fp32, bf16, fp16 (value, locations and weights
all in that dtype) and bf16/fp32, fp16/fp32 (16-bit value, float32 locations and weights: the form autocast
uses). All candidates alternate in rounds (``--repeat`` rounds after one warm-up round) and each row is the
median of its rounds; fwd+bwd is the forward plus the backward of all three differentiable inputs.
``--onnx`` adds the op alone exported with both ONNX translations (``deform_attn.onnx``) and run by
onnxruntime and OpenVINO (float32, same input, same thread count) against the compiled op.

Peak memory (``--memory``) on CPU is the growth of the process's peak resident set (``VmHWM`` in
``/proc/self/status``) caused by one call, measured in a fresh subprocess per (implementation, pass) so
that the high-water mark of one does not hide the other. On CUDA it is ``torch.cuda.max_memory_allocated``
growth.

Usage::

    python benchmarks/bench_deform_attn.py --threads 2 --json out.json   # CPU table (+ CUDA if present)
    python benchmarks/bench_deform_attn.py --threads 2 --onnx            # + onnxruntime / OpenVINO
    python benchmarks/bench_deform_attn.py --check-cuda  # GPU machine: correctness of every CUDA dtype
    python benchmarks/bench_deform_attn.py --channels 8 16 32 64  # time vs D (gather/cache-bound check)
    python benchmarks/bench_deform_attn.py --locality              # time vs sampling pattern (same FMAs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import deform_attn
from deform_attn import ms_deform_attn, ms_deform_attn_reference

LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 900
# label -> (value dtype, locations / weights dtype)
PRECISIONS = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16/fp32": (torch.bfloat16, torch.float32),
    "fp16/fp32": (torch.float16, torch.float32),
}


def make_inputs(
    queries: int | None,
    channels: int = CHANNELS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    seed: int = 0,
    loc_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Inputs with realistic locality: encoder queries sit at their own token, decoder queries at random
    points; each sample is a few pixels away (as the trained offsets are). ``queries=None``: encoder.
    ``loc_dtype``: dtype of the locations and weights (default: ``dtype``)."""
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
    lt = loc_dtype or dtype
    return (
        value.to(device=device, dtype=dtype),
        shapes.to(device),
        starts.to(device),
        loc.to(device=device, dtype=lt),
        attn.to(device=device, dtype=lt),
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_rounds(
    cands: dict[str, tuple[Callable[[], None], Callable[[], object]]], repeat: int
) -> dict[str, float]:
    """Median seconds of each candidate, all alternating in ``repeat`` rounds after a warm-up round.
    ``cands``: name -> (setup run before each timed call, e.g. selecting the kernel copy; the call)."""
    times: dict[str, list[float]] = {name: [] for name in cands}
    for r in range(repeat + 1):
        for name, (setup, fn) in cands.items():
            setup()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if r > 0:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


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


def cpu_description() -> dict[str, object]:
    """CPU model, its flags (from /proc/cpuinfo) and the op's view of them."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key.strip() == "flags" and not flags:
                    flags = val.split()
    except OSError:
        pass
    info: dict[str, object] = {"model": model, "flags": flags, "logical_cpus": os.cpu_count()}
    if deform_attn.extension_available():
        info["op_flags"] = deform_attn.ops._C.cpu_flags()
        info["op_isas"] = deform_attn.cpu_isas_supported()
    return info


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


def bench_cpu(
    repeat: int, memory: bool, sizes: list[str], isas: list[str], precisions: list[str]
) -> list[dict]:
    """The CPU table: every (size, kernel copy, precision, pass) against the fp32 reference of the same run."""
    threads = torch.get_num_threads()
    print(
        f"\nCPU, {threads} threads; median of {repeat} alternating rounds; speed-up = reference fp32 time / row time"
    )
    print(f"{'size':<8} {'pass':<8} {'impl':<11} {'precision':<10} {'median':>10} {'speed-up':>9}")
    rows = []
    before = deform_attn.cpu_isa() if deform_attn.extension_available() else None
    for size in sizes:
        queries = None if size == "encoder" else DECODER_QUERIES
        ref_inputs = make_inputs(queries)
        op_inputs = {
            p: make_inputs(queries, dtype=PRECISIONS[p][0], loc_dtype=PRECISIONS[p][1]) for p in precisions
        }
        for backward in (False, True):
            label = "fwd+bwd" if backward else "fwd"
            cands: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
                "reference|fp32": (lambda: None, run_pass("reference", ref_inputs, backward))
            }
            for isa in isas:
                for p in precisions:
                    cands[f"{isa}|{p}"] = (
                        (lambda isa=isa: deform_attn.set_cpu_isa(isa)),
                        run_pass("op", op_inputs[p], backward),
                    )
            med = time_rounds(cands, repeat)
            ref = med["reference|fp32"]
            for name, t in med.items():
                impl, prec = name.split("|")
                row = dict(
                    size=size, pass_=label, impl=impl, precision=prec, median_ms=t * 1e3, speedup=ref / t
                )
                if memory and impl == "reference":
                    row["peak_mib"] = peak_rss_mib("reference", queries, CHANNELS, backward)
                elif memory and impl == isas[-1] and prec == "fp32":
                    row["peak_mib"] = peak_rss_mib("op", queries, CHANNELS, backward)
                rows.append(row)
                mem = f" {row['peak_mib']:7.0f} MiB peak" if "peak_mib" in row else ""
                print(f"{size:<8} {label:<8} {impl:<11} {prec:<10} {t * 1e3:8.1f}ms {ref / t:8.1f}x{mem}")
    if before is not None:
        deform_attn.set_cpu_isa(before)
    return [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows]


class _OpAlone(torch.nn.Module):
    def forward(self, value, shapes, starts, loc, attn):
        return ms_deform_attn(value, shapes, starts, loc, attn)


def bench_onnx(repeat: int) -> list[dict]:
    """The op alone (encoder size, float32, forward) exported with each ONNX translation and run by
    onnxruntime and OpenVINO on the same input and thread count, against the compiled op."""
    import deform_attn.onnx

    threads = torch.get_num_threads()
    inputs = make_inputs(None)
    arrays = [t.numpy() for t in inputs]
    expected = ms_deform_attn(*inputs).numpy()
    cands: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
        "torch op (compiled)": (lambda: None, run_pass("op", inputs, False))
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in deform_attn.onnx.METHODS:
            path = os.path.join(tmp, f"{method}.onnx")
            t0 = time.perf_counter()
            torch.onnx.export(
                _OpAlone(),
                inputs,
                dynamo=True,
                custom_translation_table=deform_attn.onnx.translation_table(method),
            ).save(path)
            print(f"exported the op with the {method} translation in {time.perf_counter() - t0:.1f} s")
            try:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                feeds = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
                cands[f"onnxruntime {method}"] = (
                    lambda: None,
                    lambda sess=sess, feeds=feeds: sess.run(None, feeds),
                )
            except ImportError:
                print("onnxruntime not installed")
            try:
                import openvino as ov

                core = ov.Core()
                cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
                compiled = core.compile_model(core.read_model(path), "CPU", cfg)
                request = compiled.create_infer_request()
                cands[f"openvino {method}"] = (lambda: None, lambda r=request: r.infer(arrays))
            except ImportError:
                print("openvino not installed")
        # the same answer first (max abs difference vs the compiled op)
        import numpy as np

        diffs = {}
        for name, (_, fn) in cands.items():
            if name.startswith("onnxruntime"):
                diffs[name] = float(np.abs(fn()[0] - expected).max())
            elif name.startswith("openvino"):
                res = fn()
                diffs[name] = float(np.abs(next(iter(res.values())) - expected).max())
        med = time_rounds(cands, repeat)
    base = med["torch op (compiled)"]
    print(f"\nONNX: the op alone, encoder size, fp32 forward, {threads} threads (median of {repeat} rounds)")
    print(f"{'runtime / translation':<26} {'median':>10} {'vs compiled op':>15} {'max |diff|':>11}")
    rows = []
    for name, t in med.items():
        diff = diffs.get(name)
        print(f"{name:<26} {t * 1e3:8.1f}ms {t / base:13.2f}x {'' if diff is None else f'{diff:11.1e}'}")
        rows.append(dict(runtime=name, median_ms=t * 1e3, time_vs_compiled_op=t / base, max_abs_diff=diff))
    return rows


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


def bench_cuda(repeat: int) -> list[dict]:
    print(f"\nCUDA {torch.cuda.get_device_name()} (median of {repeat}; peak = max_memory_allocated growth)")
    print(
        f"{'size':<8} {'precision':<10} {'pass':<8} {'reference':>11} {'op':>10} {'speed-up':>9} {'ref peak':>9} {'op peak':>8}"
    )
    rows = []
    for name, queries in (("encoder", None), ("decoder", DECODER_QUERIES)):
        ref_inputs = make_inputs(queries, device="cuda")
        for prec in ("fp32", "bf16", "fp16", "bf16/fp32", "fp16/fp32", "fp64"):
            vt, lt = PRECISIONS.get(prec, (torch.float64, torch.float64))
            inputs = make_inputs(queries, device="cuda", dtype=vt, loc_dtype=lt)
            for backward in (False, True):
                row = {}
                for impl, inp in (("reference", ref_inputs), ("op", inputs)):
                    fn = run_pass(impl, inp, backward)
                    row[impl] = time_fn(fn, "cuda", repeat)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    row[impl + "_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                label = "fwd+bwd" if backward else "fwd"
                print(
                    f"{name:<8} {prec:<10} {label:<8} {row['reference'] * 1e3:9.2f}ms "
                    f"{row['op'] * 1e3:8.2f}ms {row['reference'] / row['op']:8.1f}x "
                    f"{row['reference_mb']:7.0f}MB {row['op_mb']:6.0f}MB"
                )
                rows.append(dict(size=name, precision=prec, pass_=label, **row))
    return rows


def check_cuda() -> int:
    """Compare every CUDA dtype form with the float64 reference (forward and the three gradients); returns
    the number of failures. Meant for a GPU machine: `python benchmarks/bench_deform_attn.py --check-cuda`."""
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if not deform_attn.kernel_available("cuda", torch.float32):
        print("the CUDA kernel is not built:", deform_attn.build_info())
        return 1
    # relative to the largest magnitude, against the reference on the unrounded inputs: the input rounding
    # of the 16-bit forms dominates (2^-9 / 2^-12 relative per input, summed over the bilinear terms).
    tol = {"fp64": 1e-10, "fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2, "fp16/fp32": 2e-2, "bf16/fp32": 8e-2}
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
        for prec, bound in tol.items():
            vt, lt = PRECISIONS.get(prec, (torch.float64, torch.float64))
            xs = [t.detach().to(dt).requires_grad_() for t, dt in zip(leaves, (vt, lt, lt))]
            got_out = ms_deform_attn(xs[0], ref_inputs[1], ref_inputs[2], xs[1], xs[2])
            got = [got_out.detach(), *torch.autograd.grad(got_out, xs, grad_out.to(vt))]
            for what, g, e, dt in zip(
                ("out", "grad_value", "grad_loc", "grad_attn"), got, expected, (vt, vt, lt, lt)
            ):
                err = ((g.double() - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
                ok = err <= bound and g.dtype == dt
                failures += not ok
                print(
                    f"{name:<12} {prec:<10} {what:<10} {str(g.dtype):<15} rel.err {err:.2e} {'ok' if ok else 'FAIL'}"
                )
        # non-finite inputs give the reference's NaN pattern
        bad = [t.detach().clone() for t in leaves]
        bad[1][0, 0, 0, 0, 0, 0] = float("nan")
        bad[2][0, 1, 0, 0, 0] = float("inf")
        e = ms_deform_attn_reference(bad[0], ref_inputs[1], ref_inputs[2], bad[1], bad[2])
        g = ms_deform_attn(bad[0], ref_inputs[1], ref_inputs[2], bad[1], bad[2])
        ok = torch.equal(g.isnan(), e.isnan()) and torch.equal(g.isinf(), e.isinf())
        failures += not ok
        print(f"{name:<12} non-finite NaN/inf pattern {'ok' if ok else 'FAIL'}")
    print("all CUDA checks passed" if failures == 0 else f"{failures} CUDA checks FAILED")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sizes", nargs="*", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument("--isas", nargs="*", help="CPU kernel copies (default: every one the CPU supports)")
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--memory", action="store_true", help="also peak memory (fresh subprocesses)")
    parser.add_argument("--onnx", action="store_true", help="also onnxruntime / OpenVINO, both translations")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
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
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; op-relevant flags: {cpu.get('op_flags', '?')}")
    if args.check_cuda:
        sys.exit(1 if check_cuda() else 0)
    results: dict[str, object] = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "build_info": deform_attn.build_info(),
        "repeat": args.repeat,
        "inputs": dict(levels=LEVELS, heads=HEADS, channels=CHANNELS, points=POINTS, batch=1),
    }
    isas = args.isas or deform_attn.cpu_isas_supported()
    results["cpu_rows"] = bench_cpu(args.repeat, args.memory, args.sizes, isas, args.precisions)
    if args.onnx:
        results["onnx_rows"] = bench_onnx(args.repeat)
    if args.channels:
        bench_channels(args.channels, args.repeat)
    if args.locality:
        bench_locality(args.repeat)
    if torch.cuda.is_available() and deform_attn.kernel_available("cuda", torch.float32):
        results["cuda_rows"] = bench_cuda(max(args.repeat, 20))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
