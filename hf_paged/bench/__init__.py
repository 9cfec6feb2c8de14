"""The `hf-paged bench ...` commands (docs/benchmarks.md)."""

import os

_KNOB_PREFIXES = ("HF_PAGED_", "TORCHINDUCTOR_", "TORCH_BLAS_", "TORCH_CUBLAS", "CUBLAS", "TRITON_",
                  "CUDA_LAUNCH_BLOCKING")


def environment_knobs() -> dict[str, str]:
    """The environment variables that change what a run measures (HF_PAGED_PDL, TORCHINDUCTOR_ENABLE_PDL, ...), for
    its JSON: two runs that differ only there are then told apart."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_KNOB_PREFIXES)}
