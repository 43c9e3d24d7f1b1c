"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run tests single-threaded: their tensors are tiny, and on a busy 2-core machine OpenMP's
    second thread makes small ops up to 100x slower. Multi-rank tests set this in each child."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A tokenized-data cache shared by the runs of one test module (built once per module)."""
    return tmp_path_factory.mktemp("data-cache")
