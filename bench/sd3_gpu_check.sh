#!/usr/bin/env bash
# SD3's GPU-only paths on the tiny model, end to end on CUDA in bf16: the fp8-torchao and
# int8-torchao quantised bases (LoRA on top), and attention_mechanism = "sageattention"
# (falls back to SDPA with a warning when the package is not installed).
#   run: bash bench/sd3_gpu_check.sh     carry: [".whl"] (with a torchao wheel in it)
set -uo pipefail
source bench/wheels.sh
export D=/tmp/sd3gpu
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
common=(--set "job.output_dir=\"$D/out\"" --set "model.hub_cache_dir=\"$D/models\""
        --set "cache.dir=\"$D/cache\"" --set "datasets.0.instance_data_dir=\"$D/data\""
        --set 'model.flavour="tiny"' --set 'job.device="cuda"' --set 'datasets.0.synthetic_images=8'
        --set 'datasets.0.resolution=64' --set 'datasets.0.aspect_bucket_alignment=32'
        --set 'train.batch_size=2' --set 'train.max_train_steps=6' --set 'train.log_every=1'
        --set 'validation.step_interval=6' --set 'validation.resolution=["64x64"]'
        --set 'validation.num_inference_steps=4' --set 'validation.guidance_skip_layers=[1, 2]'
        --set 'validation.guidance_skip_layers_stop=0.5' --set 'checkpoint.step_interval=3')
status=0
for preset in fp8-torchao int8-torchao; do
    python3 -m job run jobs/sd3.toml "${common[@]}" --set "job.name=\"$preset\"" \
        --set "speedups.base_model_precision=\"$preset\"" \
        --set 'speedups.attention_mechanism="sageattention"' --json-logs \
        > "$OUT/$preset.log" 2>&1
    code=$?
    echo "$preset: exit $code"
    python3 - "$D/out/$preset" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
print("  status", s["status"], "steps", s["steps_done"], "final_loss", s["final_loss"],
      "peak_gib", s.get("peak_gpu_memory_gib"), "images", len(s["images"]))
PY
    grep -h '"quantis\|"speedup\|sageattention\|"python_warning' "$OUT/$preset.log" | cut -c1-300 | head -6
    [ $code -eq 0 ] || status=1
done
exit $status
