import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when a kernel is decorated, so it has to be set before anything imports relaxedconv.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One fixed tile configuration in tests: one compile per kernel specialisation instead of one per
# autotune config (test_triton_backward.py has a CUDA test that turns autotuning back on).
os.environ.setdefault("RELAXEDCONV_AUTOTUNE", "0")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny tensors: intra-op threads only spin, and on a shared 2-core machine they stall each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so a tile a kernel forgets to write fails the test."""
    from relaxedconv.kernels import common

    def nan_empty(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(common, "empty_output", nan_empty)
    yield
