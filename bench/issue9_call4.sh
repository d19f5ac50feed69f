#!/usr/bin/env bash
# The next call (session 8 ran out of device time before it): Stage C lite fp32 with its
# attention through flex_attention in TF32 ([speedups] fp32_attention = "flex", opt-in;
# 1.24x against the TF32 reference before, 44% of the step in fp32 SDPA); its GPU test; the
# SageAttention sampling ratio for Kandinsky 5 (the first run failed on a dtype).
#   run: bash bench/issue9_call4.sh      carry: [".whl"]
DEADLINE=${DEADLINE:-170} bash "$(dirname "$0")/run_list.sh" \
    "python3 bench/stage_c_step.py --precisions no --priors stage-c-lite --compile --channels-last --flex-attention --max-fp32-batch 56 --steps 5 --warmup 3 --profile | grep '^{\"stage' | tail -1" \
    "python3 -m pytest -q -m gpu tests/test_gpu_flex_attention.py > \$OUT/gpu_tests.log 2>&1; tail -1 \$OUT/gpu_tests.log" \
    "python3 bench/sage_sampling.py --family kandinsky5"
