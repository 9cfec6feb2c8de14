import os

import torch

# NOTE: triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when hf_paged.kernels.<kernel> is first
# imported; without a GPU the kernel tests run on the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
