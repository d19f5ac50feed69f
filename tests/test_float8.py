"""[speedups] fp8_base_matmuls: a LoRA's frozen DiT block linears multiply in float8.

The layer approximates the bf16 matmul (e4m3 keeps 3 mantissa bits, row-wise scales), so
the checks bound the error against the exact product instead of asking for equality, and
check what must be exact: which layers are replaced, that the LoRA still trains, that the
frozen weights get no gradient. The speed is measured on the GPU (bench/sd3_step.py --fp8).
CPU: torch's reference _scaled_mm runs the same float8 math."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from helpers import relative_error
from job.config import JobConfig, check_rules
from job.errors import ConfigError
from job.speedups.float8 import (E4M3, Float8FrozenLinear, apply_float8_base, quantize_rows)
from test_sd3_run import rows, sd3_job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sd3_step  # noqa: E402


def test_rows_quantise_within_e4m3_precision() -> None:
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8).view(-1, 1)  # rows of very different size
    x[3] = 0  # an all-zero row must not divide by zero
    values, scales = quantize_rows(x)
    assert values.dtype == E4M3 and scales.shape == (8, 1) and scales.dtype == torch.float32
    back = values.float() * scales
    assert torch.isfinite(back).all() and back[3].abs().max() == 0
    # e4m3: 3 mantissa bits, so every element within 2**-4 of itself (relative), per row
    # scaled so the largest element maps to the format's largest value.
    nonzero = x.abs() > x.abs().amax(dim=1, keepdim=True) * 2 ** -6
    assert ((back - x).abs()[nonzero] <= x.abs()[nonzero] * 2 ** -4 + 1e-12).all()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_layer_approximates_the_linear_and_its_input_gradient(autocast: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96).requires_grad_(False)
    layer = Float8FrozenLinear(linear)
    x = torch.randn(3, 20, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, exact = layer(x), linear(x)
    assert y.shape == exact.shape and y.dtype == exact.dtype  # what nn.Linear returns
    assert relative_error(y, exact) < 0.06
    grad = torch.randn_like(exact)
    (gx,) = torch.autograd.grad(y.to(exact.dtype), x, grad)
    (gx_exact,) = torch.autograd.grad(exact, x, grad)
    assert relative_error(gx, gx_exact) < 0.06
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.w_q.dtype == layer.wt_q.dtype == E4M3 and not hasattr(layer, "weight")


def lora_sd3():
    torch.manual_seed(0)
    model = sd3_step.make_transformer(sd3_step.TINY, torch.device("cpu"), torch.float32)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                 init_lora_weights="gaussian"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at init: lora_A would get no gradient to compare
            param.data.normal_(0, 0.05)
    batch = sd3_step.make_batch(sd3_step.TINY, 2, 64, torch.device("cpu"))
    return model, batch


def loss_and_lora_grads(model, batch):
    """Under bf16 autocast, as training runs (the float8 layers return bf16, as autocast's
    linears do)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(hidden_states=batch["latents"], timestep=torch.tensor([200.0, 800.0]),
                    encoder_hidden_states=batch["text.prompt_embeds"],
                    pooled_projections=batch["text.pooled_prompt_embeds"], return_dict=False)[0]
    loss = (out.float() - batch["latents"]).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_sd3_block_linears_are_replaced_and_the_lora_still_learns() -> None:
    model, batch = lora_sd3()
    exact_loss, exact_grads = loss_and_lora_grads(model, batch)
    block_linears = [n for n, m in model.named_modules()
                     if type(m) is torch.nn.Linear and n.startswith("transformer_blocks.")
                     and (".attn" in n or ".ff" in n) and not n.endswith("lora_A.default")
                     and not n.endswith("lora_B.default")]
    replaced = apply_float8_base(model, "sd3")
    assert replaced == len(block_linears) > 0
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["transformer_blocks.0.attn.to_q.base_layer"] == "Float8FrozenLinear"
    assert kinds["transformer_blocks.0.ff.net.2"] == "Float8FrozenLinear"  # not a LoRA target
    assert kinds["transformer_blocks.0.norm1.linear"] == "Linear"  # timestep rows: kept
    assert kinds["proj_out"] == "Linear"
    loss, grads = loss_and_lora_grads(model, batch)
    assert abs(loss - exact_loss) / exact_loss < 0.05
    assert grads.keys() == exact_grads.keys() and all("lora_" in n for n in grads)
    for name in grads:
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(),
                                                       exact_grads[name].flatten(), dim=0)
        assert cosine > 0.98, name


def config(**overrides) -> JobConfig:
    base = {"job": {"name": "t", "output_dir": "/tmp/t"},
            "model": {"family": "sd3", "model_type": "lora"},
            "train": {"max_train_steps": 1, "mixed_precision": "bf16"},
            "speedups": {"fp8_base_matmuls": True},
            "datasets": [{"id": "x", "instance_data_dir": "/tmp/none", "synthetic_images": 1}]}
    for table, values in overrides.items():
        base[table] = {**base.get(table, {}), **values}
    return JobConfig.model_validate(base)


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"family": "sdxl"}}, "has no float8 block linears"),
    ({"model": {"model_type": "full"}}, 'model.model_type = "full"'),
    ({"train": {"mixed_precision": "fp16"}}, 'mixed_precision = "fp16"'),
    ({"speedups": {"fp8_base_matmuls": True, "base_model_precision": "int8-torchao"}},
     "base_model_precision"),
    ({"model": {"family": "kandinsky5-image"},
      "train": {"mixed_precision": "bf16", "gradient_checkpointing": True},
      "speedups": {"fp8_base_matmuls": True, "enable_group_offload": True}},
     "enable_group_offload"),
])
def test_settings_it_cannot_work_with_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_rules(config(**overrides))


def test_a_supported_job_passes_the_rules() -> None:
    assert not [n for n in check_rules(config()) if "fp8" in n]


def test_sd3_job_trains_with_float8_matmuls(tmp_path: Path, capsys) -> None:
    from job.run import run_job

    cfg = sd3_job(tmp_path, 'speedups.base_model_precision="no_change"',
                  "speedups.fp8_base_matmuls=true", 'train.mixed_precision="bf16"',
                  "train.max_train_steps=2", "checkpoint.step_interval=2",
                  "validation.step_interval=2")
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps_done"] == 2
    losses = [r["loss"] for r in rows(out, "train")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    log = (out / "metrics.jsonl").read_text()
    assert summary["final_weights"] and "nonfinite_step" not in log
    printed = "".join(capsys.readouterr())
    assert "speedup=fp8_base_matmuls" in printed and "layers=" in printed


def test_kandinsky5_visual_block_linears_are_replaced() -> None:
    import kandinsky5_step

    torch.manual_seed(0)
    model = kandinsky5_step.make_transformer(kandinsky5_step.TINY, torch.device("cpu"),
                                             torch.float32).requires_grad_(False)
    batch = kandinsky5_step.make_batch(kandinsky5_step.TINY, 2, 64, 8, torch.device("cpu"))
    rope = [torch.arange(1), torch.arange(4), torch.arange(4)]

    def output():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(hidden_states=batch["latents"].permute(0, 2, 3, 1)[:, None],
                         encoder_hidden_states=batch["text.prompt_embeds"],
                         pooled_projections=batch["text.pooled_prompt_embeds"],
                         timestep=torch.tensor([300.0, 700.0]), visual_rope_pos=rope,
                         text_rope_pos=torch.arange(8), return_dict=False)[0]

    exact = output()
    replaced = apply_float8_base(model, "kandinsky5-image")
    names = {n for n, m in model.named_modules() if type(m).__name__ == "Float8FrozenLinear"}
    # per block: self- and cross-attention (query, key, value, out) and the two MLP layers
    assert replaced == len(names) == 10 * kandinsky5_step.TINY["num_visual_blocks"]
    assert not any("modulation" in n or n.startswith("text_transformer") for n in names)
    assert relative_error(output(), exact) < 0.1
