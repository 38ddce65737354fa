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
