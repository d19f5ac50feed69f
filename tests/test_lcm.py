"""LCM distillation on the tiny SDXL: the loss against the paper's equations written out here,
a LoRA and a full student end to end, exact resume, and the stock pipeline with LCMScheduler.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDPMScheduler, LCMScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from job.distill import with_method_defaults
from job.distill.lcm import LCMDistillation, guidance_embedding
from job.errors import ConfigError
from job.jobfile import load_job
from job.models import registry
from job.models.sdxl_tiny import ensure_tiny_sdxl
from job.run import run_job
from helpers import tiny_job_config
from test_sdxl_family import SIZES, load_family, make_batch

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "jobs" / "smoke.toml"
LCM = {"distillation": {"method": "lcm", "lcm": {"num_ddim_timesteps": 50, "w_min": 2.0,
                                                 "w_max": 8.0}}}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    ensure_tiny_sdxl(folder / "tunejob-tiny" / "sdxl")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(models_dir: Path) -> Path:
    return models_dir / "tunejob-tiny" / "sdxl"


# -- the equations, written out independently of job/distill/lcm.py ---------------------------

def reference_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    # In fp32 like the pipelines: sin/cos of angles up to 1000 w are that sensitive.
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = 1000.0 * w[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def reference_loss(teacher, student, target, alphas_cumprod, batch, noise, index, w, *,
                   prediction_type, loss_type="l2", huber_c=0.001, num_ddim=50,
                   scaling=10.0, cond_dim=None) -> torch.Tensor:
    """One LCM step's per-sample loss from arXiv 2310.04378 / 2311.05556, step by step."""
    x0_data = batch["latents"]
    k = len(alphas_cumprod) // num_ddim
    start = (index + 1) * k - 1
    end = torch.clamp(start - k, min=0)

    def a(t):
        return alphas_cumprod[t].view(-1, 1, 1, 1)

    def call(unet, x, t, embeds, pooled, cond=None):
        return unet(x, t, encoder_hidden_states=embeds, timestep_cond=cond,
                    added_cond_kwargs={"text_embeds": pooled,
                                       "time_ids": batch["cond.time_ids"]}).sample

    def x0_eps(out, x, t):
        if prediction_type == "epsilon":
            return (x - torch.sqrt(1 - a(t)) * out) / torch.sqrt(a(t)), out
        return (torch.sqrt(a(t)) * x - torch.sqrt(1 - a(t)) * out,
                torch.sqrt(a(t)) * out + torch.sqrt(1 - a(t)) * x)

    def consistency(unet, x, t, cond):
        x0, _ = x0_eps(call(unet, x, t, batch["text.prompt_embeds"],
                            batch["text.pooled_prompt_embeds"], cond), x, t)
        scaled = (t * scaling).double()
        c_skip = (0.25 / (scaled ** 2 + 0.25)).float().view(-1, 1, 1, 1)
        c_out = (scaled / torch.sqrt(scaled ** 2 + 0.25)).float().view(-1, 1, 1, 1)
        return c_skip * x + c_out * x0

    cond = reference_embedding(w, cond_dim) if cond_dim else None
    with torch.no_grad():
        x_t = torch.sqrt(a(start)) * x0_data + torch.sqrt(1 - a(start)) * noise
        embeds, pooled = batch["text.prompt_embeds"], batch["text.pooled_prompt_embeds"]
        x0_c, eps_c = x0_eps(call(teacher, x_t, start, embeds, pooled), x_t, start)
        x0_u, eps_u = x0_eps(call(teacher, x_t, start, torch.zeros_like(embeds),
                                  torch.zeros_like(pooled)), x_t, start)
        ww = w.view(-1, 1, 1, 1)
        x0 = x0_c + ww * (x0_c - x0_u)
        eps = eps_c + ww * (eps_c - eps_u)
        x_end = torch.sqrt(a(end)) * x0 + torch.sqrt(1 - a(end)) * eps
        y = consistency(target, x_end, end, cond)
        p = consistency(student, x_t, start, cond)
    d = p - y
    error = torch.sqrt(d ** 2 + huber_c ** 2) - huber_c if loss_type == "huber" else d ** 2
    return error.mean(dim=(1, 2, 3))


def perturb(module: torch.nn.Module, names: tuple[str, ...], seed: int, scale: float) -> None:
    """Add noise to the parameters whose names contain any of `names`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(n in name for n in names):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def fixed_inputs(batch):
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(batch["latents"].shape, generator=generator)
    return noise, torch.tensor([0, 31]), torch.tensor([2.5, 7.0])


def test_guidance_embedding_is_the_pipelines() -> None:
    w = torch.tensor([0.0, 1.5, 7.0])
    ours = guidance_embedding(w, 256)
    theirs = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, reference_embedding(w, 256))


@pytest.mark.parametrize("prediction_type,loss_type", [("epsilon", "l2"),
                                                        ("v_prediction", "huber")])
def test_lora_student_loss_follows_the_equations(tmp_path: Path, models_dir: Path,
                                                 tiny_dir: Path, prediction_type: str,
                                                 loss_type: str) -> None:
    family = load_family(tmp_path, models_dir, model={"prediction_type": prediction_type},
                         distillation={"method": "lcm", "lcm": {"loss_type": loss_type,
                                                                "huber_c": 0.05}})
    family.add_lora()
    perturb(family.unet, ("lora_B",), seed=5, scale=0.05)  # the student differs from the teacher
    objective = LCMDistillation(family.cfg, family, torch.device("cpu"))
    batch = make_batch(family, SIZES)
    noise, index, w = fixed_inputs(batch)
    ours = objective.losses(batch, noise, index, w)

    teacher = UNet2DConditionModel.from_pretrained(str(tiny_dir), subfolder="unet")
    alphas = DDPMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler").alphas_cumprod
    expected = reference_loss(teacher, family.unet, family.unet, alphas.float(), batch, noise,
                              index, w, prediction_type=prediction_type, loss_type=loss_type,
                              huber_c=0.05)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-7)
    # The guidance weight matters: w = 0 (no guidance) is another loss.
    assert not torch.allclose(objective.losses(batch, noise, index, torch.zeros(2)).detach(),
                              expected, rtol=1e-3)


def test_full_student_loss_uses_the_guidance_embedding_and_the_ema_target(
        tmp_path: Path, models_dir: Path, tiny_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, model={"model_type": "full"},
                         distillation={"method": "lcm", "student": "full"})
    objective = LCMDistillation(family.cfg, family, torch.device("cpu"))
    student, target = family.unet, objective.target
    assert student.config.time_cond_proj_dim == 256 and family.teacher_unet is not student
    assert not student.time_embedding.cond_proj.weight.any()  # starts as the teacher
    perturb(student, ("cond_proj", "conv_in"), seed=1, scale=0.05)
    perturb(target, ("conv_out",), seed=2, scale=0.05)
    batch = make_batch(family, SIZES)
    noise, index, w = fixed_inputs(batch)
    ours = objective.losses(batch, noise, index, w)
    teacher = UNet2DConditionModel.from_pretrained(str(tiny_dir), subfolder="unet")
    alphas = DDPMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler").alphas_cumprod
    expected = reference_loss(teacher, student, target, alphas.float(), batch, noise, index, w,
                              prediction_type="epsilon", cond_dim=256)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-7)

    # After an optimizer step the target moves a (1 - decay) part of the way to the student.
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    ours.mean().backward()
    torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1).step()
    objective.after_step()
    decay = family.cfg.distillation.target_ema_decay
    for name, param in list(student.named_parameters())[:5]:
        torch.testing.assert_close(target.get_parameter(name),
                                   decay * before[name] + (1 - decay) * param.detach())


def test_lora_student_loss_decreases_on_a_fixed_batch(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, lora={"rank": 8, "alpha": 8.0}, **LCM)
    family.add_lora()
    objective = LCMDistillation(family.cfg, family, torch.device("cpu"))
    batch = make_batch(family, SIZES)
    params = [p for p in family.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(40):
        loss = objective(batch, torch.Generator().manual_seed(3)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_other_families_are_refused_naming_the_ones_that_work(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg, _ = load_job(SMOKE, ['distillation.method="lcm"'])  # sdxl supports it
    assert cfg.distillation.method == "lcm"
    plain = dataclasses.replace(registry.FAMILIES["sdxl"], name="plain", supports_lcm=False)
    monkeypatch.setitem(registry.FAMILIES, "plain", plain)
    with pytest.raises(ConfigError) as err:
        load_job(SMOKE, ['model.family="plain"', 'model.flavour="tiny"',
                         'distillation.method="lcm"'])
    assert "not supported by family 'plain'" in err.value.message and "sdxl" in err.value.hint
    assert err.value.exit_code == 2
    for bad, match in ((['distillation.student="full"'], 'model.model_type = "lora"'),
                       (["distillation.lcm.w_min=13.0"], "w_min = 13.0 is above w_max")):
        with pytest.raises(ConfigError, match=match):
            load_job(SMOKE, ['distillation.method="lcm"', *bad])


def test_validation_defaults_of_an_lcm_student(tmp_path: Path) -> None:
    lora, notes = with_method_defaults(tiny_job_config(tmp_path, **LCM))
    assert (lora.validation.guidance, lora.validation.num_inference_steps) == (0.0, 2)
    assert notes == ["LCM student: validation samples with guidance = 0.0 (not set in "
                     "[validation]; an LCM student needs 4-8 steps and no classifier-free "
                     "guidance)"]
    full = {"model": {"model_type": "full"},
            "distillation": {**LCM["distillation"], "student": "full"}}
    cfg, _ = with_method_defaults(tiny_job_config(tmp_path, **full))
    assert cfg.validation.guidance == 1 + 0.5 * (2.0 + 8.0)  # w + 1 at the middle of [2, 8]
    _, notes = with_method_defaults(tiny_job_config(tmp_path, **full,
                                                    validation={"guidance": 20.0}))
    assert notes == ["validation.guidance = 20.0 gives the full LCM student w = 19 through its "
                     "guidance embedding, outside the distilled range [2, 8]"]
    plain = tiny_job_config(tmp_path)
    assert with_method_defaults(plain) == (plain, [])


# -- end to end --------------------------------------------------------------------------------

def lcm_job(tmp_path: Path, models_dir: Path, *overrides: str):
    base = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
            f"model.hub_cache_dir={json.dumps(str(models_dir))}",
            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
            f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
            'job.device="cpu"', "train.log_every=1", "train.max_train_steps=4",
            "checkpoint.step_interval=2", "validation.step_interval=2",
            'validation.resolution=["64x64"]', 'validation.prompt_library={}',
            'validation.negative_prompt="blurry"', 'distillation.method="lcm"']
    cfg, _ = load_job(SMOKE, base + list(overrides))
    return cfg


def train_losses(out: Path) -> list[float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["event"] == "train"]


def stock_image(pipeline: StableDiffusionXLPipeline, guidance: float) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return np.asarray(pipeline("a red circle on a blue background", negative_prompt="blurry",
                               width=64, height=64, guidance_scale=guidance,
                               num_inference_steps=4,
                               generator=torch.Generator().manual_seed(0)).images[0])


def test_lora_student_end_to_end_loads_in_the_stock_pipeline(tmp_path: Path, models_dir: Path,
                                                              tiny_dir: Path, capfd) -> None:
    cfg = lcm_job(tmp_path, models_dir, "validation.seed=0", "validation.guidance=0.0")
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert "negative prompt has no effect" in "".join(capfd.readouterr())
    lora = out / "final" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "pt") as handle:
        meta = handle.metadata()
    scheduler_config = json.loads(meta["lcm_scheduler_config"])
    assert scheduler_config == {"timestep_scaling": 10.0, "original_inference_steps": 50}
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4  # still a diffusers LoRA
    assert "LCMScheduler" in (out / "final" / "README.md").read_text()
    step = out / "validation" / "step-000004"
    assert {p.name for p in step.glob("*.png")} == {"validation-64x64.png",
                                                    "validation-64x64-teacher.png", "grid.png"}

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    teacher = stock_image(pipeline, guidance=7.5)  # the teacher at 1 + mid(w_min, w_max)
    pipeline.load_lora_weights(str(out / "final"))
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config, **scheduler_config)
    student = stock_image(pipeline, guidance=0.0)
    np.testing.assert_array_equal(student, np.asarray(Image.open(step / "validation-64x64.png")))
    np.testing.assert_array_equal(teacher,
                                  np.asarray(Image.open(step / "validation-64x64-teacher.png")))

    # Merged (`tunejob export --merge`): the student's LCMScheduler comes with the folder,
    # and the fused UNet samples what the loaded LoRA does.
    registry.family_class("sdxl")(cfg, torch.device("cpu"), torch.float32).export_merged(
        out / "final", tmp_path / "merged")
    merged = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "merged"))
    assert isinstance(merged.scheduler, LCMScheduler)
    assert merged.scheduler.config.timestep_scaling == 10.0
    merged_image = stock_image(merged, guidance=0.0).astype(int)
    assert np.abs(merged_image - student.astype(int)).max() <= 1


def test_full_student_resumes_exactly_and_exports_an_lcm_pipeline(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ('model.model_type="full"', 'distillation.student="full"',
                "distillation.target_ema_decay=0.5", "validation.seed=0",
                "validation.guidance=7.5")
    whole = lcm_job(tmp_path / "a", models_dir, *settings)
    assert run_job(whole) == 0
    expected = train_losses(Path(whole.output_path()))

    from job.train.loop import Trainer

    original = Trainer.train_step

    def step_then_sigterm_at_3(self):
        result = original(self)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    cut = lcm_job(tmp_path / "b", models_dir, *settings)
    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm_at_3)
    assert run_job(cut) == 143
    assert (Path(cut.output_path()) / "checkpoints" / "step-000003" /
            "objective.safetensors").is_file()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run_job(cut) == 0
    assert train_losses(Path(cut.output_path())) == expected, "resume changed the losses"

    final = Path(whole.output_path()) / "final"
    a = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(Path(cut.output_path()) / "final" / "unet" /
                  "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["time_embedding.cond_proj.weight"].any()  # the guidance embedding was trained

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(final))
    assert isinstance(pipeline.scheduler, LCMScheduler)
    assert pipeline.unet.config.time_cond_proj_dim == 256
    image = np.asarray(Image.open(Path(whole.output_path()) / "validation" / "step-000004" /
                                  "validation-64x64.png"))
    np.testing.assert_array_equal(stock_image(pipeline, guidance=7.5), image)
