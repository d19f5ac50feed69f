"""End to end on the tiny SDXL: the lifecycle, caches, resume, divergence, outputs."""

from __future__ import annotations

import json
import shutil
import os
import signal
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from job.cli import main
from job.jobfile import load_job
from job.log import setup_logging
from job.metrics import validate_summary
from job.run import run_job

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "jobs" / "smoke.toml"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model folder shared by the module's runs (built on first use)."""
    return tmp_path_factory.mktemp("models")


def job(tmp_path: Path, models_dir: Path, *overrides: str, name: str = "t"):
    """The smoke job redirected into tmp_path, with fewer steps for speed."""
    cfg, warnings = load_job(SMOKE, job_sets(tmp_path, models_dir, *overrides, name=name))
    return cfg


def job_sets(tmp_path: Path, models_dir: Path, *overrides: str, name: str = "t") -> list[str]:
    """job()'s --set values."""
    base = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
            f"model.hub_cache_dir={json.dumps(str(models_dir))}",
            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
            f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
            f"job.name={json.dumps(name)}", "train.log_every=1", "job.device=\"cpu\"",
            "train.max_train_steps=6", "checkpoint.step_interval=3",
            "validation.step_interval=3", 'validation.resolution=["64x64"]',
            "validation.num_inference_steps=2"]
    return base + list(overrides)


def rows(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_run_writes_every_output(tmp_path: Path, models_dir: Path,
                                 capsys: pytest.CaptureFixture, restore_logging,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    setup_logging(json_lines=True)  # as the CLI sets it up in a container
    cfg = job(tmp_path, models_dir, "train.gradient_accumulation_steps=2")
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    # The log ends with how the run ended and where its files are.
    last = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert last["event"] == "job_finished" and last["status"] == "succeeded"
    assert last["exit_code"] == 0 and last["steps_done"] == 6
    assert last["summary"] == str(out / "summary.json")
    assert last["final_weights"] == summary["final_weights"] != []
    validate_summary(summary)
    assert summary["status"] == "succeeded" and summary["steps_done"] == 6
    assert summary["samples_seen"] == 6 * 2 * 2 and summary["eval_loss"] is not None
    # The "auto" speedups as decided on the CPU: no compile, so no NHWC and no graphs; fp32
    # attention through SDPA (fp16_flash is CUDA-only).
    assert summary["speedups"] == {"compile_blocks": False, "channels_last": False,
                                   "cuda_graphs": False, "fp32_attention": "sdpa"}
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "job.resolved.toml").is_file()
    assert [Path(c).name for c in summary["checkpoints"]] == ["step-000003", "step-000006"]
    images = [Path(p) for p in summary["images"]]
    assert {p.parent.name for p in images} == {"step-000003", "step-000006"}
    assert all(p.is_file() for p in images) and any(p.name == "grid.png" for p in images)
    assert len(rows(out, "train")) == 6 and rows(out, "validation")[0]["eval_loss"] > 0

    # `tunejob export --merge`: the stock pipeline's folder with the LoRA fused in
    # (tests/test_sdxl_family.py shows it equals the pipeline with the LoRA loaded).
    sets = [a for s in job_sets(tmp_path, models_dir, "train.gradient_accumulation_steps=2")
            for a in ("--set", s)]
    assert main(["export", str(SMOKE), *sets, "--merge"]) == 0
    merged = StableDiffusionXLPipeline.from_pretrained(str(out / "final-merged"))
    assert not any("lora" in k for k in merged.unet.state_dict())
    # Saved in bf16 on request; the folder is replaced, never one it did not write.
    assert main(["export", str(SMOKE), *sets, "--merge", "--dtype", "bf16"]) == 0
    unet = load_file(str(out / "final-merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in unet.values()} == {torch.bfloat16}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for target in (tmp_path / "mine", out / "final"):
        assert main(["export", str(SMOKE), *sets, "--merge", "-o", str(target)]) == 2
    assert (tmp_path / "mine" / "notes.txt").is_file()
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    # A full volume mid-export: exit 1 with the fix, the earlier export untouched, no scratch.
    from job.models.registry import family_class

    def fills_the_disk(self, source, folder, dtype):
        Path(folder).mkdir()
        (Path(folder) / "model_index.json").write_text("{")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                           "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(family_class("sdxl"), "export_merged", fills_the_disk)
    assert main(["export", str(SMOKE), *sets, "--merge"]) == 1
    assert "filled up while the merged pipeline was written" in capsys.readouterr().err
    unet = load_file(str(out / "final-merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in unet.values()} == {torch.bfloat16}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # final/ renamed aside by a run killed mid-swap: export puts it back and merges it.
    monkeypatch.undo()
    (out / "final").rename(out / ".final.replaced-host-1-0a1b2c3d")
    assert main(["export", str(SMOKE), *sets, "--merge"]) == 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_second_run_reuses_caches_and_changed_setting_recomputes(
        tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture, restore_logging) -> None:
    setup_logging(json_lines=True)

    def per_epoch() -> int:
        """The training event's samples_per_epoch in the log written since the last call."""
        events = [json.loads(line) for line in capsys.readouterr().err.splitlines()
                  if line.startswith("{")]
        return next(e for e in events if e["event"] == "training")["samples_per_epoch"]

    assert run_job(job(tmp_path, models_dir, name="first")) == 0
    # 9 training images in three aspect buckets at batch 2 draw 8 an epoch (one bucket's
    # odd image waits for the next shuffle); with 2 repeats, 27 draw 26. Repeats change what
    # an epoch draws, not what is cached.
    assert per_epoch() == 8
    cfg = job(tmp_path, models_dir, "datasets.0.repeats=2", name="second")
    assert run_job(cfg) == 0
    ready = rows(Path(cfg.output_path()), "data_ready")[0]
    assert ready["encoded_latents"] == 0 and ready["encoded_captions"] == 0
    assert per_epoch() == 26
    cfg = job(tmp_path, models_dir, "datasets.0.crop_style=\"random\"", name="third")
    assert run_job(cfg) == 0
    ready = rows(Path(cfg.output_path()), "data_ready")[0]
    assert ready["encoded_latents"] > 0 and ready["encoded_captions"] == 0


def test_preempted_run_resumes_to_the_same_losses(tmp_path: Path, models_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ("train.caption_dropout_probability=0.3", "lora.dropout=0.1", "train.use_ema=true",
                "train.ema_decay=0.9")
    whole = job(tmp_path / "a", models_dir, *settings)
    assert run_job(whole) == 0
    expected = [r["loss"] for r in rows(Path(whole.output_path()), "train")]

    from job.train.loop import Trainer

    original = Trainer.train_step

    def step_then_sigterm_at_4(self):
        result = original(self)
        if self.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    cut = job(tmp_path / "b", models_dir, *settings)
    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm_at_4)
    assert run_job(cut) == 143
    summary = json.loads((Path(cut.output_path()) / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "preempted" and summary["steps_done"] == 4
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run_job(cut) == 0
    got = [r["loss"] for r in rows(Path(cut.output_path()), "train")]
    assert got == pytest.approx(expected, rel=0, abs=0), "resume changed the loss sequence"
    # The exported LoRA is the EMA's: equal only if the EMA state resumed exactly too.
    lora = "final/pytorch_lora_weights.safetensors"
    a = load_file(Path(whole.output_path()) / lora)
    b = load_file(Path(cut.output_path()) / lora)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_losses_stop_with_exit_4(tmp_path: Path, models_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from job.models.sdxl import SDXLFamily

    original = SDXLFamily.training_loss

    def poisoned(self, batch, generator):
        loss = original(self, batch, generator)
        return loss * float("nan") if self._poison else loss

    monkeypatch.setattr(SDXLFamily, "_poison", False, raising=False)
    monkeypatch.setattr(SDXLFamily, "training_loss", poisoned)
    cfg = job(tmp_path, models_dir, "train.max_nonfinite_steps=2")

    from job.train.loop import Trainer

    original_save = Trainer.save_checkpoint

    def save_then_poison(self):
        checkpoint = original_save(self)
        SDXLFamily._poison = True
        return checkpoint

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_poison)
    assert run_job(cfg) == 4
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["error"]["type"] == "DivergedError" and summary["nonfinite_steps"] == 3
    assert summary["steps_done"] == 3 and len(rows(out, "nonfinite_step")) == 3
    assert [Path(c).name for c in summary["checkpoints"]] == ["step-000003"]


def test_all_images_unreadable_is_exit_3(tmp_path: Path, models_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"broken{i}.png").write_bytes(b"not a png")
    cfg = job(tmp_path, models_dir)
    assert run_job(cfg) == 3
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert summary["error"]["type"] == "DataError" and "skipped" in summary["error"]["message"]


def test_full_fine_tune_exports_a_loadable_pipeline(tmp_path: Path, models_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    cfg = job(tmp_path, models_dir, 'model.model_type="full"', "train.max_train_steps=2",
              "checkpoint.step_interval=100", "validation.enabled=false")
    assert run_job(cfg) == 0
    final = Path(cfg.output_path()) / "final"
    pipeline = StableDiffusionXLPipeline.from_pretrained(final)
    trained = pipeline.unet.state_dict()
    base = StableDiffusionXLPipeline.from_pretrained(models_dir / "tunejob-tiny" / "sdxl").unet
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed, "the exported UNet equals the base: the full fine-tune trained nothing"


def test_cache_command_fills_caches_and_a_finished_job_reruns_without_training(
        tmp_path: Path, models_dir: Path) -> None:
    from job.cli import main

    cfg = job(tmp_path, models_dir)
    sets = [f"{k}={v}" for k, v in (
        ("job.output_dir", json.dumps(cfg.job.output_dir)), ("cache.dir", json.dumps(cfg.cache.dir)),
        ("model.hub_cache_dir", json.dumps(cfg.model.hub_cache_dir)),
        ("datasets.0.instance_data_dir", json.dumps(cfg.datasets[0].instance_data_dir)))]
    args = ["cache", str(SMOKE)] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 0
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    ready = rows(out, "data_ready")[0]
    assert ready["encoded_latents"] == 0 and ready["encoded_captions"] == 0
    stamp = (out / "checkpoints" / "step-000006" / "manifest.json").stat().st_mtime_ns
    assert run_job(cfg) == 0  # resumes at the last step: nothing to train, nothing rewritten
    assert rows(out, "resumed")[-1]["step"] == 6 and len(rows(out, "train")) == 6
    assert (out / "checkpoints" / "step-000006" / "manifest.json").stat().st_mtime_ns == stamp


def test_epochs_set_the_step_count(tmp_path: Path) -> None:
    from helpers import tiny_job_config

    cfg = tiny_job_config(tmp_path, train={"max_train_steps": None, "num_train_epochs": 3},
                          validation={"enabled": False})
    assert run_job(cfg) == 0
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    # 4 images in one 64x64 bucket, batch 2: 2 steps an epoch.
    assert summary["steps_done"] == 6 and summary["samples_seen"] == 12


def test_a_validation_killed_after_its_checkpoint_is_redone_on_resume(
        tmp_path: Path, models_dir: Path) -> None:
    """Step 3's checkpoint is written before step 3's validation: a kill in between left no
    grid.png, and the resumed run (from step 3) makes that step's images first."""
    cfg = job(tmp_path, models_dir)
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    step3 = out / "validation" / "step-000003"
    (step3 / "grid.png").unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")  # the kill came before step 6
    # Sampling slower than the 3 steps left: its time is validation's, not taken from train.
    assert run_job(job(tmp_path, models_dir, "validation.num_inference_steps=20")) == 0
    assert (step3 / "grid.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["wall_time_s"]["train"] > 0
    assert summary["wall_time_s"]["validation"] > summary["wall_time_s"]["train"]
    redone = [r for r in rows(out, "validation") if r["step"] == 3]
    assert len(redone) == 2 and redone[1]["time"] > rows(out, "resumed")[-1]["time"]
    # A complete validation is not repeated: resumed from step 3 again, nothing is redone.
    shutil.rmtree(out / "checkpoints" / "step-000006")
    assert run_job(cfg) == 0
    assert len([r for r in rows(out, "validation") if r["step"] == 3]) == 2
