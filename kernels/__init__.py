"""Paged-attention kernels (installed as ``hf_paged.kernels``).

``reference`` holds plain torch versions of every kernel; the Triton versions live beside it and are chosen by
``hf_paged.attention`` on CUDA devices.
"""
