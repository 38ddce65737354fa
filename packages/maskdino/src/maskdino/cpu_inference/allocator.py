"""Keep freed CPU memory in the process for reuse (glibc malloc), the CPU counterpart of CUDA's caching allocator.

PyTorch's CPU tensors come straight from ``malloc``. With glibc's defaults every buffer above the dynamic mmap
threshold (at most 32 MiB) is a fresh ``mmap`` and is handed back to the kernel when freed, and free space at the
top of the heap is trimmed, so the next tensor of the same size page-faults all its memory in again. One
800x1216 Mask DINO forward allocates ~0.6 GiB of such buffers: ~150,000 page faults per image, ~0.6 s of the
~6 s it takes on two cores. With mmap off and trimming off, a repeated forward reuses the same heap memory and
faults nothing in.

This changes the whole process's allocator, so the library never does it on its own: the command line
(``maskdino predict`` and ``maskdino eval``) and the inference benchmark call :func:`retain_freed_memory`;
training does not (it gains nothing measurable at the demo's 128 px: 1.65 vs 1.66 it/s, and a long run over
many image sizes would keep a fragmented peak heap); applications opt in
the same way (or start Python with ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``,
or preload jemalloc/tcmalloc, which do the same). The cost: the process keeps its peak memory instead of
returning it to the system between images, plus some fragmentation (peak RSS of the 800x1216 R50 forward:
1.93 GB instead of 1.81 GB); a repeated forward settles after a few steps into reusing its blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no mmap'd chunks, no heap trimming (up to 2 GiB).

    Idempotent. Affects allocations made after the call (call it before building the model).

    Returns:
        True if the settings are in effect; False where they do not apply (not Linux/glibc) or ``mallopt``
        refused them.
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied
