#!/usr/bin/env bash
# Whole-job throughput on 1 and N GPUs (DDP through accelerate launch): a full-size random
# SDXL UNet or SD3.5 Medium transformer (FAMILY sdxl | sd3), 64 random 1024px images, LoRA
# rank 16 on the attention projections, batch 4 per GPU, bf16. Reads steady-state samples/s
# (global: every process's samples) and the training peak memory (since training began,
# caching excluded) from metrics.jsonl (steps after the first 5). The job logs to stderr:
# time-*.txt holds its log and /usr/bin/time's figures.
# MODE waits runs the N-GPU job twice instead: with the job's TORCH_NCCL_BLOCKING_WAIT=1 and
# with 0 (blocking wait holds the host until each collective ends; it was reported to cost
# DDP most of its scaling: pytorch/pytorch#50820).
#   run: bash bench/ddp_scaling.sh [N] [FAMILY] [scaling|waits]   carry: [".whl"]
#   results: $OUT/ddp_scaling.json
set -euo pipefail
N=${1:-2}
FAMILY=${2:-sdxl}
MODE=${3:-scaling}
source "$(dirname "$0")/job_common.sh"
common+=(--set 'train.max_train_steps=25' --set 'checkpoint.step_interval=1000')
run() {  # $1 name, $2 processes, $3 TORCH_NCCL_BLOCKING_WAIT (empty: the job's default)
    rm -rf "$D/out-$1"
    local launch=(python3 -m job)
    [ "$2" -gt 1 ] && launch=(accelerate launch --multi_gpu --num_processes "$2" --mixed_precision no --dynamo_backend no -m job)
    [ -n "${3:-}" ] && launch=(env "TORCH_NCCL_BLOCKING_WAIT=$3" "${launch[@]}")
    /usr/bin/time -v "${launch[@]}" run $JOB "${common[@]}" --set "job.output_dir=\"$D/out-$1\"" \
        --json-logs > "$OUT/log-$1.jsonl" 2> "$OUT/time-$1.txt" || { tail -30 "$OUT/time-$1.txt"; exit 1; }
}
if [ "$MODE" = waits ]; then
    run gpu$N "$N"
    run gpu$N-nowait "$N" 0
    FAMILY=$FAMILY python3 - "$N" <<'PY' | tee "$OUT/ddp_scaling.json"
import glob, json, os, sys
n = int(sys.argv[1]); d = os.environ["D"]
def rate(name):
    rows = [json.loads(l) for l in open(glob.glob(f"{d}/out-{name}/*/metrics.jsonl")[0])]
    steps = [r for r in rows if r["event"] == "train"][5:]
    return sum(r["samples_per_s"] for r in steps) / len(steps)
blocking, free = rate(f"gpu{n}"), rate(f"gpu{n}-nowait")
print(json.dumps({"family": os.environ.get("FAMILY", "sdxl"), "gpus": n,
                  "samples_per_s_blocking_wait": round(blocking, 3),
                  "samples_per_s_no_blocking_wait": round(free, 3),
                  "ratio_no_blocking_to_blocking": round(free / blocking, 3)}, indent=2))
PY
    exit 0
fi
run gpu1 1
run gpu$N "$N"
FAMILY=$FAMILY python3 - "$N" <<'PY' | tee "$OUT/ddp_scaling.json"
import json, os, sys
n = int(sys.argv[1]); d = os.environ["D"]
def rate(name):
    import glob
    rows = [json.loads(l) for l in open(glob.glob(f"{d}/out-{name}/*/metrics.jsonl")[0])]
    steps = [r for r in rows if r["event"] == "train"][5:]
    return sum(r["samples_per_s"] for r in steps) / len(steps), steps[-1].get("peak_gpu_memory_gib")
one, mem1 = rate("gpu1"); many, memn = rate(f"gpu{n}")
print(json.dumps({"family": os.environ.get("FAMILY", "sdxl"), "gpus": n, "samples_per_s_1gpu": round(one, 3), f"samples_per_s_{n}gpu": round(many, 3),
                  "scaling": round(many / one, 3), "peak_gib_1gpu": mem1, f"peak_gib_{n}gpu": memn}, indent=2))
PY
