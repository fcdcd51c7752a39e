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


def _interpreter_failure() -> str | None:
    """Why Triton's interpreter cannot run ``range(0, n)`` over a runtime ``n``, as every kernel's
    K loop does, or None when it can. Triton 3.6's interpreter converts ``n`` (a 1-element array)
    with ``int()``, which NumPy 2.4 made an error: then every kernel test fails the same way, far
    from the cause."""
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = tl.zeros((1,), dtype=tl.int32)
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr + tl.arange(0, 1), acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the cause in its own InterpreterError
        return f"{type(e).__name__}: {e}"
    return None if int(out) == 3 else f"a 3-step loop counted {int(out)}"


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        return
    try:
        import triton
    except ImportError:
        return  # the kernel tests skip themselves
    failure = _interpreter_failure()
    if failure is not None:
        import numpy

        cause = (" (it calls int() on 1-element arrays, an error since NumPy 2.4): install a newer triton, "
                 "or pip install 'numpy<2.4'" if "0-dimensional" in failure else "")
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter cannot run a kernel loop beside NumPy "
            f"{numpy.__version__}{cause}. It failed with {failure}")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny tensors: intra-op threads only spin, and on a shared 2-core machine they stall each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_GLOBAL_FLAGS = (
    (torch.backends.cuda.matmul, "allow_tf32"),
    (torch.backends.cudnn, "allow_tf32"),
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "deterministic"),
)


@pytest.fixture(autouse=True)
def _process_flags_restored():
    # Tests share a process (pytest-xdist workers too): one that leaves TF32 or cuDNN autotuning on
    # would change the precision or the bits of every test after it in that process.
    old = [getattr(obj, name) for obj, name in _GLOBAL_FLAGS]
    yield
    for (obj, name), value in zip(_GLOBAL_FLAGS, old):
        setattr(obj, name, value)


@pytest.fixture
def exact_fp32(_process_flags_restored):
    """fp32 without TF32 in matmuls and in cuDNN (whose default is TF32): the stationary triton
    backward runs its convolutions through cuDNN, which then rounds like the kernels' own exact dots.
    (Plain assignments: these flags are properties of module objects; _process_flags_restored
    puts them back.)"""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so a tile a kernel forgets to write fails the test."""
    from relaxedconv.kernels import common

    def nan_empty(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(common, "empty_output", nan_empty)
    yield
