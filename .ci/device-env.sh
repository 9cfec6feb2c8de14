# Source from the repo root on the GPU machine (the `device` tool's `run`, carrying [".whl"]):
#   . .ci/device-env.sh && python3 -P -m pytest -m cuda tests/kernels ... && python3 -m hf_paged.bench.kernels ...
# The machine has no network: this installs the wheels ../shared/device/prepare-wheels put into .whl/ (run it here
# first) and maps this checkout as the hf_paged package the way pip would (kernels/ and patches/ become
# hf_paged.kernels and hf_paged.patches). `-P` keeps the repository root off sys.path, where a top-level
# `kernels` folder would be found by transformers' probe for the hub's `kernels` package.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
rm -rf /tmp/pp && mkdir -p /tmp/pp
cp -r hf_paged /tmp/pp/hf_paged && cp -r kernels /tmp/pp/hf_paged/kernels && cp -r patches /tmp/pp/hf_paged/patches
export PYTHONPATH=/tmp/pp:/tmp/site
