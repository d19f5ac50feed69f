"""On a CUDA GPU (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_cuda_graphs.py` on the
GPU machine): `[speedups] cuda_graphs`, the UNet's compiled blocks replayed as CUDA graphs,
gives the numbers of the eager UNet, in training steps (forward and backward, weights
updated between steps), in LCM-LoRA distillation steps (three UNet calls before one
backward) and in sampling (no grad, outputs of an earlier call still held while the next
runs, as a pipeline holds its latents); and the smoke and LCM jobs run with it from caching
through validation and export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from job.speedups.compile import apply_regional_compile, begin_step
from test_run import job
from test_sdxl_family import SIZES, load_family, make_batch, models_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cuda_batch(batch):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.fixture
def full_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN's TF32 is torch's default), so
    that eager and compiled differ only by summation order. With TF32, the sampled outputs
    of the first run were 2e-3 apart in both directions (no output was another call's)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_blocks_train_and_sample_like_eager_blocks(
        tmp_path: Path, models_dir: Path, full_fp32: None,  # noqa: F811
        checkpointing: bool) -> None:
    """With checkpointing, the graphed blocks recompute inside their own graphs (ratio 1)
    and the eager UNet uses diffusers' checkpointing."""
    family = load_family(tmp_path, models_dir)
    family.add_lora()
    batch = make_batch(family, SIZES)
    eager = family.unet.cuda()
    graphed = copy.deepcopy(eager)
    if checkpointing:
        eager.enable_gradient_checkpointing()
        graphed.enable_gradient_checkpointing()
    assert apply_regional_compile(graphed, cuda_graphs=True, recompute_inside=1.0 if checkpointing else 0.0) > 0
    batch = _cuda_batch(batch)
    timesteps = torch.tensor([10, 700], device="cuda")
    cond = {"encoder_hidden_states": batch["text.prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": batch["text.pooled_prompt_embeds"],
                                  "time_ids": batch["cond.time_ids"]}}
    latents = batch["latents"]

    def trainer(unet):
        params = [p for p in unet.parameters() if p.requires_grad]
        # SGD: an update linear in the gradient. (AdamW divides by the gradient's running
        # size, and turns the compiled kernels' last-bit differences in near-zero gradients
        # into updates of up to lr: 2e-3 apart after 4 steps, in eager vs inductor alike.)
        optimizer = torch.optim.SGD(params, lr=0.1)
        generator = torch.Generator(device="cuda").manual_seed(0)
        losses = []
        for _ in range(4):
            begin_step()  # as the trainer does
            noise = torch.randn(latents.shape, device="cuda", generator=generator)
            pred = unet(latents + noise, timesteps, **cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return torch.stack(losses), params

    eager_losses, eager_params = trainer(eager)
    graphed_losses, graphed_params = trainer(graphed)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-3, atol=1e-5)
    for ours, theirs in zip(graphed_params, eager_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)

    # Sampling (eval mode): three no-grad calls in a row, every output kept, as a sampler
    # keeps its latents; each must equal the eager UNet's, however the graphs reuse memory.
    eager.eval()
    graphed.eval()
    with torch.no_grad():
        inputs = [latents * scale for scale in (0.5, 1.0, 2.0)]
        eager_out = [eager(x, timesteps, **cond).sample for x in inputs]
        graphed_out = [graphed(x, timesteps, **cond).sample for x in inputs]
        again = graphed(inputs[0], timesteps, **cond).sample
    for ours, theirs in zip(graphed_out, eager_out):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(again, eager_out[0], rtol=1e-3, atol=1e-4)
    # Every kept output is its own call's: a replay did not write into an earlier output.
    assert not torch.allclose(graphed_out[0], graphed_out[2], atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_blocks_distil_like_eager_blocks(
        tmp_path: Path, models_dir: Path, full_fp32: None,  # noqa: F811
        checkpointing: bool) -> None:
    """An LCM-LoRA step calls the UNet three times before its backward: the teacher (the
    adapters disabled, both guidance branches in one 2B call, no grad), the target (the
    student under no grad) and the student, each with its own graphs. Two micro-batches
    per optimizer step replay them twice in one generation. Losses, updated weights and the
    eval-mode loss (every UNet call its own generation) equal the eager UNet's: a teacher
    that kept its adapters, or a replay that overwrote a held output, would not."""
    from job.distill.lcm import LCMDistillation
    from test_lcm import perturb

    family = load_family(tmp_path, models_dir, distillation={"method": "lcm"})
    family.add_lora()
    perturb(family.unet, ("lora_B",), seed=5, scale=0.05)  # the student is not the teacher
    batch = _cuda_batch(make_batch(family, SIZES))
    eager = family.unet.cuda()
    graphed = copy.deepcopy(eager)
    if checkpointing:
        eager.enable_gradient_checkpointing()
        graphed.enable_gradient_checkpointing()
    assert apply_regional_compile(graphed, cuda_graphs=True,
                                  recompute_inside=1.0 if checkpointing else 0.0) > 0
    objective = LCMDistillation(family.cfg, family, torch.device("cuda"))

    def trainer(unet):
        family.unet = unet
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1)  # linear in the gradient (see above)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            begin_step()  # as the trainer does, once per optimizer step
            for _ in range(2):
                loss = objective(batch, generator).mean()
                (loss / 2).backward()
                losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        unet.eval()
        with torch.no_grad():
            evaluated = objective.eval_loss(batch, torch.tensor([100, 800]),
                                            torch.randn(batch["latents"].shape, generator=generator))
        return torch.stack(losses), evaluated, params

    eager_losses, eager_eval, eager_params = trainer(eager)
    graphed_losses, graphed_eval, graphed_params = trainer(graphed)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(graphed_eval, eager_eval, rtol=1e-3, atol=1e-6)
    for ours, theirs in zip(graphed_params, eager_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)
    # The steps trained: the loss moved (a graph replaying stale inputs would repeat it).
    assert len(set(graphed_losses.tolist())) == len(graphed_losses)


@pytest.fixture
def graphed(monkeypatch: pytest.MonkeyPatch) -> list:
    """The cuda_graphs argument of every apply_regional_compile call the test's job makes."""
    import job.speedups.compile as compile_module

    calls = []
    real = compile_module.apply_regional_compile

    def spy(denoiser, *args, **kwargs):
        calls.append(kwargs.get("cuda_graphs"))
        return real(denoiser, *args, **kwargs)

    monkeypatch.setattr(compile_module, "apply_regional_compile", spy)
    return calls


def test_smoke_job_runs_with_cuda_graphs(tmp_path: Path, models_dir: Path,  # noqa: F811
                                         graphed: list) -> None:
    from job.run import run_job

    cfg = job(tmp_path, models_dir, 'job.device="cuda"', "speedups.compile_blocks=true",
              "speedups.channels_last=true", "speedups.cuda_graphs=true")
    assert run_job(cfg) == 0
    assert graphed == [True]
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps_done"] == 6
    assert summary["eval_loss"] is not None and summary["images"]


def test_stage_c_bf16_job_runs_with_auto_cuda_graphs(tmp_path: Path, graphed: list) -> None:
    """The Stage C prior in bf16 without checkpointing, where `cuda_graphs = "auto"` turns
    graphs on (lite: 2.14x the plain step with them, 1.42x without): training, the decoder
    validation through the graphed prior, checkpoints and export."""
    from job.run import run_job
    from test_stage_c_run import stage_c_job

    cfg, _ = stage_c_job(tmp_path, 'job.device="cuda"', 'train.mixed_precision="bf16"',
                         "job.i_know_what_i_am_doing=true",  # the prior's bf16 override
                         'speedups.base_model_precision="no_change"')
    assert run_job(cfg) == 0
    assert graphed == [True]
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps_done"] == 4
    assert summary["speedups"]["cuda_graphs"] is True and summary["images"]


def test_lcm_job_runs_with_cuda_graphs(tmp_path: Path, graphed: list) -> None:
    """LCM-LoRA distillation with `cuda_graphs = true` (auto leaves it off: its speed is not
    measured yet): training, validation of the student and the teacher through the graphed
    UNet, checkpoints and the exported LoRA. About 3 minutes on an H200, mostly compiling
    the teacher's, target's and student's graphs per bucket."""
    from job.models.sdxl_tiny import ensure_tiny_sdxl
    from job.run import run_job
    from test_lcm import lcm_job

    models = tmp_path / "models"
    ensure_tiny_sdxl(models / "tunejob-tiny" / "sdxl")
    cfg = lcm_job(tmp_path, models, 'job.device="cuda"', "speedups.cuda_graphs=true")
    assert run_job(cfg) == 0
    assert graphed == [True]
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps_done"] == 4
    assert summary["speedups"]["cuda_graphs"] is True and summary["images"]
