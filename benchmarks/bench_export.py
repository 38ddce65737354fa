"""Latency, peak memory and export time of the exported Mask DINO network against PyTorch, in one run.

Model: the R50 COCO instance preset ``coco-instance-r50-3s-d1-2048`` (random weights, seed 0), the raw network
``MaskDINO.inference_forward`` (backbone, pixel decoder, query selection, decoder, heads: the graph that
``maskdino export`` writes) on one normalised 800x1216 input, batch 1. Post-processing is the same Python code for
every backend (``maskdino.inference.predictor``), so it is left out here; ``bench_model.py`` times it.

Backends (``--backends``, comma-separated):

- ``torch-fp32``: eager PyTorch with the compiled deform_attn op; ``torch-bf16``: the same under bfloat16 autocast;
- ``onnxruntime-fp32``: the ONNX file (the op in standard operators, ``--op-form``) on onnxruntime's CPU provider;
- ``openvino-fp32`` / ``openvino-bf16``: the OpenVINO IR converted from that file, precision hint f32 / bf16
  (bf16 runs in bfloat16 only on CPUs with avx512_bf16 or AMX);
- ``openvino-fp32-custom`` / ``openvino-bf16-custom``: the same from an export with ``--op-form custom`` (one
  ``deform_attn::MSDeformAttn`` node per attention, run by the op's own kernels through ``deform_attn.openvino``;
  float32 in both).

Every backend runs once per round, rounds alternate, the first round is a warm-up; medians of ``--repeat``. Peak
memory: the peak RSS of a fresh process that loads that backend's model and runs it twice (``--peak-of``), so the
backends do not see each other's memory. Export time: ``export_onnx`` (torch.export + ONNX translation + checker)
and the OpenVINO conversion. The outputs of each backend are compared with torch-fp32 on the same input (max abs
difference of class logits, boxes and mask logits), and per query: how many queries differ by more than 1e-4 and the
largest difference over the others (a query whose anchor box is initialised from a bit-mask with a logit within
rounding of 0 can move as a whole; see ``query_agreement``).

``--op-share`` also profiles the onnxruntime run (its per-node profiler) and reports the time of the deformable
attention's sampling nodes (GridSample; the grid_sample form) inside the whole model, beside the compiled op's own time inside the PyTorch model.

Usage::

    python benchmarks/bench_export.py                       # all backends, 800x1216, repeat 3
    python benchmarks/bench_export.py --repeat 5 --op-form gather --json export.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import cpu_info

from maskdino.config import apply_overrides, get_experiment
from maskdino.cpu_inference.allocator import retain_freed_memory
from maskdino.inference.predictor import LoadedModel
from maskdino.modeling import build_model
from maskdino.modeling.precision import autocast, native_bf16

BACKENDS = (
    "torch-fp32",
    "torch-bf16",
    "onnxruntime-fp32",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-fp32-custom",
    "openvino-bf16-custom",
)
OUTPUTS = ("pred_logits", "pred_masks", "pred_boxes")
Runner = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def build(preset: str, padding_mode: str) -> LoadedModel:
    from maskdino.data.coco import DatasetMetadata

    cfg = apply_overrides(get_experiment(preset), [f"model.padding_mode={padding_mode}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    n = cfg.model.num_classes
    return LoadedModel(
        model, cfg, DatasetMetadata(names=[f"c{k}" for k in range(n)], dataset_ids=list(range(n)))
    )


def make_input(loaded: LoadedModel, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
    batch = loaded.model.preprocess([image])
    return batch.tensor.contiguous(), batch.image_sizes


def model_files(workdir: Path) -> dict[str, Path]:
    return {
        "onnxruntime-fp32": workdir / "model.onnx",
        "openvino-fp32": workdir / "model_fp32.xml",
        "openvino-bf16": workdir / "model_bf16.xml",
        "custom-onnx": workdir / "model_custom.onnx",
        "openvino-fp32-custom": workdir / "model_custom_fp32.xml",
        "openvino-bf16-custom": workdir / "model_custom_bf16.xml",
    }


def runner(
    name: str, loaded: LoadedModel, images: torch.Tensor, sizes: torch.Tensor, workdir: Path
) -> Runner:
    """A zero-argument callable that runs backend ``name`` on the input and returns its raw outputs."""
    if name.startswith("torch-"):
        precision = name.split("-", 1)[1]

        def run_torch():
            with torch.inference_mode(), autocast(precision, images.device):  # type: ignore[arg-type]
                return tuple(o.float() for o in loaded.model.inference_forward(images, sizes))

        return run_torch  # type: ignore[return-value]
    from maskdino.export.runtime import ExportedModel

    backend = name.split("-", 1)[0]
    exported = ExportedModel(model_files(workdir)[name], backend, threads=torch.get_num_threads())  # type: ignore[arg-type]
    return lambda: exported(images, sizes)


def query_agreement(
    out: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], tol: float = 1e-4
) -> dict:
    """How many queries differ from the reference by more than ``tol`` in any output, and the largest difference
    over the other queries. A discontinuity (a mask logit within float rounding of 0 flips the bit-mask from
    which that query's anchor box is initialised) moves single queries a long way while the rest agree to
    rounding; this separates the two."""
    diffs = [(o.float() - r).abs().flatten(2).amax(-1) for o, r in zip(out, reference)]
    per_query = torch.stack(diffs).amax(0)  # (B, Q)
    off = per_query > tol
    rest = per_query[~off]
    return {
        "queries_over_tol": int(off.sum()),
        "queries": int(per_query.numel()),
        "tol": tol,
        "max_abs_other_queries": float(rest.max()) if rest.numel() else 0.0,
    }


def export_all(
    loaded: LoadedModel, h: int, w: int, op_form: str, workdir: Path, names: list[str]
) -> dict[str, float]:
    from maskdino.export import export_onnx, openvino_from_onnx

    files = model_files(workdir)
    times: dict[str, float] = {}

    def convert(source: str, targets: tuple[str, ...]) -> None:
        for name in targets:
            if name in names:
                t0 = time.perf_counter()
                openvino_from_onnx(files[source], files[name], name.split("-")[1])  # type: ignore[arg-type]
                times[f"convert_{name}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    export_onnx(loaded, files["onnxruntime-fp32"], h, w, dynamic=False, op_form=op_form)  # type: ignore[arg-type]
    times["export_onnx_s"] = time.perf_counter() - t0
    convert("onnxruntime-fp32", ("openvino-fp32", "openvino-bf16"))
    times["onnx_mb"] = files["onnxruntime-fp32"].stat().st_size / 2**20
    custom = ("openvino-fp32-custom", "openvino-bf16-custom")
    if any(n in names for n in custom):
        t0 = time.perf_counter()
        export_onnx(loaded, files["custom-onnx"], h, w, dynamic=False, op_form="custom")
        times["export_onnx_custom_s"] = time.perf_counter() - t0  # includes building the extension once
        convert("custom-onnx", custom)
    return times


def peak_rss(args: argparse.Namespace, name: str) -> float:
    """Peak RSS (GiB) of a fresh process that loads backend ``name`` and runs it twice."""
    cmd = [sys.executable, __file__, "--peak-of", name, "--workdir", str(args.workdir), "--preset", args.preset,
           "--size", str(args.size[0]), str(args.size[1]), "--padding-mode", args.padding_mode]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def op_share(
    loaded: LoadedModel, images: torch.Tensor, sizes: torch.Tensor, workdir: Path
) -> dict[str, float]:
    """Time of the deformable-attention decomposition inside the onnxruntime run (its node profiler) and of the
    compiled op inside the PyTorch fp32 run (forward hooks on every MSDeformAttn's op call)."""
    import onnxruntime as ort

    import deform_attn.modules

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "ort_profile")
    session = ort.InferenceSession(
        str(model_files(workdir)["onnxruntime-fp32"]), options, providers=["CPUExecutionProvider"]
    )
    feeds = {"images": images.numpy(), "image_sizes": sizes.numpy()}
    feeds = {k: v for k, v in feeds.items() if k in [i.name for i in session.get_inputs()]}
    session.run(None, feeds)  # warm-up (also profiled; the last run is read below)
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"]
    nodes = [
        e
        for e in events
        if e.get("cat") == "Node" and e["ts"] >= last_start and e["name"].endswith("_kernel_time")
    ]
    total_us = sum(e["dur"] for e in nodes)
    # The exported graph keeps no module names on its nodes, so the op is counted by its sampling nodes: in the
    # grid_sample form every GridSample node is the op's (nothing else in the network samples). The op's other
    # nodes (projections, softmax, weighted sum) are not counted; the gather form has no such marker (0 here).
    sampling = {"GridSample"}
    op_us = sum(e["dur"] for e in nodes if e["args"].get("op_name") in sampling)
    op_kinds = sorted({e["args"].get("op_name", "?") for e in nodes if e["args"].get("op_name") in sampling})

    spent = [0.0]
    original = deform_attn.modules.ms_deform_attn

    def timed_op(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        spent[0] += time.perf_counter() - t0
        return out

    deform_attn.modules.ms_deform_attn = timed_op
    try:
        with torch.inference_mode():
            loaded.model.inference_forward(images, sizes)
            spent[0] = 0.0
            t0 = time.perf_counter()
            loaded.model.inference_forward(images, sizes)
            torch_total = time.perf_counter() - t0
    finally:
        deform_attn.modules.ms_deform_attn = original
    return {
        "onnxruntime_nodes_total_s": total_us / 1e6,
        "onnxruntime_op_s": op_us / 1e6,
        "onnxruntime_op_node_types": op_kinds,  # type: ignore[dict-item]
        "torch_total_s": torch_total,
        "torch_op_s": spent[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="coco-instance-r50-3s-d1-2048")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (after 1 warm-up round)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch / runtime threads (default: torch's)"
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}"
    )
    parser.add_argument("--op-form", default="grid_sample", choices=("grid_sample", "gather"))
    parser.add_argument("--padding-mode", default="official", choices=("official", "aware"))
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the exported files go (default: a temp dir)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--op-share", action="store_true", help="profile the op's share inside onnxruntime")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as maskdino predict does; the same for every backend in this process
    h, w = args.size

    if args.peak_of:  # child process: load one backend, run it twice, print the peak RSS in GiB
        loaded = build(args.preset, args.padding_mode)
        images, sizes = make_input(loaded, h, w)
        if not args.peak_of.startswith("torch-"):
            loaded.model.to("meta")  # only the exported file's weights count for the runtimes
        run = runner(args.peak_of, loaded, images, sizes, args.workdir)
        run()
        run()
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent
        hwm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))  # fmt: skip
        print(hwm_kib / 2**20)
        return

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; expected some of {list(BACKENDS)}")
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or Path(tmp)
        args.workdir.mkdir(parents=True, exist_ok=True)
        info = cpu_info()
        loaded = build(args.preset, args.padding_mode)
        images, sizes = make_input(loaded, h, w)
        print(
            f"preset {args.preset} (padding_mode={args.padding_mode}), input {tuple(images.shape)}, batch 1"
        )
        print(f"CPU: {info['model']}; flags {' '.join(info['flags'])}; native bf16: {native_bf16()}")  # type: ignore[arg-type]
        print(
            f"{torch.get_num_threads()} threads; op form {args.op_form}; median of {args.repeat} alternating rounds"
        )
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        report: dict[str, object] = {"cpu": info, "input": list(images.shape), "preset": args.preset,
                                     "padding_mode": args.padding_mode, "op_form": args.op_form}  # fmt: skip
        export_times: dict[str, float] = {}
        if any(not n.startswith("torch-") for n in names):
            export_times = export_all(loaded, h, w, args.op_form, args.workdir, names)
            print("export: " + ", ".join(f"{k} {v:.1f}" for k, v in export_times.items()))
        report["export"] = export_times

        runners: dict[str, Runner] = {}
        load_s: dict[str, float] = {}
        for n in names:
            t0 = time.perf_counter()
            runners[n] = runner(n, loaded, images, sizes, args.workdir)
            load_s[n] = time.perf_counter() - t0
        reference = runners["torch-fp32"]() if "torch-fp32" in runners else None
        rounds: dict[str, list[float]] = {n: [] for n in names}
        diffs: dict[str, dict[str, float]] = {}
        for r in range(args.repeat + 1):
            for n in names:
                t0 = time.perf_counter()
                out = runners[n]()
                dt = time.perf_counter() - t0
                if r == 0 and reference is not None:
                    diffs[n] = {
                        f"max_abs_{k}": float((o.float() - ref).abs().max())
                        for k, o, ref in zip(OUTPUTS, out, reference)
                    }
                    diffs[n].update(
                        {f"scale_{k}": float(ref.abs().max()) for k, ref in zip(OUTPUTS, reference)}
                    )
                    diffs[n].update(query_agreement(out, reference))
                if r > 0:
                    rounds[n].append(dt)
            if r > 0:
                print(f"round {r}: " + ", ".join(f"{n} {rounds[n][-1]:.3f}" for n in names))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        base = statistics.median(rounds[names[0]])
        peaks = {} if args.no_memory else {n: peak_rss(args, n) for n in names}
        print(
            f"| backend | median s (min) | vs {names[0]} | peak RSS GiB | load s | max abs diff logits / boxes / masks "
            "| queries off by > 1e-4 | max abs diff, other queries |"
        )
        print("|---|---|---|---|---|---|---|---|")
        results: dict[str, dict[str, object]] = {}
        for n in names:
            med = statistics.median(rounds[n])
            d = diffs.get(n, {})
            cells = " / ".join(f"{d[f'max_abs_{k}']:.2g}" for k in OUTPUTS) if d else "-"
            if d:
                cells += f" | {d['queries_over_tol']} of {d['queries']} | {d['max_abs_other_queries']:.2g}"
            else:
                cells += " | - | -"
            peak = f"{peaks[n]:.2f}" if n in peaks else "-"
            print(
                f"| {n} | {med:.3f} ({min(rounds[n]):.3f}) | {base / med:.2f}x | {peak} | {load_s[n]:.1f} | {cells} |"
            )
            results[n] = {"median_s": med, "min_s": min(rounds[n]), "rounds_s": rounds[n], "load_s": load_s[n],
                          "peak_rss_gib": peaks.get(n), "diff_vs_torch_fp32": d}  # fmt: skip
        report["backends"] = results
        if d := diffs.get("torch-fp32"):
            print(
                "(torch-fp32 against itself: "
                + ", ".join(f"{v:.2g}" for k, v in d.items() if "max" in k)
                + ")"
            )
        if args.op_share and "onnxruntime-fp32" in names:
            share = op_share(loaded, images, sizes, args.workdir)
            report["op_share"] = share
            print(
                f"deformable attention inside the model: onnxruntime sampling nodes {share['onnxruntime_op_s']:.3f} s of "
                f"{share['onnxruntime_nodes_total_s']:.3f} s node time ({share['onnxruntime_op_node_types']}); compiled "
                f"op {share['torch_op_s']:.3f} s of {share['torch_total_s']:.3f} s in PyTorch fp32"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
