import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when a kernel is decorated, so it has to be set before anything imports relaxedconv.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One fixed tile configuration in tests: one compile per kernel specialisation instead of one per
# autotune config (test_triton_backward.py has a CUDA test that turns autotuning back on).
os.environ.setdefault("RELAXEDCONV_AUTOTUNE", "0")
