"""The package layout: kernels/ and patches/ exist only as hf_paged.kernels / hf_paged.patches."""

import importlib.util
import sys
from pathlib import Path

import hf_paged

REPO = Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_or_patches_module():
    # transformers and bitsandbytes probe for the HF `kernels` package: ours must never answer as `kernels`.
    assert str(REPO) not in [str(Path(p).resolve()) for p in sys.path if p]
    for name in ("kernels", "patches"):
        spec = importlib.util.find_spec(name)
        assert spec is None or REPO not in Path(spec.origin or next(iter(spec.submodule_search_locations))).parents


def test_subpackages_are_installed_under_hf_paged():
    assert Path(hf_paged.kernels.reference.__file__).parent == REPO / "kernels"
    assert Path(hf_paged.patches.__file__).parent == REPO / "patches"
