import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when a kernel is decorated, so it has to be set before anything imports relaxedconv.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
