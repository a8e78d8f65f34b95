"""Shared test settings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the tensors are small, so one thread is as fast, results are
    bit-reproducible (resume tests compare weights bitwise), and the suite stays fast when other processes
    share the CPU (oversubscribed OpenMP threads slow small-op loops down by 10× or more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
