#!/usr/bin/env bash
# Kandinsky 5 Image Lite on one GPU: the LoRA step at 1024 px of a full-size random-init
# transformer, reference vs ours (speed), with group offload, TREAD 0.5 and an int8 base
# (peak memory), then jobs/kandinsky5.toml's step under a 24 GiB cap and int8 + group
# offload under a 16 GiB cap. One process per run (bench/kandinsky5_step.py).
#   run: bash bench/kandinsky5_gpu.sh     carry: [".whl"] (diffusers and torchao wheels)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for mode in reference ours offload tread int8; do
    timeout 240 python3 bench/kandinsky5_step.py --mode "$mode" 2>"$OUT/$mode.err" | tail -1
done
timeout 240 python3 bench/kandinsky5_step.py --mode job --cap-gib 24 2>"$OUT/job24.err" | tail -1
timeout 240 python3 bench/kandinsky5_step.py --mode job --cap-gib 16 2>"$OUT/job16.err" | tail -1
