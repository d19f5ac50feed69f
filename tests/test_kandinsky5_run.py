"""End to end: jobs/kandinsky5.toml on the tiny Kandinsky 5 models, on the CPU. t2i with its
group offload (synchronously: no CUDA stream here), a TREAD route, validation at the asked
size, resume and the stock pipeline's load_lora_weights; i2i with a conditioning folder, a
missing pair skipped and reported, and validation from a conditioning image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from job.jobfile import load_job
from job.metrics import validate_summary
from job.models.registry import family_class
from job.run import run_job

ROOT = Path(__file__).resolve().parent.parent


def k5_job(tmp_path: Path, *overrides: str):
    """jobs/kandinsky5.toml on the tiny model, on the CPU, at 64 px and a few steps."""
    base = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
            f"model.hub_cache_dir={json.dumps(str(tmp_path / 'models'))}",
            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
            f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
            'model.flavour="tiny"', 'job.device="cpu"', "datasets.0.synthetic_images=4",
            "datasets.0.resolution=64", "datasets.0.aspect_bucket_alignment=16",
            "train.batch_size=2", "train.gradient_accumulation_steps=1",
            "train.max_train_steps=4", "train.log_every=1", "optimizer.learning_rate=1e-3",
            "optimizer.lr_warmup_steps=0", "checkpoint.step_interval=2",
            "validation.step_interval=4", 'validation.resolution=["64x64", "96x64"]',
            "validation.num_inference_steps=3", "validation.eval_split=0.25",
            "speedups.group_offload_use_stream=false"]
    cfg, warnings = load_job(ROOT / "jobs" / "kandinsky5.toml", base + list(overrides))
    assert warnings == []
    return cfg


def rows(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def stock(models: Path, kind: str):
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

    cls = Kandinsky5I2IPipeline if kind == "i2i" else Kandinsky5T2IPipeline
    pipeline = cls.from_pretrained(str(models / "tunejob-tiny" / f"kandinsky5-image-{kind}"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.resolutions = [(64, 64)]
    return pipeline


def test_t2i_job_trains_validates_resumes_and_exports_a_stock_lora(tmp_path: Path) -> None:
    route = ('tread.routes=[{selection_ratio = 0.5, start_layer_idx = 1, '
             'end_layer_idx = -2}]')
    cfg = k5_job(tmp_path, route)
    assert cfg.speedups.enable_group_offload and cfg.train.gradient_checkpointing
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "succeeded" and summary["family"] == "kandinsky5-image"
    assert summary["steps_done"] == 4 and summary["eval_loss"] is not None
    losses = [r["loss"] for r in rows(out, "train")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    images = [Path(p) for p in summary["images"] if Path(p).name != "grid.png"]
    assert {Image.open(p).size for p in images} == {(64, 64), (96, 64)}, images

    longer = k5_job(tmp_path, route, "train.max_train_steps=6")
    assert run_job(longer) == 0
    assert rows(out, "resumed")[0]["step"] == 4
    assert [r["step"] for r in rows(out, "train")][-2:] == [5, 6]

    [final] = json.loads((out / "summary.json").read_text())["final_weights"]
    pipeline = stock(tmp_path / "models", "t2i")

    def image() -> np.ndarray:
        return np.asarray(pipeline("a red cube", height=64, width=64, num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(0)).image[0])

    plain = image()
    pipeline.load_lora_weights(str(Path(final).parent))
    with_lora = image().astype(int)
    assert np.abs(with_lora - plain).max() > 0

    # `tunejob export --merge`: the LoRA fused into the stock pipeline's folder.
    family = family_class(longer.model.family)(longer, torch.device("cpu"), torch.float32)
    family.export_merged(Path(final).parent, tmp_path / "merged")
    pipeline = type(pipeline).from_pretrained(str(tmp_path / "merged"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.resolutions = [(64, 64)]  # as stock() sets it
    assert not any("lora" in k for k in pipeline.transformer.state_dict())
    assert np.abs(image().astype(int) - with_lora).max() <= 1


def write_pairs(tmp_path: Path, count: int, missing: int) -> tuple[Path, Path]:
    """`count` training images with captions, and conditioning images for all but the last
    `missing` of them (the same relative names, another extension)."""
    data, cond = tmp_path / "data" / "set", tmp_path / "cond" / "set"
    data.mkdir(parents=True)
    cond.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a red cube" if i % 2 else "a small house")
        if i < count - missing:
            Image.fromarray(255 - pixels).save(cond / f"img{i}.jpg")
    return data.parent, cond.parent


def test_i2i_job_pairs_conditioning_images_and_validates_from_one(tmp_path: Path) -> None:
    data, cond = write_pairs(tmp_path, count=5, missing=1)
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), (20, 200, 40)).save(source)
    cfg = k5_job(tmp_path, 'model.flavour="tiny-i2i"',
                 f"datasets.0.instance_data_dir={json.dumps(str(data))}",
                 f"datasets.0.conditioning_data_dir={json.dumps(str(cond))}",
                 "datasets.0.synthetic_images=0", 'validation.resolution=["64x64"]',
                 f"validation.conditioning_images=[{json.dumps(str(source))}]")
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps_done"] == 4
    [ready] = rows(out, "data_ready")
    assert ready["skipped"] == 1 and ready["train_samples"] + ready["eval_samples"] == 4
    images = [Path(p) for p in summary["images"] if Path(p).name != "grid.png"]
    assert images and all(Image.open(p).size == (64, 64) for p in images)

    # The text embedding carries the conditioning image, so another image for one sample
    # means its caption (and the empty prompt with that image) and its latents are encoded
    # again; the other samples' entries are reused.
    Image.new("RGB", (64, 64), (0, 0, 255)).save(cond / "set" / "img0.jpg")
    assert run_job(k5_job(tmp_path, 'model.flavour="tiny-i2i"',
                          f"datasets.0.instance_data_dir={json.dumps(str(data))}",
                          f"datasets.0.conditioning_data_dir={json.dumps(str(cond))}",
                          "datasets.0.synthetic_images=0", 'validation.resolution=["64x64"]',
                          f"validation.conditioning_images=[{json.dumps(str(source))}]",
                          "train.max_train_steps=5")) == 0
    again = rows(out, "data_ready")[-1]
    assert (again["encoded_captions"], again["encoded_latents"]) == (2, 1)

    [final] = summary["final_weights"]
    pipeline = stock(tmp_path / "models", "i2i")

    def image() -> np.ndarray:
        return np.asarray(pipeline(image=Image.open(source), prompt="a red cube", height=64,
                                   width=64, num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(0)).image[0])

    plain = image()
    pipeline.load_lora_weights(str(Path(final).parent))
    assert np.abs(image().astype(int) - plain).max() > 0


def test_i2i_without_a_pair_for_any_image_says_so(tmp_path: Path) -> None:
    data, cond = write_pairs(tmp_path, count=2, missing=2)
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64)).save(source)
    cfg = k5_job(tmp_path, 'model.flavour="tiny-i2i"',
                 f"datasets.0.instance_data_dir={json.dumps(str(data))}",
                 f"datasets.0.conditioning_data_dir={json.dumps(str(cond))}",
                 "datasets.0.synthetic_images=0", "validation.eval_split=0",
                 f"validation.conditioning_images=[{json.dumps(str(source))}]")
    assert run_job(cfg) == 3  # a data problem found at run time
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert f"nothing named img0.* in {cond / 'set'}" in json.dumps(summary["error"])


pytestmark = pytest.mark.slow
