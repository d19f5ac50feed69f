#!/usr/bin/env bash
# SDXL LoRA step on one GPU (issue 9's SDXL row): the plain reference and tunejob's step with
# its speedups, one process per configuration (bench/sdxl_step.py, through bench/run_list.sh).
# Results in $OUT/sdxl_bench.jsonl.
#   run: bash bench/sdxl_gpu.sh ["ARGS" ...]     carry: [".whl"]
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=("--mode reference"
    "--mode ours --compile stages --channels-last --profile"
    "--mode reference --checkpointing"
    "--mode ours --compile stages --channels-last --checkpointing")
exec bash "$(dirname "$0")/run_list.sh" "${runs[@]/#/python3 bench/sdxl_step.py }"
