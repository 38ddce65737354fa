"""``maskdino.cpu_inference.allocator.retain_freed_memory``: freed CPU memory is reused without new page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

# In a fresh interpreter (the setting is process-wide): the same "inference step" (tensors of 96 MiB and 32 MiB,
# above glibc's largest mmap threshold, allocated, used and freed) repeated; the page faults of the last steps.
_PROBE = """
import json, resource, sys, torch
applied = None
if sys.argv[1] == "retain":
    from maskdino.cpu_inference.allocator import retain_freed_memory
    applied = [retain_freed_memory(), retain_freed_memory()]
n = 24 * 2**20  # float32 elements: 96 MiB
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n)
    b = torch.ones(n // 3)
    c = a + 1
    del a, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retain_freed_memory_removes_page_faults_of_repeated_steps():
    default = _probe("default")
    retained = _probe("retain")
    pages = (96 + 32 + 96) * 2**20 // 4096
    # glibc's default: every buffer is a fresh mmap, every step faults all its pages in again
    assert all(f > pages // 2 for f in default["faults"]), default
    # retained: after a few steps (64-byte-aligned blocks need some coalescing first) the freed heap memory is
    # reused and most steps fault nothing in (now and then the heap still grows by one block)
    assert retained["applied"] == [True, True]
    assert sum(retained["faults"][-6:]) < sum(default["faults"][-6:]) / 4, (retained, default)
