# TEMPORARY shim (the kernels helper replaces this file): reference kernels only.
from hf_paged.kernels.reference import copy_blocks, write_kv
from hf_paged.kernels.reference import paged_attention as _ref_attention


def paged_attention(*args, max_seqlen_q=None, **kwargs):
    return _ref_attention(*args, **kwargs)
