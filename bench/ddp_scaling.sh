#!/usr/bin/env bash
# Whole-job throughput on 1 and N GPUs (DDP through accelerate launch): a full-size random
# SDXL UNet or SD3.5 Medium transformer (FAMILY sdxl | sd3), 64 random 1024px images, LoRA
# rank 16 on the attention projections, batch 4 per GPU, bf16. Reads steady-state samples/s
# from metrics.jsonl (steps after the first 5).
#   run: bash bench/ddp_scaling.sh [N] [FAMILY]   carry: [".whl"]   results: $OUT/ddp_scaling.json
set -euo pipefail
N=${1:-2}
FAMILY=${2:-sdxl}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 D=/tmp/ddp-$FAMILY
mkdir -p $D/data
[ -f $D/model/model_index.json ] || python3 bench/build_random_$FAMILY.py $D/model
if [ "$FAMILY" = sd3 ]; then
    JOB=jobs/sd3.toml
    family=(--set 'model.flavour="medium"' --set 'speedups.base_model_precision="no_change"'
            --set 'validation.guidance_skip_layers=[]')
else
    JOB=jobs/smoke.toml
    family=(--set 'model.flavour="base-1.0"' --set 'lora.target_modules=["to_q", "to_k", "to_v", "to_out.0"]')
fi
python3 - <<'PY'
import numpy as np, os
from PIL import Image
d = os.environ["D"] + "/data"
rng = np.random.default_rng(0)
for i in range(64):
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(f"{d}/{i:03d}.png")
    open(f"{d}/{i:03d}.txt", "w").write(f"random image number {i}\n")
PY
common=("${family[@]}" --set "model.pretrained_model_name_or_path=\"$D/model\""
        --set "datasets.0.instance_data_dir=\"$D/data\"" --set 'datasets.0.synthetic_images=0'
        --set 'datasets.0.resolution=1024' --set 'datasets.0.aspect_bucket_alignment=64'
        --set "cache.dir=\"$D/cache\"" --set 'train.batch_size=4' --set 'train.max_train_steps=25'
        --set 'train.mixed_precision="bf16"' --set 'train.log_every=1' --set 'lora.rank=16'
        --set 'lora.alpha=16' --set 'validation.enabled=false' --set 'checkpoint.step_interval=1000'
        --set 'job.device="cuda"' --set 'optimizer.name="adamw"')
run() {  # $1 name, $2 processes
    rm -rf "$D/out-$1"
    local launch=(python3 -m job)
    [ "$2" -gt 1 ] && launch=(accelerate launch --multi_gpu --num_processes "$2" --mixed_precision no --dynamo_backend no -m job)
    /usr/bin/time -v "${launch[@]}" run $JOB "${common[@]}" --set "job.output_dir=\"$D/out-$1\"" \
        --json-logs > "$OUT/log-$1.jsonl" 2> "$OUT/time-$1.txt" || { tail -30 "$OUT/log-$1.jsonl"; exit 1; }
}
run gpu1 1
run gpu$N "$N"
FAMILY=$FAMILY python3 - "$N" <<'PY' | tee "$OUT/ddp_scaling.json"
import json, os, sys
n = int(sys.argv[1]); d = os.environ["D"]
def rate(name):
    import glob
    rows = [json.loads(l) for l in open(glob.glob(f"{d}/out-{name}/*/metrics.jsonl")[0])]
    steps = [r for r in rows if r["event"] == "train"][5:]
    return sum(r["samples_per_s"] for r in steps) / len(steps), steps[-1].get("peak_gpu_memory_gib")
one, mem1 = rate("gpu1"); many, memn = rate(f"gpu{n}")
print(json.dumps({"family": os.environ.get("FAMILY", "sdxl"), "gpus": n, "samples_per_s_1gpu": round(one, 3), f"samples_per_s_{n}gpu": round(many, 3),
                  "scaling": round(many / one, 3), "peak_gib_1gpu": mem1, f"peak_gib_{n}gpu": memn}, indent=2))
PY
