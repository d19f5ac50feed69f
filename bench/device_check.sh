#!/usr/bin/env bash
# On the GPU machine (device tool): install the carried wheels (.whl), then run the test
# suite and the smoke job on CUDA in bf16. Results go to $OUT.
#   run: bash bench/device_check.sh      carry: [".whl"]
set -uo pipefail
source bench/wheels.sh
export TUNEJOB_DATA=/tmp/data
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, transformers, diffusers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "diffusers", diffusers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__)
PY
start=$(date +%s)
python3 -m job run jobs/smoke.toml --set train.mixed_precision='"bf16"' --json-logs \
    > "$OUT/smoke_log.jsonl" 2>&1
echo "smoke exit $? in $(( $(date +%s) - start ))s" | tee "$OUT/smoke_exit.txt"
cp /tmp/data/output/smoke/summary.json "$OUT/summary.json" 2>/dev/null
tail -5 "$OUT/smoke_log.jsonl"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -25
# The GPU-only tests (marked gpu; CI deselects them).
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15
