"""The only code that touches transformers internals (installed as ``hf_paged.patches``).

``apply()`` registers the "paged" attention and mask functions and routes ``cache_implementation="paged"`` to
ordinary ``generate`` with a ``PagedCache``. It is idempotent and checks the transformers version first.
"""

from hf_paged.patches.generate import apply_generate_patch, is_generate_patched
from hf_paged.patches.pipeline import apply_pipeline_patch, is_pipeline_patched
from hf_paged.patches.registry import apply_attention_registration, is_attention_registered
from hf_paged.patches.version import SUPPORTED_TRANSFORMERS, UnsupportedTransformersVersion, check_transformers_version


def apply() -> None:
    """Install every patch (safe to call many times)."""
    check_transformers_version()
    apply_attention_registration()
    apply_generate_patch()
    apply_pipeline_patch()


__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "UnsupportedTransformersVersion",
    "apply",
    "check_transformers_version",
    "is_attention_registered",
    "is_generate_patched",
    "is_pipeline_patched",
]
