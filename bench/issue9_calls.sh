#!/usr/bin/env bash
# Issue 9's remaining GPU measurements, one device call each (each inside bench/run_list.sh's
# deadline, results in $OUT/results.txt as they end). Order: 1 checks what session 7 built.
#   run: bash bench/issue9_calls.sh 1|2|3|4      carry: [".whl"]
set -uo pipefail
here=$(dirname "$0")
sdxl="python3 bench/sdxl_step.py"
stage_c="python3 bench/stage_c_step.py"
case "${1:?which call: 1, 2, 3 or 4}" in
1)  # Stage C: dropout blocks now recompute inside their graphs (lite missed 1.5x by 3% with
    # the checkpoint around them); CUDA graphs for the prior (cuda_graphs auto is off for it);
    # the GPU tests of the session's changes.
    DEADLINE=550 bash "$here/run_list.sh" \
        "python3 -m pytest -q -m gpu tests/test_gpu_dropout_recompute.py tests/test_gpu_fsdp2.py > \$OUT/gpu_tests.log 2>&1; tail -1 \$OUT/gpu_tests.log" \
        "$stage_c --precisions bf16 --gradient-checkpointing --compile --channels-last --priors stage-c-lite --steps 5 --warmup 3 | tail -1" \
        "$stage_c --precisions bf16 --gradient-checkpointing --compile --channels-last --cuda-graphs --priors stage-c-lite --steps 5 --warmup 3 | tail -1" \
        "$stage_c --precisions bf16 --compile --channels-last --cuda-graphs --priors stage-c-lite,stage-c --steps 5 --warmup 3 | tail -1" ;;
2)  # fp32 Stage C (both references: tunejob's TF32 default and torch's fp32 matmuls); fp8;
    # SageAttention for sd3; SD3 TREAD (new) with compile; selective checkpointing with graphs.
    DEADLINE=550 bash "$here/run_list.sh" \
        "$stage_c --precisions no --priors stage-c-lite --compile --channels-last --fp32-matmul-reference --max-fp32-batch 56 --steps 5 --warmup 3 --profile | tail -1" \
        "python3 bench/sd3_step.py --compile --fp8 --steps 6 --warmup 3" \
        "python3 bench/sage_sampling.py --family sd3" \
        "python3 bench/sd3_step.py --compile --tread 0.5 --steps 6 --warmup 3" \
        "$sdxl --mode ours --compile blocks --channels-last --cuda-graphs --checkpointing --checkpointing-ratio 0.5 --steps 6 --warmup 4" \
        "$stage_c --precisions no --priors stage-c --compile --channels-last --fp32-matmul-reference --max-fp32-batch 16 --steps 4 --warmup 3 | tail -1" ;;
3)  # The whole SDXL job with auto speedups against the plain step in the same call; VAE
    # caching; SD3.5 Large with checkpointing; jobs/sd3.toml's int8 base eager and compiled
    # (auto leaves compile off with a quantised base until this is measured).
    DEADLINE=550 bash "$here/run_list.sh" \
        "python3 bench/sd3_step.py --base int8-torchao --checkpointing --steps 5 --warmup 3" \
        "python3 bench/sd3_step.py --base int8-torchao --checkpointing --compile --steps 5 --warmup 3" \
        "bash bench/job_gpu.sh sdxl > \$OUT/job_gpu.log 2>&1; tail -12 \$OUT/job_gpu.log | tr '\\n' ' '" \
        "python3 bench/vae_caching.py" \
        "python3 bench/sd3_step.py --model large --batch 2 --compile --checkpointing --steps 5 --warmup 3" ;;
4)  # Kandinsky 5 Lite without gradient checkpointing (issue 9's first K5 row; the
    # checkpointed rows are in RESULTS.md), plain and compiled, with TREAD; then SDXL's
    # activation memory budget (new) with CUDA graphs, against the checkpointed rows.
    k5="python3 bench/kandinsky5_step.py --no-checkpointing --steps 6 --warmup 4"
    DEADLINE=550 bash "$here/run_list.sh" "$k5 --mode reference" "$k5 --mode compile" \
        "$k5 --mode tread-compile" \
        "$sdxl --mode ours --compile blocks --channels-last --cuda-graphs --memory-budget 0.3 --steps 6 --warmup 4" ;;
esac
