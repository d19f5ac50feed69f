#!/usr/bin/env bash
# Issue 9's remaining GPU measurements, one device call each (each inside bench/run_list.sh's
# deadline, results in $OUT/results.txt as they end). Order: 1 decides the defaults.
#   run: bash bench/issue9_calls.sh 1|2|3      carry: [".whl"]
set -uo pipefail
here=$(dirname "$0")
sdxl="python3 bench/sdxl_step.py"
case "${1:?which call: 1, 2 or 3}" in
1)  # CUDA graphs in the job's path: the GPU tests, then the whole job against its step.
    DEADLINE=560 bash "$here/run_list.sh" \
        "python3 -m pytest -q -m gpu tests/test_gpu_cuda_graphs.py tests/test_gpu_float8.py tests/test_gpu_fsdp2.py > \$OUT/gpu_tests.log 2>&1; tail -1 \$OUT/gpu_tests.log" \
        "bash bench/job_gpu.sh sdxl > \$OUT/job_gpu.log 2>&1; tail -12 \$OUT/job_gpu.log | tr '\\n' ' '" ;;
2)  # Gradient checkpointing rows: SDXL with the recompute inside the compiled blocks.
    DEADLINE=560 bash "$here/run_list.sh" \
        "$sdxl --mode reference --checkpointing --steps 6 --warmup 2" \
        "$sdxl --mode ours --compile blocks --channels-last --checkpointing --steps 6 --warmup 3" \
        "python3 bench/stage_c_step.py --precisions bf16 --gradient-checkpointing --compile --channels-last --steps 6 --warmup 3" \
        "python3 bench/sd3_step.py --compile --checkpointing --steps 6 --warmup 3" ;;
3)  # fp8, sageattention sampling, VAE caching, Stage C fp32 (the full prior).
    DEADLINE=560 bash "$here/run_list.sh" \
        "python3 bench/sd3_step.py --compile --fp8 --steps 6 --warmup 3" \
        "python3 bench/sage_sampling.py --family sdxl" \
        "python3 bench/sage_sampling.py --family sd3" \
        "python3 bench/vae_caching.py" \
        "python3 bench/stage_c_step.py --precisions no --priors stage-c --compile --channels-last --steps 6 --warmup 3" ;;
esac
