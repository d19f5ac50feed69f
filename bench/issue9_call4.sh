#!/usr/bin/env bash
# The next call for issue 9 (session 8 ran out of device time before it):
# - Stage C lite and full in fp32 with their attention through flex_attention in TF32
#   ([speedups] fp32_attention = "flex", opt-in), against the TF32 reference: 1.24x / 1.22x
#   before, 44% of the step in fp32 SDPA;
# - its GPU test; the SageAttention sampling ratio for Kandinsky 5 (the first run failed on
#   a dtype); the FSDP2 GPU test at its new tolerance (not rerun since session 7).
#   run: bash bench/issue9_call4.sh      carry: [".whl"]
stage_c="python3 bench/stage_c_step.py --precisions no --compile --channels-last --flex-attention"
DEADLINE=${DEADLINE:-530} bash "$(dirname "$0")/run_list.sh" \
    "python3 -m pytest -q -m gpu tests/test_gpu_flex_attention.py > \$OUT/gpu_tests.log 2>&1; tail -1 \$OUT/gpu_tests.log" \
    "$stage_c --priors stage-c-lite --max-fp32-batch 56 --steps 5 --warmup 3 --profile" \
    "python3 bench/sage_sampling.py --family kandinsky5" \
    "$stage_c --priors stage-c --max-fp32-batch 16 --steps 4 --warmup 3" \
    "python3 -m pytest -q -m gpu tests/test_gpu_fsdp2.py > \$OUT/gpu_fsdp2.log 2>&1; tail -1 \$OUT/gpu_fsdp2.log"
