#!/usr/bin/env bash
# The whole job on one GPU against its own training step (issue 9's full-job benchmark):
# `python -m job run` on a full-size random-init SDXL or SD3.5 Medium (FAMILY sdxl | sd3),
# 64 random 1024px images cached first, batch 4, 40 steps with a checkpoint every 10 and
# metrics every step, with the job's auto speedups or those given as --set overrides; then
# the isolated step (bench/sdxl_step.py or bench/sd3_step.py) with the same speedups, and
# the plain reference step (sdxl: before the job). Steady state: the train rows after the
# first 10 (compile warm-up). The checkpoint cost is inside the job's rate (a save's time
# falls in the next step's window).
# STEP=0 leaves the isolated step out (the job against the reference only).
#   run: [STEP=0] bash bench/job_gpu.sh [FAMILY] [--set key=value ...]    carry: [".whl"]
#   results: $OUT/job_bench.json, the job's log in $OUT/job_log.jsonl
set -euo pipefail
FAMILY=${1:-sdxl}
shift || true
source "$(dirname "$0")/job_common.sh"
# The job's speedups are "auto" unless the overrides say otherwise (on a GPU, sdxl LoRA:
# compile_blocks, channels_last and cuda_graphs), and the isolated step gets the same: each
# flag unless an override turns it off. (Auto turns cuda_graphs off for a checkpointing
# ratio below 1; pass speedups.cuda_graphs=false with one.)
off() { [[ "$*" == *"$1=false"* ]]; }
if [ "$FAMILY" = sdxl ]; then
    # The reference first, so that a deadline that cuts the call short leaves the ratio's
    # two ends (job and reference) rather than the job alone.
    ref_flags=()
    [[ "$*" == *gradient_checkpointing=true* ]] && ref_flags+=(--checkpointing)
    ref_line=$(python3 bench/sdxl_step.py --mode reference "${ref_flags[@]}" 2>>"$OUT/errors.log" | tail -1)
    echo "reference step: $ref_line"
fi
rm -rf "$D/out-job"
python3 -m job run $JOB "${common[@]}" --set 'train.max_train_steps=40' \
    --set 'checkpoint.step_interval=10' --set "job.output_dir=\"$D/out-job\"" "$@" \
    --json-logs > "$OUT/job_log.jsonl" 2>&1 || { tail -30 "$OUT/job_log.jsonl"; exit 1; }
job_rate=$(steady_rate "$D/out-job" 10)
cp "$D"/out-job/*/metrics.jsonl "$OUT/job_metrics.jsonl"
echo "job steady samples/s: $job_rate"
if [ "${STEP:-1}" = 0 ] && [ "$FAMILY" = sdxl ]; then
    step_rate=nan
    ref_rate=$(echo "$ref_line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["samples_per_s"])')
elif [ "$FAMILY" = sdxl ]; then
    overrides="$*"
    flags=()
    off compile_blocks "$overrides" || flags+=(--compile blocks)
    off compile_blocks "$overrides" || off channels_last "$overrides" || flags+=(--channels-last)
    off compile_blocks "$overrides" || off cuda_graphs "$overrides" || flags+=(--cuda-graphs)
    [[ "$overrides" == *gradient_checkpointing=true* ]] && flags+=(--checkpointing)
    step_line=$(python3 bench/sdxl_step.py --mode ours "${flags[@]}" 2>>"$OUT/errors.log" | tail -1)
    step_rate=$(echo "$step_line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["samples_per_s"])')
    ref_rate=$(echo "$ref_line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["samples_per_s"])')
else
    line=$(python3 bench/sd3_step.py --compile --checkpointing 2>>"$OUT/errors.log" | tail -1)
    step_rate=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ours"]["samples_per_s"])')
    ref_rate=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["reference"]["samples_per_s"])')
fi
checkpoint_s=$(python3 - "$D/out-job" <<'PY'
import glob, json, sys
rows = [json.loads(l) for l in open(glob.glob(f"{sys.argv[1]}/*/metrics.jsonl")[0])]
print(json.dumps([r["seconds"] for r in rows if r["event"] == "checkpoint"]))
PY
)
python3 - "$FAMILY" "$job_rate" "$step_rate" "$ref_rate" "$checkpoint_s" "$*" <<'PY' | tee "$OUT/job_bench.json"
import json, sys
family, job, step, ref, ckpt, overrides = sys.argv[1:]
job, ref = float(job), float(ref)
step = None if step == "nan" else float(step)  # STEP=0: no isolated step
print(json.dumps({"family": family, "overrides": overrides, "job_samples_per_s": job,
                  "step_samples_per_s": step, "reference_step_samples_per_s": ref,
                  "job_over_step": step and round(job / step, 3),
                  "job_over_reference": round(job / ref, 3),
                  "checkpoint_seconds": json.loads(ckpt)}, indent=2))
PY
