#!/usr/bin/env bash
# Issue 10's GPU measurements, one device call each on the kind named (each inside
# bench/run_list.sh's deadline). Every result line also lands in $OUT/results.txt.
#   run: bash bench/issue10_calls.sh 2|4|2-waits|fsdp2|fsdp2-resume      carry: [".whl"]
#   kinds: 2 and 2-waits -> nvidia-h200-x2; 4, fsdp2 and fsdp2-resume -> nvidia-h200-x4 (fsdp2-resume
#   right after fsdp2, on the same warm machine, which stays warm only about 30 s: it
#   continues fsdp2's checkpoint). On the 4-GPU kind, run fsdp2 and fsdp2-resume first and
#   4 after them if device time is left (30 minutes a session, about 4 of them to start a
#   machine). fsdp2's resume may run long: a 97 GB checkpoint is hashed once by rank 0 at
#   the save and once per rank at the resume; read the first call's log times first.
set -uo pipefail
here=$(dirname "$0")
case "${1:?which call: 2, 4, 2-waits, fsdp2 or fsdp2-resume}" in
2|4)  # SD3.5 Medium LoRA, 1 GPU then N GPUs of the same host (DDP), steady samples/s.
    DEADLINE=560 bash "$here/run_list.sh" \
        "bash bench/ddp_scaling.sh $1 sd3 > \$OUT/ddp.log 2>&1; tr -d '\\n ' < \$OUT/ddp_scaling.json" ;;
2-waits)  # The 2-GPU job with the job's TORCH_NCCL_BLOCKING_WAIT=1 and with 0, in one call
    # (run it if call 2 scales below 1.85x).
    DEADLINE=560 bash "$here/run_list.sh" \
        "bash bench/ddp_scaling.sh 2 sd3 waits > \$OUT/ddp.log 2>&1; tr -d '\\n ' < \$OUT/ddp_scaling.json" ;;
fsdp2|fsdp2-resume)  # SD3.5 Large full fine-tune sharded over 4 GPUs: a sharded
    # checkpoint (fsdp2), then a resume from it (fsdp2-resume).
    phase=$([ "$1" = fsdp2 ] && echo first || echo resume)
    DEADLINE=560 bash "$here/run_list.sh" \
        "bash bench/fsdp2_sd3_large.sh 4 $phase > \$OUT/fsdp2.log 2>&1; tr -d '\\n ' < \$OUT/fsdp2_sd3_large.json" ;;
esac
