#!/usr/bin/env bash
# Kandinsky 5 Image Lite on one GPU: the LoRA step at 1024 px of a full-size random-init
# transformer, reference vs ours (speed; GPU-busy share and top kernels with --profile), with
# group offload (synchronous and streamed), TREAD 0.5 and an int8 base (peak memory), then
# jobs/kandinsky5.toml's step under a 24 and a 16 GiB cap. One process per run
# (bench/kandinsky5_step.py, through bench/run_list.sh); results in
# $OUT/kandinsky5_bench.jsonl, stderr in $OUT/errors.log.
#   run: bash bench/kandinsky5_gpu.sh [MODE ...]     carry: [".whl"] (diffusers, torchao, ...)
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=("reference" "ours --profile" "offload" "offload-stream"
    "tread --profile" "int8" "job --cap-gib 24" "job --cap-gib 16")
exec bash "$(dirname "$0")/run_list.sh" "${runs[@]/#/python3 bench/kandinsky5_step.py --mode }"
