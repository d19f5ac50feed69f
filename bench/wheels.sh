# Sourced by the GPU scripts run through the device tool: makes $OUT, installs the carried
# wheels (.whl: diffusers and what the GPU image lacks) under /tmp/site, and puts them and
# this checkout on PYTHONPATH.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
