"""On a CUDA GPU (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_fsdp2.py` on the GPU
machine): the tiny SDXL UNet sharded by apply_fsdp2 over one NCCL process trains like the
unsharded UNet through the GPU-only paths of a step: fp16 autocast with loss scaling (the
scaler's overflow check over sharded gradients skips the same steps), fused AdamW on sharded
parameters, and gradient clipping by the full norm. Several GPUs: tests/test_fsdp2.py's CPU
runs, with NCCL in place of gloo, are the check to make there."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from distributed_helpers import free_port
from job.models.sdxl_tiny import _unet as tiny_unet
from job.train.distributed import clip_gradients
from job.train.fsdp import apply_fsdp2, is_sharded
from job.train.optimizers import build_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def nccl_group(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def deterministic_convolutions():
    """cuDNN's deterministic kernels: its default weight-gradient kernels for convolutions
    sum in a varying order, and AdamW turns those last-bit differences in near-zero
    gradients into updates of up to lr (the first GPU run: conv_in.weight apart, the
    scales and norms equal)."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_sharded_fp16_steps_match_the_whole_unet(nccl_group: None,
                                                 deterministic_convolutions: None) -> None:
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    whole = tiny_unet().to(device)
    sharded = copy.deepcopy(whole)
    apply_fsdp2(sharded, device)
    assert is_sharded(sharded)
    generator = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=generator),
              "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 77, 64, generator=generator),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=generator),
                                    "time_ids": torch.randn(2, 6, generator=generator)}}
    inputs = tree_map(lambda t: t.to(device), inputs)
    runs = []
    for model in (whole, sharded):
        params = list(model.parameters())
        optimizer = build_optimizer(params, "adamw", 1e-3, 0.9, 0.999, 0.01, 1e-8)
        assert optimizer.defaults["fused"]
        scaler, norms = torch.amp.GradScaler("cuda"), []
        for step in range(6):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(**inputs).sample.float().pow(2).mean()
            if step == 2:  # an overflow: every gradient inf or nan, the step skipped
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norms.append(float(clip_gradients(params, 1.0)))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        runs.append((norms, scaler.get_scale()))
    (whole_norms, whole_scale), (sharded_norms, sharded_scale) = runs
    # The overflow, found over the sharded gradients too, skipped step 2 and halved the
    # scale once in both (the tiny UNet's gradients do not overflow fp16 at 65536 otherwise:
    # the first GPU run found no skipped step).
    assert sharded_scale == whole_scale == 32768.0
    assert sharded_norms == pytest.approx(whole_norms, rel=1e-3, nan_ok=True)
    # The parameters after 5 AdamW updates of lr 1e-3: a skipped, doubled or unreduced update
    # moves most values of a tensor by about lr. Noise moves a few: Adam's normalisation turns
    # last-bit differences in gradients near zero into updates of up to lr of either sign
    # (GPU runs: 1 to 7 values of a tensor up to 1.6e-3 apart, in a different tensor each
    # run). So, per tensor: the median within 1e-5 (a hundredth of lr), and at most 1% of
    # the values (at least one) more than 1e-4 apart. Left out: the tensors whose gradient
    # is zero in exact arithmetic, whose every update is noise (a median 8e-4 apart in a GPU
    # run); they are only checked to be finite.
    noise = structurally_zero_gradients(whole, inputs)
    assert noise and all(name.endswith((".bias", "time_emb_proj.weight")) for name in noise), noise
    for (name, mine), theirs in zip(whole.named_parameters(), sharded.parameters()):
        theirs = theirs.full_tensor().detach()
        assert torch.isfinite(theirs).all(), name
        if name in noise:
            continue
        apart = (theirs - mine.detach()).abs()
        assert float(apart.median()) <= 1e-5, f"{name}: median {float(apart.median()):.2e} apart"
        outliers = int((apart > 1e-4).sum())
        assert outliers <= max(1, apart.numel() // 100), \
            f"{name}: {outliers} of {apart.numel()} values more than 1e-4 apart"


def structurally_zero_gradients(unet: torch.nn.Module, inputs: dict) -> set[str]:
    """The parameters whose float64 gradient (a copy of the UNet, on the CPU) is a millionth
    of the largest or less: per-channel shifts right before a GroupNorm with one channel per
    group (32 groups on the tiny UNet's 32-channel blocks), which the norm removes: the
    resnets' time_emb_proj, conv biases before their norm2 or conv_norm_out."""
    copy_ = copy.deepcopy(unet).cpu().double()
    cpu = tree_map(lambda t: t.cpu().double() if t.is_floating_point() else t.cpu(), inputs)
    copy_(**cpu).sample.pow(2).mean().backward()
    largest = max(float(p.grad.abs().max()) for p in copy_.parameters())
    return {name for name, p in copy_.named_parameters()
            if float(p.grad.abs().max()) <= 1e-6 * largest}
