"""[train] gradient_checkpointing_ratio: an evenly spaced share of the blocks recompute.

The numbers must not change (a block computes the same checkpointed or not), and the memory
kept for the backward pass must fall between no checkpointing and checkpointing every
block. Memory is measured as the bytes autograd saves outside the checkpointed blocks
(saved_tensors_hooks see what a non-checkpointed forward keeps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from job.config import JobConfig
from job.errors import ConfigError
from job.speedups.checkpointing import SelectiveCheckpointing, enable_checkpointing
from test_sdxl_family import SIZES, load_family, make_batch, models_dir  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sd3_step  # noqa: E402
import stage_c_step  # noqa: E402


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_calls_are_chosen_evenly(ratio: float) -> None:
    selector = SelectiveCheckpointing(ratio)
    chosen = [selector.chosen(i) for i in range(12)]
    assert sum(chosen) == int(12 * ratio)
    if ratio == 0.5:
        assert chosen == [False, True] * 6
    if ratio == 1.0:
        assert all(chosen)


def test_ratio_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SelectiveCheckpointing(0.0)


def sd3_model_and_call():
    torch.manual_seed(0)
    model = sd3_step.SD3Transformer2DModel(**sd3_step.TINY).train()
    batch = sd3_step.make_batch(sd3_step.TINY, 2, 64, torch.device("cpu"))

    def call():
        return model(hidden_states=batch["latents"], timestep=torch.tensor([100.0, 700.0]),
                     encoder_hidden_states=batch["text.prompt_embeds"],
                     pooled_projections=batch["text.pooled_prompt_embeds"], return_dict=False)[0]
    return model, call


def stage_c_model_and_call():
    model = stage_c_step.make_prior(stage_c_step.TINY, torch.device("cpu"), torch.float32)
    model.train()
    for module in model.modules():  # dropout would make two forwards differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = stage_c_step.make_batch(stage_c_step.TINY, 2, torch.device("cpu"))
    clip_img = torch.zeros(2, 1, stage_c_step.TINY["clip_image_in_channels"])

    def call():
        return model(sample=batch["latents"], timestep_ratio=torch.tensor([0.3, 0.8]),
                     clip_text_pooled=batch["text.prompt_embeds_pooled"].float(),
                     clip_text=batch["text.prompt_embeds"].float(), clip_img=clip_img,
                     return_dict=False)[0]
    return model, call


def loss_grads_and_saved_bytes(model, call):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = call().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("build", [sd3_model_and_call, stage_c_model_and_call],
                         ids=["sd3", "stage_c"])
def test_same_numbers_and_memory_between_the_ends(build) -> None:
    model, call = build()
    plain_loss, plain_grads, plain_bytes = loss_grads_and_saved_bytes(model, call)
    model.enable_gradient_checkpointing()
    _, _, full_bytes = loss_grads_and_saved_bytes(model, call)
    enable_checkpointing(model, 0.5)
    loss, grads, half_bytes = loss_grads_and_saved_bytes(model, call)
    selector = next(m._gradient_checkpointing_func for m in model.modules()
                    if isinstance(getattr(m, "_gradient_checkpointing_func", None),
                                  SelectiveCheckpointing))
    checkpointed, calls = selector.checkpointed, selector.calls
    assert calls >= 2 and checkpointed == calls // 2
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)
    assert full_bytes < half_bytes < plain_bytes


def test_the_family_uses_the_ratio(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, train={"gradient_checkpointing": True,
                                                      "gradient_checkpointing_ratio": 0.5})
    family.add_lora()
    batch = make_batch(family, SIZES)
    timesteps = torch.tensor([10, 700])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    family.eval_loss(batch, timesteps, noise).mean().backward()
    selectors = {m._gradient_checkpointing_func for m in family.unet.modules()
                 if getattr(m, "gradient_checkpointing", False)}
    assert len(selectors) == 1
    selector = selectors.pop()
    assert isinstance(selector, SelectiveCheckpointing)
    assert selector.calls >= 4 and selector.checkpointed == selector.calls // 2


def config(**train) -> dict:
    return {"job": {"name": "t", "output_dir": "/tmp/t"},
            "model": {"family": "kandinsky5-image", "model_type": "lora"},
            "train": {"max_train_steps": 1, **train},
            "datasets": [{"id": "x", "instance_data_dir": "/tmp/none", "synthetic_images": 1}]}


def test_group_offload_needs_every_block_checkpointed() -> None:
    from job.config import check_rules

    cfg = JobConfig.model_validate({**config(gradient_checkpointing=True,
                                             gradient_checkpointing_ratio=0.5),
                                    "speedups": {"enable_group_offload": True}})
    with pytest.raises(ConfigError, match="gradient_checkpointing_ratio = 1.0"):
        check_rules(cfg)


def test_ratio_without_checkpointing_is_said_to_be_ignored() -> None:
    from job.config import check_rules

    notes = check_rules(JobConfig.model_validate(config(gradient_checkpointing_ratio=0.5)))
    assert any("gradient_checkpointing_ratio is ignored" in n for n in notes)


def test_compiled_dit_blocks_keep_the_selective_checkpoint() -> None:
    """With compile_blocks, a DiT's blocks (SD3's) keep the family's selective checkpoint
    (the UNets' blocks recompute inside their graphs instead): half of them recompute, with
    the same numbers as the plain model."""
    from job.speedups.compile import apply_regional_compile

    model, call = sd3_model_and_call()
    plain_loss, plain_grads, _ = loss_grads_and_saved_bytes(model, call)
    selector = enable_checkpointing(model, 0.5)
    apply_regional_compile(model, backend="eager", recompute_inside=0.5)
    loss, grads, _ = loss_grads_and_saved_bytes(model, call)
    assert selector.calls >= 2 and selector.checkpointed == selector.calls // 2
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)
