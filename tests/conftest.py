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


@pytest.fixture(scope="session")
def qwen_shape_dir(tmp_path_factory):
    """A Qwen2.5-Instruct-shape model directory (tests/real_shape.py), built once per test session."""
    from tests.real_shape import build_qwen_shape

    return build_qwen_shape(tmp_path_factory.mktemp("qwen2.5-shape"))


@pytest.fixture(scope="session")
def llama_shape_dir(tmp_path_factory):
    """A Llama-3.2-Instruct-shape model directory with a date-bearing chat template, built once per session."""
    from tests.real_shape import build_llama_shape

    return build_llama_shape(tmp_path_factory.mktemp("llama3.2-shape"))
