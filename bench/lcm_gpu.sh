#!/usr/bin/env bash
# SDXL LCM-LoRA distillation step on one GPU: diffusers' example step (the reference) and
# tunejob's with its speedups, one process per configuration (bench/lcm_step.py, through
# bench/run_list.sh). Results in $OUT/lcm_bench.jsonl.
#   run: bash bench/lcm_gpu.sh [job | batch4 | "ARGS" ...]     carry: [".whl"]
# job: jobs/sdxl_lcm.toml's settings (LoRA r64 on the LCM-LoRA targets, batch 1 x 4
# accumulated, gradient checkpointing, 1024 px); batch4: batch 4 without checkpointing.
# A compiled row compiles three kinds of UNet call (teacher, target, student) and took over
# 410 s before its first timed step in session 15: give each compiled row a call of its own,
# e.g. DEADLINE=580 bash bench/lcm_gpu.sh "--mode ours --compile --channels-last
# --cuda-graphs --batch 1 --accumulation 4 --checkpointing --steps 6 --warmup 3".
set -uo pipefail
job="--batch 1 --accumulation 4 --checkpointing --steps 6 --warmup 3"
case "${1:-job}" in
    job) runs=("--mode reference $job"
               "--mode ours --compile --channels-last --cuda-graphs $job"
               "--mode ours --compile --channels-last $job") ;;
    batch4) runs=("--mode reference --batch 4 --steps 8 --warmup 3"
                  "--mode ours --compile --channels-last --cuda-graphs --batch 4 --steps 8 --warmup 3"
                  "--mode ours --compile --channels-last --batch 4 --steps 8 --warmup 3") ;;
    *) runs=("$@") ;;
esac
exec bash "$(dirname "$0")/run_list.sh" "${runs[@]/#/python3 bench/lcm_step.py }"
