"""The transformers versions whose generate internals the patches were written and tested against."""

import transformers
from packaging.version import Version

SUPPORTED_TRANSFORMERS = (Version("5.24.0"), Version("5.25.0"))  # [low, high)


class UnsupportedTransformersVersion(ImportError):
    """hf_paged's patches do not know this transformers version."""


def check_transformers_version(version: str | None = None) -> None:
    found = Version(version or transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(found.base_version) < high:
        raise UnsupportedTransformersVersion(
            f"hf_paged supports transformers >={low},<{high}; found {found}. "
            f'Install a supported version: pip install "transformers>={low},<{high}"'
        )
