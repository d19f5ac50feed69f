#!/usr/bin/env bash
# Issue 10's FSDP2 run: a full fine-tune of a full-size random-init SD3.5 Large transformer
# (8.1B parameters), sharded over N GPUs of one host (accelerate launch, [distributed]
# strategy = "fsdp2"), with a sharded distributed checkpoint, then resumed from it. Fused
# fp32 AdamW (the checkpoint: fp32 weights and two moments, 12 bytes a parameter, about
# 97 GB; adamw_bf16 keeps fp32 moments and compensation beside bf16 weights, 14 bytes, so
# it is not smaller here), 1024 px, batch 1 per GPU, gradient checkpointing, 32 random
# images. Two phases, one device call each on the same warm machine (the model folder and
# the checkpoint stay in /tmp between calls while the machine is held):
#   first:  build the model folder, 4 steps, a checkpoint at step 4;
#   resume: the final export of the first run removed (disk), the same job to 5 steps:
#           resumes from step 4 and writes step 5 (total_limit 1 prunes step 4 after it).
# Disk at the peak (step 5 being written beside step 4): 16 GB of model + 2 x 97 GB.
# Prints samples/s per step, peak GiB per GPU, the checkpoints' write times and size.
#   run: bash bench/fsdp2_sd3_large.sh [N] [first|resume]   carry: [".whl"]
#   results: $OUT/fsdp2_sd3_large.json
set -euo pipefail
N=${1:-4}
PHASE=${2:-first}
export OUT=${OUT:-/tmp/out}
FAMILY=sd3 D=/tmp/job-sd3-large IMAGES=32 MODEL_SIZE=large
mkdir -p "$OUT"
if [ "$PHASE" = resume ] && ! compgen -G "$D/out/*/checkpoints/step-000004" > /dev/null; then
    echo "no step-4 checkpoint: run the first phase on this machine first"; exit 1
fi
gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -ge "$N" ] || { echo "$N processes need $N GPUs; this machine has $gpus"; exit 1; }
rm -rf /tmp/job-sd3  # the DDP call's SD3.5 Medium folder, if it ran on this machine
df -h / /tmp | tee "$OUT/disk_before.txt"
source "$(dirname "$0")/job_common.sh"  # wheels, the model folder, the images
sets=(model.flavour='"large"' model.model_type='"full"' model.pretrained_model_name_or_path="\"$D/model\""
      speedups.base_model_precision='"no_change"' 'validation.guidance_skip_layers=[]'
      validation.enabled=false distributed.strategy='"fsdp2"' optimizer.name='"adamw"'
      train.mixed_precision='"bf16"' train.batch_size=1 train.gradient_checkpointing=true
      train.log_every=1 checkpoint.step_interval=4 checkpoint.total_limit=1
      datasets.0.instance_data_dir="\"$D/data\"" datasets.0.synthetic_images=0
      datasets.0.resolution=1024 datasets.0.aspect_bucket_alignment=64
      cache.dir="\"$D/cache\"" job.device='"cuda"' job.output_dir="\"$D/out\"")
args=()
for s in "${sets[@]}"; do args+=(--set "$s"); done
run() {  # $1 steps
    accelerate launch --multi_gpu --num_processes "$N" --mixed_precision no --dynamo_backend no \
        -m job run jobs/sd3.toml "${args[@]}" --set "train.max_train_steps=$1" --json-logs \
        >> "$OUT/fsdp2_log.jsonl" 2>&1 || { tail -40 "$OUT/fsdp2_log.jsonl"; exit 1; }
}
if [ "$PHASE" = first ]; then
    rm -rf "$D/out"
    run 4
    du -sb "$D"/out/*/checkpoints/step-000004 > "$D/checkpoint_size.txt"
else
    rm -rf "$D"/out/*/final
    run 5
fi
cp "$D/checkpoint_size.txt" "$OUT/"
df -h /tmp > "$OUT/disk.txt"
python3 - "$N" <<'PY' | tee "$OUT/fsdp2_sd3_large.json"
import glob, json, os, sys
d = os.environ["D"]
rows = [json.loads(l) for l in open(glob.glob(f"{d}/out/*/metrics.jsonl")[0])]
train = [r for r in rows if r["event"] == "train"]
size = int(open(os.environ["OUT"] + "/checkpoint_size.txt").read().split()[0])
print(json.dumps({
    "gpus": int(sys.argv[1]), "steps": [r["step"] for r in train],
    "samples_per_s": [round(r["samples_per_s"], 3) for r in train],
    "peak_gpu_memory_gib": max(r.get("peak_gpu_memory_gib") or 0 for r in train),
    "checkpoints": [{k: r[k] for k in ("step", "seconds")} for r in rows if r["event"] == "checkpoint"],
    "resumed": [r["step"] for r in rows if r["event"] == "resumed"],
    "checkpoint_step4_gb": round(size / 1e9, 1),
    "final": sorted(os.listdir(glob.glob(f"{d}/out/*")[0]))}, indent=2))
PY
