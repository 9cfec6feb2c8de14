"""The package layout: kernels/ and patches/ exist only as hf_paged.kernels / hf_paged.patches."""

import subprocess
import sys
from pathlib import Path

import hf_paged

REPO = Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_or_patches_module():
    # transformers and bitsandbytes probe for the HF `kernels` package: the install must never answer as ours.
    # (-P: like the `pytest` and `hf-paged` scripts, do not put the working directory on sys.path.)
    code = (
        "import importlib.util, hf_paged\n"
        "for name in ('kernels', 'patches'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, None if spec is None else (spec.origin or list(spec.submodule_search_locations)))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        assert str(REPO) not in line, line


def test_subpackages_are_installed_under_hf_paged():
    assert Path(hf_paged.kernels.reference.__file__).parent == REPO / "kernels"
    assert Path(hf_paged.patches.__file__).parent == REPO / "patches"
