# Sourced by the whole-job benchmarks (ddp_scaling.sh, job_gpu.sh, fsdp2_sd3_large.sh):
# installs the carried wheels, builds a full-size random-init model folder for $FAMILY (sdxl |
# sd3; $MODEL_SIZE, if set, is passed to the builder: sd3 "large") and $IMAGES (default 64)
# random 1024px images under $D (default /tmp/job-$FAMILY), and sets `common` to the job's
# --set overrides: LoRA rank 16 on the attention projections, batch 4 per GPU, bf16, AdamW,
# validation off, metrics every step.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 D=${D:-/tmp/job-$FAMILY} IMAGES=${IMAGES:-64}
mkdir -p "$D/data"
[ -f "$D/model/model_index.json" ] || \
    python3 "bench/build_random_$FAMILY.py" "$D/model" ${MODEL_SIZE:+"$MODEL_SIZE"}
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
for i in range(int(os.environ["IMAGES"])):
    if not os.path.exists(f"{d}/{i:03d}.png"):
        Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(f"{d}/{i:03d}.png")
        open(f"{d}/{i:03d}.txt", "w").write(f"random image number {i}\n")
PY
common=("${family[@]}" --set "model.pretrained_model_name_or_path=\"$D/model\""
        --set "datasets.0.instance_data_dir=\"$D/data\"" --set 'datasets.0.synthetic_images=0'
        --set 'datasets.0.resolution=1024' --set 'datasets.0.aspect_bucket_alignment=64'
        --set "cache.dir=\"$D/cache\"" --set 'train.batch_size=4'
        --set 'train.mixed_precision="bf16"' --set 'train.log_every=1' --set 'lora.rank=16'
        --set 'lora.alpha=16' --set 'validation.enabled=false'
        --set 'job.device="cuda"' --set 'optimizer.name="adamw"')

# Mean samples/s of the train rows after the first $2 steps of the run in output folder $1.
steady_rate() {
    python3 - "$1" "$2" <<'PY'
import glob, json, sys
rows = [json.loads(l) for l in open(glob.glob(f"{sys.argv[1]}/*/metrics.jsonl")[0])]
steps = [r for r in rows if r["event"] == "train"][int(sys.argv[2]):]
print(round(sum(r["samples_per_s"] for r in steps) / len(steps), 3))
PY
}
