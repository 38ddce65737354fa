"""OpenVINO extension of the op: one ``MSDeformAttn`` node run by this package's own CPU kernels.

An ONNX graph exported with ``deform_attn.onnx.translation_table("custom")`` holds one node
``deform_attn.onnx.CUSTOM_OP_TYPE`` (domain ``CUSTOM_DOMAIN``) per attention instead of the standard-operator decompositions. OpenVINO reads it once
the extension library is added to its ``Core``::

    import openvino as ov
    import deform_attn.openvino

    core = ov.Core()
    core.add_extension(str(deform_attn.openvino.extension_path()))
    model = core.read_model("model.onnx")

Why a library of our own: ``GridSample`` recomputes the bilinear weights of each sample for every one of the
``D`` channels and runs per level and head, while the kernels here gather a sample's ``D`` channels with one set
of weights (inside the R50 Mask DINO, onnxruntime's GridSample nodes take 6-9x the compiled op's time). onnxruntime is not
served: its wheel ships no C/C++ headers to build a custom-op library against.

The library is compiled on first use (~45 s with g++ on 2 cores) from the package's C++ sources against the
installed OpenVINO's headers (the ``openvino`` wheel ships ``include/`` and ``libs/``), and cached under
``$DEFORM_ATTN_CACHE`` (default ``~/.cache/deform_attn``) keyed by the sources, the OpenVINO version and the
compiler; a failed or interrupted build leaves nothing behind. float32 only (a bf16 OpenVINO model runs this
node in float32); the CPU kernel copy (generic / avx2 / avx512) is picked from the CPU at run time and
``DEFORM_ATTN_CPU_ISA`` forces one, as for the torch op.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ExtensionBuildError", "extension_path", "sources_dir"]

_SOURCES = (
    "openvino/ms_deform_attn_openvino.cpp",
    "cpu/ms_deform_attn_cpu_avx2.cpp",
    "cpu/ms_deform_attn_cpu_avx512.cpp",
)
_HEADERS = ("cpu/ms_deform_attn_cpu_kernel.h", "cpu/ms_deform_attn_cpu_kernel_bodies.inc")


class ExtensionBuildError(RuntimeError):
    """The OpenVINO extension could not be built (no OpenVINO, no headers, no compiler, a compile error)."""


def sources_dir() -> Path:
    """The C++ sources: ``$DEFORM_ATTN_CSRC`` when set, else the ``_csrc`` folder installed with the package, else
    the ``csrc`` folder of a source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    forced = os.environ.get("DEFORM_ATTN_CSRC")
    candidates = [Path(forced)] if forced else [here / "_csrc", here.parents[1] / "csrc"]
    for c in candidates:
        if all((c / f).is_file() for f in _SOURCES + _HEADERS):
            return c
    raise ExtensionBuildError(
        "deform_attn.openvino: the C++ sources of the extension were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); set DEFORM_ATTN_CSRC to the csrc folder of deform-attn"
    )


def _openvino_dirs() -> tuple[str, Path, Path, list[Path]]:
    try:
        import openvino
    except ImportError:
        raise ExtensionBuildError("deform_attn.openvino needs OpenVINO: pip install openvino") from None
    root = Path(openvino.__file__).resolve().parent
    include, libs = root / "include", root / "libs"
    needed = [
        next(iter(sorted(libs.glob(f"{name}.so.*"))), None)
        for name in ("libopenvino", "libopenvino_onnx_frontend")
    ]
    if not (include / "openvino" / "op" / "op.hpp").is_file() or None in needed:
        raise ExtensionBuildError(
            f"deform_attn.openvino: the installed OpenVINO ({root}) has no C++ headers or libraries "
            "(include/openvino, libs/libopenvino.so.*, libs/libopenvino_onnx_frontend.so.*)"
        )
    return str(openvino.__version__), include, libs, [p for p in needed if p is not None]


def _cache_dir() -> Path:
    return Path(os.environ.get("DEFORM_ATTN_CACHE") or Path.home() / ".cache" / "deform_attn")


def extension_path(rebuild: bool = False, verbose: bool = False) -> Path:
    """The compiled OpenVINO extension library, built now if this combination of sources, OpenVINO and
    compiler has none yet.

    Raises:
        ExtensionBuildError: no OpenVINO (or one without headers), no sources, no C++ compiler, or a compile
            error (its output is in the message).
    """
    version, include, libs, needed = _openvino_dirs()
    src = sources_dir()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise ExtensionBuildError(f"deform_attn.openvino: no C++ compiler {cxx!r} on PATH (set CXX)")
    key = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        key.update(f.encode())
        key.update((src / f).read_bytes())
    key.update(f"{version}|{cxx}".encode())
    out = _cache_dir() / f"libdeform_attn_openvino-{key.hexdigest()[:16]}.so"
    if out.is_file() and not rebuild:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fvisibility=hidden",
        f"-I{include}", *(str(src / f) for f in _SOURCES),
        f"-L{libs}", *(f"-l:{p.name}" for p in needed), f"-Wl,-rpath,{libs}",
    ]  # fmt: skip
    # one line on stderr, as torch's cpp_extension builds say: the first use waits for the compiler (~1 min)
    print(
        f"deform_attn: compiling the OpenVINO extension {out.name} (first use, about a minute)",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        proc = subprocess.run([*cmd, "-o", str(target)], capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            raise ExtensionBuildError(
                f"deform_attn.openvino: compiling the extension failed ({' '.join(cmd[:2])} ...):\n"
                + (proc.stderr or proc.stdout)[-4000:]
            )
        if verbose and proc.stderr:
            print(proc.stderr)
        os.replace(target, out)  # atomic: a concurrent or interrupted build never leaves half a library
    return out
