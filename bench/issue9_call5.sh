#!/usr/bin/env bash
# The next call for issue 9 (session 9): Stage C in fp32 with its attention through
# FlashAttention on fp16 inputs ([speedups] fp32_attention = "fp16_flash", opt-in) against
# the TF32 reference (1.24x / 1.26x with SDPA's fp32 kernel, 44% of the step; flex_attention
# measured no faster); its GPU test first; then the FSDP2 GPU test as rewritten in session 9
# (its element-wise check failed on AdamW noise three runs out of three).
#   run: bash bench/issue9_call5.sh      carry: [".whl"]
stage_c="python3 bench/stage_c_step.py --precisions no --compile --channels-last --fp16-flash"
DEADLINE=${DEADLINE:-540} bash "$(dirname "$0")/run_list.sh" \
    "python3 -m pytest -q -m gpu tests/test_gpu_fp16_flash_attention.py > \$OUT/gpu_tests.log 2>&1; tail -1 \$OUT/gpu_tests.log" \
    "$stage_c --priors stage-c-lite --max-fp32-batch 56 --fp32-matmul-reference --steps 5 --warmup 3 --profile" \
    "$stage_c --priors stage-c --max-fp32-batch 16 --steps 4 --warmup 3" \
    "$stage_c --priors stage-c-lite --max-fp32-batch 56 --gradient-checkpointing --steps 5 --warmup 3" \
    "python3 -m pytest -q -m gpu tests/test_gpu_fsdp2.py > \$OUT/gpu_fsdp2.log 2>&1; tail -1 \$OUT/gpu_fsdp2.log"
