"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, restored afterwards: the matrices in these tests are tiny, and on a shared
    2-core machine two threads waited on each other (OpenMP barriers on a descheduled thread) up to ~60x longer
    than the math took."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
