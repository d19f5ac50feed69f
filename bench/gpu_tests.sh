#!/usr/bin/env bash
# On the GPU machine (device tool): install the carried wheels (.whl), then run the GPU-only
# tests (marked gpu; CI deselects them), all or the files named, stopping before the device
# call's limit so the report still comes back. Results go to $OUT.
#   run: bash bench/gpu_tests.sh [a | b | c | tests/test_gpu_x.py ...]      carry: [".whl"]
# All 31 take about 16 minutes on an H200, more than one call: `b` is the fp16_flash attention
# tests, `c` the CUDA graphs tests (their LCM ones, added in session 15, take about 4 minutes:
# compiling), `a` every other file (each call at most about 6 minutes).
set -uo pipefail
source bench/wheels.sh
export TUNEJOB_DATA=/tmp/data
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, \
torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'diffusers', \
diffusers.__version__)" | tee "$OUT/versions.txt"
files=("$@")
case "${1:-}" in
    a) files=(tests/test_ema.py tests/test_gpu_dropout_recompute.py
              tests/test_gpu_float8.py tests/test_gpu_fsdp2.py tests/test_gpu_kandinsky5.py
              tests/test_gpu_prefetch.py tests/test_optimizers.py) ;;
    b) files=(tests/test_gpu_fp16_flash_attention.py) ;;
    c) files=(tests/test_gpu_cuda_graphs.py) ;;
    "") files=(tests) ;;
esac
timeout -k 10 "${GPU_TESTS_LIMIT_S:-540}" python3 -m pytest -q -p no:cacheprovider -m gpu \
    --durations=0 --junitxml="$OUT/gpu_tests.xml" "${files[@]}" > "$OUT/gpu_tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.txt"
tail -40 "$OUT/gpu_tests.txt"
