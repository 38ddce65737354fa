"""Build the optional C++/CUDA extension of deform-attn.

The package always installs: without torch at build time, without a C++ compiler, or when compilation
fails, it installs the pure-PyTorch path and `deform_attn` says so once at import. The CUDA kernel is
compiled when a CUDA toolkit is found (CUDA_HOME, else /usr/local/cuda), whether or not a GPU is present,
for TORCH_CUDA_ARCH_LIST or by default the common data-centre archs (sm_80, sm_90).

Environment: CUDA_HOME (toolkit), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), FORCE_CUDA=1 (compile the CUDA
kernel even without a toolkit found at the usual places), DEFORM_ATTN_NO_CUDA=1 (CPU kernel only),
DEFORM_ATTN_NO_EXT=1 (no extension at all), DEFORM_ATTN_REQUIRE_EXT=1 (fail instead of falling back).

Install with `pip install --no-build-isolation packages/deform-attn` so the extension is built against
the torch already installed (an isolated build would download a second, multi-GB torch).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "deform_attn._C"


def _warn(msg: str) -> None:
    print(f"deform-attn: {msg}", file=sys.stderr)


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = home  # torch.utils.cpp_extension reads it at import
        return home
    return None


def _extensions():
    if os.environ.get("DEFORM_ATTN_NO_EXT") == "1":
        _warn("DEFORM_ATTN_NO_EXT=1: installing the pure-PyTorch path only")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        _warn(
            "torch is not importable at build time: installing the pure-PyTorch path only "
            "(use `pip install --no-build-isolation` with torch installed to build the kernels)"
        )
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _warn("no C++ compiler found: installing the pure-PyTorch path only")
        return [], {}
    # DEFORM_ATTN_NO_CUDA=1: CPU kernel only even when a toolkit is present (quick local builds).
    cuda_home = None if os.environ.get("DEFORM_ATTN_NO_CUDA") == "1" else _cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is header-inline and only runs in parallel when the extension itself is
    # compiled with OpenMP (it then shares torch's libgomp). -fopenmp-simd enables the `omp simd` channel
    # loops (reductions included) without -ffast-math.
    cxx_flags = ["-O3", "-fopenmp", "-fopenmp-simd"]
    link_flags = ["-fopenmp"]
    define_macros = []
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    if cuda_home is not None or force_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        ext = CUDAExtension(
            EXT_NAME,
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        _warn("no CUDA toolkit found: building the CPU kernel only")
        ext = CppExtension(
            EXT_NAME, sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )

    class _BuildOrFallback(BuildExtension):
        """Fall back to the pure-PyTorch install if compilation fails, instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # any compiler failure means: no extension
                if os.environ.get("DEFORM_ATTN_REQUIRE_EXT") == "1":
                    raise
                _warn(f"building the extension failed ({exc}); installing the pure-PyTorch path only")

    return [ext], {"build_ext": _BuildOrFallback.with_options(use_ninja=True)}


class _BuildPyWithSources(build_py):
    """Also install the C++ sources that `deform_attn.openvino` compiles on first use (as deform_attn/_csrc):
    the OpenVINO extension is built against the OpenVINO installed at run time, not at build time."""

    def run(self):
        super().run()
        for sub in ("cpu", "openvino"):
            dst = os.path.join(self.build_lib, "deform_attn", "_csrc", sub)
            os.makedirs(dst, exist_ok=True)
            for f in sorted(glob.glob(os.path.join(HERE, "csrc", sub, "*"))):
                shutil.copy2(f, dst)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": _BuildPyWithSources})
