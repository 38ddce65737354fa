"""Sessions for the Mask DINO monorepo.

    nox -s demo      # the main job: synthetic data -> train tiny model on CPU -> evaluate -> pictures
    nox -s tests     # every package's tests and the cross-package tests (what CI runs)
    nox -s lint      # ruff check, ruff format --check, mypy (the same as the pre-commit hooks)
    nox -s bench     # kernel and end-to-end benchmarks
    nox -s train -- --config ...   /   nox -s eval -- --config ... --weights ...

All sessions share ONE virtual environment (``.nox/shared``): torch is ~5.5 GB and reinstalling it per
session would dominate every run. The environment is created on first use (so ``nox -s tests`` on a
fresh machine builds everything from scratch) and the packages are installed editable; the C++/CUDA
extension is rebuilt only when its sources change (a hash stamp), and then incrementally by ninja.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
ENV = ROOT / ".nox" / "shared"
BIN = ENV / "bin"

# Exactly these: they install from this machine's disk; other versions download gigabytes.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
THIRD_PARTY = [
    "numpy",
    "scipy",
    "pillow",
    "pycocotools",
    "faster-coco-eval",
    "pyyaml",
    "safetensors",
    "tqdm",
    "tensorboard",
    "matplotlib",
    "ninja",
    "pybind11",
    "setuptools",
    "wheel",
]
TEST_DEPS = ["pytest", "pytest-xdist", "hypothesis"]
# the optional export extra of maskdino (`pip install "maskdino[export]"`) and the evaluation backends, tested in CI
EXTRAS = ["onnx", "onnxscript", "onnxruntime", "openvino", "hotcoco", "ultrafast-pycocotools"]
LINT_DEPS = ["ruff", "mypy"]
# Order matters: each package depends only on the ones before it.
PACKAGES = ["packages/deform-attn", "packages/coco-eval", "packages/detr-core", "packages/maskdino"]

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "none"


def _build_env() -> dict[str, str]:
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(ENV)}
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    return env


def _sources_digest() -> str:
    """Hash of everything that changes what `pip install` builds (metadata and C++/CUDA sources)."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("**/*")):
            if path.is_file() and (
                path.name in ("pyproject.toml", "setup.py")
                or path.suffix in (".cpp", ".cu", ".h", ".cuh", ".c", ".inc")
            ):
                h.update(str(path.relative_to(ROOT)).encode())
                h.update(path.read_bytes())
    h.update(" ".join(TORCH + THIRD_PARTY + EXTRAS + TEST_DEPS + LINT_DEPS).encode())
    return h.hexdigest()


def _shared_env(session: nox.Session) -> dict[str, str]:
    """Create (once) and update the shared environment; return the env vars to run tools in it."""
    env = _build_env()
    if not (BIN / "python").exists():
        session.run(sys.executable, "-m", "venv", str(ENV), external=True)
    stamp = ENV / ".installed"
    digest = _sources_digest()
    if stamp.exists() and stamp.read_text() == digest:
        session.log("shared environment is up to date (.nox/shared)")
        return env
    pip = [str(BIN / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    session.run(*pip, *TORCH, *THIRD_PARTY, *EXTRAS, *TEST_DEPS, *LINT_DEPS, external=True, env=env)
    # --no-build-isolation: the extension compiles against the torch installed above instead of a
    # fresh (multi-GB) torch in an isolated build environment.
    editable = [arg for pkg in PACKAGES for arg in ("-e", str(ROOT / pkg))]
    session.run(*pip, "--no-build-isolation", "--no-deps", *editable, external=True, env=env)
    stamp.write_text(digest)
    return env


def _run(session: nox.Session, env: dict[str, str], *args: str) -> None:
    session.run(str(BIN / "python"), *args, external=True, env=env)


#: the op, detr-core and the model: run again on other CPU code paths (every test must hold on any x86-64 CPU)
FORCED_PATH_TESTS = [
    "packages/deform-attn/tests",
    "packages/detr-core/tests",
    "packages/maskdino/tests/test_model.py",
    "packages/maskdino/tests/test_model_parts.py",
    "tests/test_ddp.py",
]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _forced_paths() -> list[tuple[str, str, int]]:
    """``(ATEN_CPU_CAPABILITY, DEFORM_ATTN_CPU_ISA, torch threads)`` runs below the machine's own best path: AVX2
    (when the CPU has it) with one thread per test worker, and the portable code paths with two threads."""
    paths = []
    if {"avx2", "fma"} <= _cpu_flags():
        paths.append(("avx2", "avx2", 1))
    paths.append(("default", "generic", 2))
    return paths


@nox.session
def tests(session: nox.Session) -> None:
    """All tests of all packages plus the cross-package tests (CPU; CUDA tests skip without a GPU), then the op,
    detr-core and model tests again with PyTorch's CPU capability and the op's kernel copy forced lower
    (ATEN_CPU_CAPABILITY=avx2|default, DEFORM_ATTN_CPU_ISA=avx2|generic) and with 1 and 2 threads."""
    env = _shared_env(session)
    # Two pytest workers on two cores: one intra-op thread each, or torch's thread pools fight over the
    # cores (a tiny training step goes from ~1 s to ~20 s when oversubscribed).
    env["OMP_NUM_THREADS"] = "1"
    args = session.posargs or []
    _run(session, env, "-c", "import deform_attn; print(deform_attn.build_info())")
    _run(session, env, "-m", "pytest", "-n", "2", "--dist", "loadfile", *args)
    if session.posargs:
        return
    for capability, isa, threads in _forced_paths():
        session.log(
            f"again with ATEN_CPU_CAPABILITY={capability}, DEFORM_ATTN_CPU_ISA={isa}, {threads} thread(s)"
        )
        with tempfile.TemporaryDirectory() as cache:
            forced = dict(env, ATEN_CPU_CAPABILITY=capability, DEFORM_ATTN_CPU_ISA=isa, OMP_NUM_THREADS=str(threads),
                          TORCHINDUCTOR_CACHE_DIR=cache)  # fmt: skip
            workers = "2" if threads == 1 else "1"
            _run(session, forced, "-c", "import deform_attn; print(deform_attn.build_info())")
            _run(
                session, forced, "-m", "pytest", "-n", workers, "--dist", "loadfile", "-q", *FORCED_PATH_TESTS
            )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and mypy over the four packages (configured in pyproject.toml)."""
    env = _shared_env(session)
    session.run(str(BIN / "ruff"), "check", ".", external=True, env=env)
    session.run(str(BIN / "ruff"), "format", "--check", ".", external=True, env=env)
    session.run(str(BIN / "mypy"), external=True, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Kernel and end-to-end benchmarks; each prints its ratio against a reference from the same run."""
    env = _shared_env(session)
    scripts = session.posargs or sorted(str(p) for p in (ROOT / "benchmarks").glob("bench_*.py"))
    for script in scripts:
        _run(session, env, script)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: synthetic data set -> train the tiny preset on CPU -> evaluate -> prediction pictures."""
    env = _shared_env(session)
    _run(session, env, "-m", "maskdino", "demo", *session.posargs)


@nox.session
def train(session: nox.Session) -> None:
    """`maskdino train` with the given arguments, e.g. nox -s train -- --config tiny --opts train.max_iter=100."""
    env = _shared_env(session)
    _run(session, env, "-m", "maskdino", "train", *session.posargs)


@nox.session(name="eval")
def eval_(session: nox.Session) -> None:
    """`maskdino eval` with the given arguments."""
    env = _shared_env(session)
    _run(session, env, "-m", "maskdino", "eval", *session.posargs)


@nox.session
def predict(session: nox.Session) -> None:
    """`maskdino predict` with the given arguments."""
    env = _shared_env(session)
    _run(session, env, "-m", "maskdino", "predict", *session.posargs)
