"""Shared fixtures of the nn tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: a second thread only adds contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
