"""[speedups] compile_blocks: every repeated block compiled in place, the loss unchanged.

The CPU test compiles with dynamo's aot_eager backend (graph capture and autograd, no code
generation), which must give the same numbers; inductor's speed is measured on the GPU
(bench/sd3_step.py --compile, bench/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from job.speedups.compile import apply_regional_compile
from test_sdxl_family import SIZES, load_family, make_batch, models_dir  # noqa: F401 (fixture)


def test_compiled_blocks_give_the_same_loss_and_gradients(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    family.add_lora()
    batch = make_batch(family, SIZES)
    timesteps, noise = torch.tensor([10, 700]), torch.randn(batch["latents"].shape,
                                                            generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        loss = family.eval_loss(batch, timesteps, noise).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in family.unet.named_parameters() if p.grad is not None}
        family.unet.zero_grad(set_to_none=True)
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads()
    compiled = apply_regional_compile(family.unet, backend="aot_eager")
    kinds = {type(m).__name__ for m in family.unet.modules() if getattr(m, "_compiled_call_impl", None)}
    assert compiled > 0 and kinds == {"BasicTransformerBlock", "ResnetBlock2D"}
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_kandinsky5_compiled_blocks_with_token_routing_give_the_same_loss_and_gradients(
        tmp_path: Path) -> None:
    """Kandinsky 5's blocks compiled, with a TREAD route through them (its hooks run
    inside the compiled call) and gradient checkpointing: the same loss and gradients."""
    from job.speedups.tread import TokenRouter
    from test_kandinsky5_family import load_family as load_kandinsky5
    from test_kandinsky5_family import make_batch as kandinsky5_batch

    family = load_kandinsky5(tmp_path, tmp_path / "models",
                             train={"gradient_checkpointing": True})
    family.transformer.enable_gradient_checkpointing()
    family.add_lora()
    family.router = TokenRouter(family.transformer.visual_transformer_blocks, [(1, 2, 0.5)])
    batch = kandinsky5_batch(family)

    def loss_and_grads():
        loss = family.training_loss(batch, torch.Generator().manual_seed(3)).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in family.transformer.named_parameters()
                 if p.grad is not None}
        family.transformer.zero_grad(set_to_none=True)
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads()
    assert apply_regional_compile(family.transformer, backend="aot_eager") == 1 + 4
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch) -> None:
    import shutil

    import pytest

    from job.errors import ConfigError
    from job.speedups import compile as compile_speedup

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C compiler") as raised:
        compile_speedup.check_compiler(torch.device("cuda"))
    assert "apt-get install gcc" in raised.value.hint
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        compile_speedup.check_compiler(torch.device("cpu"))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)
    compile_speedup.check_compiler(torch.device("cuda"))  # a C compiler: enough on a GPU
    with pytest.raises(ConfigError):
        compile_speedup.check_compiler(torch.device("cpu"))  # but not for CPU kernels
    compile_speedup.check_compiler(torch.device("cpu"), backend="aot_eager")  # no codegen


def test_unet_blocks_compile_static_and_transformer_blocks_keep_the_default(monkeypatch) -> None:
    """Static shapes where dynamic kernels are slow (the UNets' convolution blocks); torch's
    default where token counts vary per caption or bucket (the DiTs)."""
    import sys

    from job.speedups import compile as compile_speedup

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import kandinsky5_step
    import lcm_step

    seen: dict[str, set] = {}

    def record(module, *args, **kwargs):
        seen.setdefault(type(module).__name__, set()).add(kwargs.get("dynamic"))

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    unet = lcm_step.make_unet(lcm_step.TINY_UNET, torch.device("cpu"), torch.float32)
    k5 = kandinsky5_step.make_transformer(kandinsky5_step.TINY, torch.device("cpu"), torch.float32)
    assert compile_speedup.apply_regional_compile(unet) > 0
    assert compile_speedup.apply_regional_compile(k5) > 0
    assert seen == {"ResnetBlock2D": {False}, "BasicTransformerBlock": {False},
                    "Kandinsky5TransformerEncoderBlock": {None},
                    "Kandinsky5TransformerDecoderBlock": {None}}


def test_cuda_graphs_go_to_the_static_shape_blocks_only(monkeypatch) -> None:
    """`cuda_graphs` gives the UNets' blocks inductor's reduce-overhead mode; a DiT block
    keeps the default mode (dynamic shapes would record a graph per token count)."""
    from torch import nn

    import job.speedups.compile as compile_module

    class ResnetBlock2D(nn.Linear):
        pass

    class JointTransformerBlock(nn.Linear):
        pass

    calls = {}
    monkeypatch.setattr(nn.Module, "compile",
                        lambda self, **kw: calls.setdefault(type(self).__name__, kw))
    model = nn.Sequential(ResnetBlock2D(2, 2), JointTransformerBlock(2, 2))
    assert compile_module.apply_regional_compile(model, cuda_graphs=True) == 2
    assert calls["ResnetBlock2D"] == {"backend": "inductor", "dynamic": False,
                                      "mode": "reduce-overhead"}
    assert calls["JointTransformerBlock"] == {"backend": "inductor", "dynamic": None,
                                              "mode": None}
    calls.clear()
    compile_module.apply_regional_compile(model)
    assert calls["ResnetBlock2D"]["mode"] is None


def test_cuda_graphs_step_aside_for_checkpointing_and_offload(tmp_path: Path) -> None:
    from helpers import tiny_job_config

    from job.speedups.compile import cuda_graphs_off_because

    on = {"cuda_graphs": True}
    assert cuda_graphs_off_because(tiny_job_config(tmp_path, speedups=on)) is None
    assert "checkpointing" in cuda_graphs_off_because(
        tiny_job_config(tmp_path, speedups=on, train={"gradient_checkpointing": True}))
    assert cuda_graphs_off_because(tiny_job_config(tmp_path)) == "speedups.cuda_graphs = false"
