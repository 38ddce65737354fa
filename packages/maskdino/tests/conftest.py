"""Shared fixtures of the maskdino tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests, restored afterwards.

    These models are tiny: with several test processes sharing 2 cores, intra-op threads only spin-wait
    (a training step goes from ~1 s to ~20 s).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def skip_if_aten_capability_forced_on_amx():
    """Skip a bfloat16 test when ``ATEN_CPU_CAPABILITY`` forces PyTorch's kernels below this AMX CPU (a test
    setting, see :func:`aten_capability_forced_below_hardware`)."""
    if aten_capability_forced_below_hardware():
        pytest.skip(
            "ATEN_CPU_CAPABILITY is forced below this AMX CPU: PyTorch's bf16 attention kernel then fails"
        )


def aten_capability_forced_below_hardware() -> bool:
    """True when ``ATEN_CPU_CAPABILITY`` forces PyTorch's kernels below what this CPU has (a test setting).

    PyTorch's bfloat16 attention kernel is inconsistent then on AMX CPUs: it packs for AMX from the CPU's own flags
    and checks the forced capability ("pack_vnni2 is only supported when avx512 is supported")."""
    import os
    from pathlib import Path

    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if forced not in ("default", "avx2"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " amx_bf16" in flags
