#!/usr/bin/env bash
# Run bench commands one after another on the GPU machine, each in its own process, inside a
# deadline: a command that would start after DEADLINE seconds (default 540) is skipped, so
# one device call ends within its 10-minute limit. stdout's last line of each goes to the
# call's output and, as each command ends, to $OUT/results.txt (kept if the call is cut
# short); stderr to $OUT/errors.log. GPU tests: "python3 -m pytest -q -m gpu tests/X.py".
#   run: bash bench/run_list.sh "python3 bench/sdxl_step.py --mode reference" ...
#   carry: [".whl"]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
deadline=${DEADLINE:-540}
start=$(date +%s)
for command in "$@"; do
    left=$(( deadline - ($(date +%s) - start) ))
    if [ "$left" -le 20 ]; then echo "skipped (deadline): $command" | tee -a "$OUT/errors.log"; continue; fi
    echo "== $command" >>"$OUT/errors.log"
    begun=$(date +%s)
    { timeout "$left" bash -c "$command" 2>>"$OUT/errors.log" | tail -1
      echo "   ($(( $(date +%s) - begun )) s)"; } | tee -a "$OUT/results.txt"
done
