"""[speedups] compile_blocks: every repeated block compiled in place, the loss unchanged.

The CPU test compiles with dynamo's aot_eager backend (graph capture and autograd, no code
generation), which must give the same numbers; inductor's speed is measured on the GPU
(bench/sd3_step.py --compile, bench/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from job.speedups.compile import apply_regional_compile
from test_sdxl_family import SIZES, load_family, make_batch, models_dir  # noqa: F401 (fixture)


def loss_and_grads(loss_fn, module: torch.nn.Module):
    """loss_fn()'s loss and the gradients it gives `module`'s parameters (then cleared)."""
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_numbers(got, expected) -> None:
    """Two loss_and_grads results agree (the same parameters have gradients)."""
    (loss, grads), (plain_loss, plain_grads) = got, expected
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def lora_unet_loss(tmp_path: Path, models_dir: Path):
    """The tiny SDXL family with a LoRA, and a function giving its eval loss on one fixed
    batch, timesteps and noise (the comparisons below run it before and after compiling)."""
    family = load_family(tmp_path, models_dir)
    family.add_lora()
    batch = make_batch(family, SIZES)
    timesteps = torch.tensor([10, 700])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))

    def run():
        return family.eval_loss(batch, timesteps, noise).mean()

    return family, run


def test_compiled_blocks_give_the_same_loss_and_gradients(tmp_path: Path, models_dir: Path) -> None:
    family, run = lora_unet_loss(tmp_path, models_dir)

    plain = loss_and_grads(run, family.unet)
    compiled = apply_regional_compile(family.unet, backend="aot_eager")
    kinds = {type(m).__name__ for m in family.unet.modules() if getattr(m, "_compiled_call_impl", None)}
    assert compiled > 0 and kinds == {"BasicTransformerBlock", "ResnetBlock2D"}
    assert_same_numbers(loss_and_grads(run, family.unet), plain)


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

    def run():
        return family.training_loss(batch, torch.Generator().manual_seed(3)).mean()

    plain = loss_and_grads(run, family.transformer)
    assert apply_regional_compile(family.transformer, backend="aot_eager") == 1 + 4
    assert_same_numbers(loss_and_grads(run, family.transformer), plain)


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


def test_compile_without_the_python_headers_is_a_clear_error(monkeypatch, tmp_path) -> None:
    """gcc without python3-dev: Triton's launcher (and inductor's C++ kernels) include
    Python.h, so an explicit compile_blocks = true is exit 2 naming the missing header,
    and "auto" stays off with the reason."""
    import shutil
    import sysconfig

    from helpers import tiny_job_config

    from job.errors import ConfigError
    from job.speedups import compile as compile_speedup

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    with pytest.raises(ConfigError, match="needs the Python headers, and .*Python.h is missing") \
            as raised:
        compile_speedup.check_compiler(torch.device("cuda"))
    assert "python3-dev" in raised.value.hint
    cfg = tiny_job_config(tmp_path)
    compile_speedup.resolve_auto(cfg, torch.device("cuda"))
    assert cfg.speedups.compile_blocks is False
    (tmp_path / "Python.h").write_text("")
    compile_speedup.check_compiler(torch.device("cuda"))  # headers there: nothing missing


def test_auto_speedups_decide_per_device_family_and_settings(tmp_path: Path,
                                                            monkeypatch) -> None:
    """compile_blocks, channels_last and cuda_graphs default to "auto": on a CUDA GPU with a
    C compiler compile (and channels_last with it) is on, cuda_graphs only where a GPU run
    measured it (an sdxl LoRA on an unquantised base, checkpointing all blocks or none; the
    Stage C prior in bf16 without checkpointing);
    compile is off on the CPU, without a compiler (no error: the default asks for
    nothing), with a quantised base, group offload or fsdp2. An explicit true without a
    compiler is still exit 2, and an explicit setting is never changed."""
    import shutil

    from helpers import tiny_job_config

    from job.errors import ConfigError
    from job.speedups.compile import resolve_auto

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)

    def decided(device, **overrides):
        cfg = tiny_job_config(tmp_path, **overrides)
        resolve_auto(cfg, device)
        s = cfg.speedups
        return s.compile_blocks, s.channels_last, s.cuda_graphs

    on = (True, True, True)
    assert decided(gpu) == on
    assert decided(gpu, train={"gradient_checkpointing": True}) == on
    assert decided(cpu) == (False, False, False)
    assert decided(gpu, speedups={"channels_last": False}) == (True, False, True)
    assert decided(gpu, speedups={"cuda_graphs": False}) == (True, True, False)
    # Compile off (and NHWC with it): not measured compiled.
    assert decided(gpu, speedups={"base_model_precision": "int8-torchao"}) == (False, False,
                                                                               False)
    offload = {"family": "kandinsky5-image", "flavour": "tiny",
               "hub_cache_dir": str(tmp_path / "models")}
    assert decided(gpu, model=offload, train={"gradient_checkpointing": True},
                   speedups={"enable_group_offload": True})[:2] == (False, False)
    assert decided(gpu, model={"model_type": "full"},
                   distributed={"strategy": "fsdp2"})[:2] == (False, False)
    # fsdp2 with compile asked for: NHWC stays off (FSDP2 shards contiguous weights only).
    assert decided(gpu, model={"model_type": "full"}, distributed={"strategy": "fsdp2"},
                   speedups={"compile_blocks": True})[:2] == (True, False)
    # The Stage C prior: graphs in bf16 without checkpointing (lite: 2.14x with, 1.42x
    # without); off with checkpointing (no gain measured) and in fp32 (not measured).
    stage_c = {"family": "stable_cascade", "flavour": "tiny",
               "hub_cache_dir": str(tmp_path / "models")}
    assert decided(gpu, model=stage_c, train={"mixed_precision": "bf16"}) == on
    assert decided(gpu, model=stage_c, train={"mixed_precision": "bf16",
                                              "gradient_checkpointing": True}) == (True, True,
                                                                                   False)
    assert decided(gpu, model=stage_c, train={"mixed_precision": "no"}) == (True, True, False)
    # Compile on, graphs off: not measured with graphs.
    assert decided(gpu, model={"model_type": "full"}) == (True, True, False)
    assert decided(gpu, distillation={"method": "lcm"}) == (True, True, False)
    assert decided(gpu, train={"gradient_checkpointing": True,
                               "gradient_checkpointing_ratio": 0.5}) == (True, True, False)
    # No compiler: auto stays quiet and off; an explicit true is exit 2 with the fix.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert decided(gpu) == (False, False, False)
    cfg = tiny_job_config(tmp_path, speedups={"compile_blocks": True})
    with pytest.raises(ConfigError, match="needs a C compiler"):
        resolve_auto(cfg, gpu)


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


def test_cuda_graphs_step_aside_for_offload_and_the_cpu(tmp_path: Path) -> None:
    from helpers import tiny_job_config

    from job.speedups.compile import cuda_graphs_off_because

    on, gpu = {"cuda_graphs": True}, torch.device("cuda")
    assert cuda_graphs_off_because(tiny_job_config(tmp_path, speedups=on), gpu) is None
    # Ratio 1: the recompute is inside each block's graph, which replays like any other.
    assert cuda_graphs_off_because(
        tiny_job_config(tmp_path, speedups=on, train={"gradient_checkpointing": True}), gpu) \
        is None
    # Ratio 0.5 too: the blocks that recompute do it inside their graphs, the rest do not.
    assert cuda_graphs_off_because(
        tiny_job_config(tmp_path, speedups=on, train={"gradient_checkpointing": True,
                                                      "gradient_checkpointing_ratio": 0.5}),
        gpu) is None
    assert cuda_graphs_off_because(tiny_job_config(tmp_path, speedups={"cuda_graphs": False}),
                                   gpu) == "speedups.cuda_graphs = false"
    assert cuda_graphs_off_because(tiny_job_config(tmp_path, speedups=on),
                                   torch.device("cpu")) == "no CUDA GPU"


def _saved_bytes(run, module: torch.nn.Module) -> tuple[object, int]:
    """run()'s result and the activation bytes autograd saved for backward while it ran:
    each storage once, however many saved tensors view it, and not `module`'s weights (a
    compiled graph saves the weights it needs; eager autograd holds them anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(saved.values())


def test_recompute_inside_compiled_blocks_gives_the_same_numbers_and_saves_less(
        tmp_path: Path, models_dir: Path) -> None:
    """Gradient checkpointing moved inside the compiled blocks: the loss and gradients of
    diffusers' own checkpointing, no more saved activations than it keeps (issue 9: peak
    within 10% of the checkpointed reference), the blocks of a kind still share their
    graphs (no recompile per block), and no block's graph breaks."""
    family, run = lora_unet_loss(tmp_path, models_dir)

    _, everything = _saved_bytes(run, family.unet)
    family.unet.enable_gradient_checkpointing()
    plain = loss_and_grads(run, family.unet)
    _, kept = _saved_bytes(run, family.unet)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # aot_eager_decomp_partition: aot_eager with inductor's partitioner, the one that
    # decides what a compiled backward recomputes.
    blocks = apply_regional_compile(family.unet, backend="aot_eager_decomp_partition",
                                    recompute_inside=1.0)
    assert_same_numbers(loss_and_grads(run, family.unet), plain)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs < blocks
    # Each block is one graph: a break would run its recompute eagerly.
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    _, inside = _saved_bytes(run, family.unet)
    # Measured: 0.35 MB inside, 0.41 MB with diffusers' checkpointing, 3.1 MB without.
    assert inside <= 1.1 * kept and inside < 0.2 * everything, (inside, kept, everything)


def test_half_the_blocks_recompute_inside_at_ratio_one_half(tmp_path: Path,
                                                           models_dir: Path) -> None:  # noqa: F811
    """Selective checkpointing with compiled blocks (gradient_checkpointing_ratio 0.5): every
    other static-shape block, in module order, recomputes inside its graph, the rest keep
    their activations; the loss and gradients are the uncompiled UNet's, and the saved
    activations fall between all and none recomputing."""
    from job.speedups.compile import BLOCK_CLASSES, STATIC_SHAPE_CLASSES

    family, run = lora_unet_loss(tmp_path, models_dir)

    plain = loss_and_grads(run, family.unet)
    _, everything = _saved_bytes(run, family.unet)
    family.unet.enable_gradient_checkpointing()
    _, all_recompute = _saved_bytes(run, family.unet)
    torch._dynamo.reset()
    apply_regional_compile(family.unet, backend="aot_eager_decomp_partition",
                           recompute_inside=0.5)
    static = [m for m in family.unet.modules()
              if type(m).__name__ in BLOCK_CLASSES & STATIC_SHAPE_CLASSES]
    recomputing = ["forward" in vars(m) for m in static]
    assert recomputing == [i % 2 == 1 for i in range(len(static))]
    assert_same_numbers(loss_and_grads(run, family.unet), plain)
    _, half = _saved_bytes(run, family.unet)
    assert all_recompute < half < everything, (all_recompute, half, everything)


def test_activation_memory_budget_keeps_less_and_gives_the_same_numbers(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """[train] activation_memory_budget: torch's partitioner keeps that share of the
    compiled blocks' activations and recomputes the rest; the loss and gradients are the
    uncompiled UNet's, and a smaller budget keeps less (measured on the tiny UNet, aot_eager
    with inductor's partitioner)."""
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "activation_memory_budget",
                        functorch_config.activation_memory_budget)  # restored afterwards
    family, run = lora_unet_loss(tmp_path, models_dir)

    plain = loss_and_grads(run, family.unet)
    saved = {}
    for budget in (1.0, 0.5, 0.1):
        torch._dynamo.reset()  # the budget is read when a graph compiles
        unet = family.unet
        apply_regional_compile(unet, backend="aot_eager_decomp_partition",
                               memory_budget=budget)
        assert functorch_config.activation_memory_budget == budget
        assert_same_numbers(loss_and_grads(run, unet), plain)
        _, saved[budget] = _saved_bytes(run, unet)
    assert saved[0.1] < saved[0.5] < saved[1.0], saved


def test_activation_memory_budget_needs_compiled_blocks(tmp_path: Path) -> None:
    from helpers import tiny_job_config

    from job.config import check_rules
    from job.errors import ConfigError
    from job.speedups.compile import resolve_auto

    budget = {"activation_memory_budget": 0.5}
    with pytest.raises(ConfigError, match="compile_blocks = false.*\n.*set compile_blocks"):
        check_rules(tiny_job_config(tmp_path, train=budget, speedups={"compile_blocks": False}))
    cfg = tiny_job_config(tmp_path, train=budget)  # compile_blocks "auto": off on the CPU
    check_rules(cfg)
    with pytest.raises(ConfigError, match="auto turned off here .no CUDA GPU"):
        resolve_auto(cfg, torch.device("cpu"))


def test_stage_c_prior_recomputes_inside_its_compiled_blocks(tmp_path: Path) -> None:
    """The Stage C prior's blocks (called by position, some with the text or the
    timestep embedding) checkpointed inside their compiled graphs: the same loss and
    gradients as diffusers' checkpointing."""
    from stage_c_helpers import load_family as load_stage_c
    from stage_c_helpers import make_batch as stage_c_batch

    family = load_stage_c(tmp_path, tmp_path / "models")
    family.add_lora()
    batch = stage_c_batch(family)
    family.prior.enable_gradient_checkpointing()

    def run():
        return family.training_loss(batch, torch.Generator().manual_seed(5)).mean()

    plain = loss_and_grads(run, family.prior)
    apply_regional_compile(family.prior, backend="aot_eager_decomp_partition",
                           recompute_inside=1.0)
    assert_same_numbers(loss_and_grads(run, family.prior), plain)


def _dropout_prior():
    """A tiny Stage C prior with the release's block types and dropout (0.3, so a wrong mask
    shows), in float64 for a finite-difference check; only the attention layers train, as
    a LoRA on them would, so the first blocks have nothing to differentiate."""
    from stage_c_helpers import small_prior

    prior = small_prior(width=32, conditioning_dim=32, clip_dim=24, dropout=0.3).train().double()
    for name, p in prior.named_parameters():
        p.requires_grad_(".attention." in name)
    return prior


def _directional_derivatives(prior: torch.nn.Module,
                             before_forward=lambda: None) -> tuple[float, float]:
    """The gradient of the loss along a random direction of the trainable weights, from
    backward and from central differences of the loss with the same dropout masks (the
    same seed before each forward); `before_forward` runs before each forward (the CUDA
    graph mark on a GPU)."""
    g = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64),
              "timestep_ratio": torch.rand(2, generator=g, dtype=torch.float64),
              "clip_text": torch.randn(2, 5, 24, generator=g, dtype=torch.float64),
              "clip_text_pooled": torch.randn(2, 1, 24, generator=g, dtype=torch.float64),
              "clip_img": torch.zeros(2, 1, 24, dtype=torch.float64)}
    device = next(prior.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    params = [p for p in prior.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(device) for p in params]

    def loss():
        before_forward()
        torch.manual_seed(5)
        return prior(**inputs, return_dict=False)[0].pow(2).mean()

    loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps, sides = 1e-5, []
    for sign in (1, -2):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        # With gradients on, as in the first forward: a compiled no-grad graph is another
        # graph, and inductor draws its random numbers differently there.
        sides.append(loss().item())
    return analytic, (sides[0] - sides[1]) / (2 * eps)


@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", "inductor"])
def test_dropout_blocks_recompute_inside_with_the_forward_masks(backend: str) -> None:
    """The released Stage C prior's blocks draw dropout masks. Recomputed inside their
    compiled graphs, the backward must use the forward's masks: the gradient along a random
    direction equals the loss's central difference at the same masks. A recompute that
    draws fresh masks (diffusers' checkpoint without preserve_rng_state, the control) is
    caught by the same check. The first blocks, which nothing trains, run plainly (torch
    cannot recompute random ops in their inference graphs: it raised before)."""
    from functools import partial
    from types import MethodType

    from torch.utils.checkpoint import checkpoint

    from job.speedups.compile import STATIC_SHAPE_CLASSES

    prior = _dropout_prior()
    apply_regional_compile(prior, backend=backend, recompute_inside=1.0)
    analytic, numeric = _directional_derivatives(prior)
    assert analytic == pytest.approx(numeric, rel=1e-5)

    control = _dropout_prior()
    fresh = partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    for block in control.modules():
        if type(block).__name__ in STATIC_SHAPE_CLASSES:
            block.forward = MethodType(lambda self, *a, forward=block.forward: fresh(forward, *a),
                                       block)
    analytic, numeric = _directional_derivatives(control)
    assert analytic != pytest.approx(numeric, rel=1e-2)


def test_with_checkpointing_the_static_blocks_still_get_cuda_graphs(monkeypatch) -> None:
    """With gradient checkpointing and cuda_graphs, every static-shape block recomputes
    inside its graph, a block with dropout too, and replays as a CUDA graph."""
    from torch import nn

    class SDCascadeResBlock(nn.Sequential):
        pass

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = SDCascadeResBlock(nn.Linear(2, 2))
            self.dropping = SDCascadeResBlock(nn.Linear(2, 2), nn.Dropout(0.1))

        def enable_gradient_checkpointing(self, gradient_checkpointing_func=None):
            self.func = gradient_checkpointing_func

    modes = {}
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: modes.__setitem__(
        "dropping" if any(isinstance(m, nn.Dropout) for m in self.modules()) else "plain",
        kw["mode"]))
    model = Model()
    apply_regional_compile(model, cuda_graphs=True, recompute_inside=1.0)
    assert modes == {"plain": "reduce-overhead", "dropping": "reduce-overhead"}
    assert "forward" in vars(model.plain) and "forward" in vars(model.dropping)


def _family_with_batch(kind: str, tmp_path: Path):
    """A tiny family of `kind` with a LoRA, its denoiser and a training batch."""
    models = tmp_path / "models"
    if kind == "sdxl":
        family = load_family(tmp_path, models)
        batch = make_batch(family, SIZES)
    elif kind == "sd3":
        import sd3_helpers

        family = sd3_helpers.load_family(tmp_path, models)
        batch = sd3_helpers.make_batch(family)
    elif kind == "stable_cascade":
        import stage_c_helpers

        family = stage_c_helpers.load_family(tmp_path, models)
        batch = stage_c_helpers.make_batch(family)
    else:
        import test_kandinsky5_family as kandinsky5

        family = kandinsky5.load_family(tmp_path, models)
        batch = kandinsky5.make_batch(family)
    family.add_lora()
    return family, family.denoiser(), batch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("kind", ["sdxl", "sd3", "stable_cascade", "kandinsky5-image"])
def test_no_compiled_block_breaks_its_graph(kind: str, checkpointing: bool,
                                            tmp_path: Path) -> None:
    """A training step of every family with compiled blocks, with and without gradient
    checkpointing, traces each block into whole graphs: a graph break runs the rest of
    the block eagerly (the speedup silently lost)."""
    family, denoiser, batch = _family_with_batch(kind, tmp_path)
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert apply_regional_compile(denoiser, backend="aot_eager",
                                  recompute_inside=1.0 if checkpointing else 0.0) > 0
    family.training_loss(batch, torch.Generator().manual_seed(0)).mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])


@pytest.fixture
def inductor_cache_env(monkeypatch: pytest.MonkeyPatch):
    """No TORCHINDUCTOR_CACHE_DIR and no earlier job's setting; both put back afterwards."""
    import job.speedups.compile as compile_module

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_module, "_cache_set", None)
    return compile_module


def test_compiled_kernels_are_kept_on_the_cache_volume(tmp_path: Path, inductor_cache_env,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With compile_blocks, inductor's cache moves to <cache.dir>/compile, where a retry in a
    new container finds it; a compile then writes its entries there."""
    import os

    from helpers import tiny_job_config

    use = inductor_cache_env.use_compile_cache
    cfg = tiny_job_config(tmp_path, speedups={"compile_blocks": True},
                          cache={"dir": str(tmp_path / "a")})
    folder = str((tmp_path / "a" / "compile").resolve())
    assert use(cfg) == folder and os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    # The next job of the same process (tests, a notebook) moves it to its own cache.
    other = tiny_job_config(tmp_path, speedups={"compile_blocks": True},
                            cache={"dir": str(tmp_path / "b")})
    assert use(other) == str((tmp_path / "b" / "compile").resolve())
    # torch's own default (set once it compiled something) is not the user's choice.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert use(cfg) == folder

    missing, _ = inductor_cache_env._compiler_missing(torch.device("cpu"))
    if missing:
        pytest.skip(f"the compile check needs {missing}")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 3).sin().sum(), backend="inductor")
    compiled(torch.randn(16))
    assert list(Path(folder).rglob("*.py")), "no compiled code under the job's cache folder"


def test_compile_cache_leaves_the_users_folder_and_can_be_turned_off(
        tmp_path: Path, inductor_cache_env, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from helpers import tiny_job_config

    use = inductor_cache_env.use_compile_cache
    on = {"compile_blocks": True}
    # Not compiling: nothing to keep, the environment untouched.
    assert use(tiny_job_config(tmp_path, speedups={"compile_blocks": False})) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert use(tiny_job_config(tmp_path, speedups=on, cache={"compile_kernels": False})) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # A folder that cannot be made (a file in the way): a warning, torch's default kept.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compile").write_text("")
    assert use(tiny_job_config(tmp_path, speedups=on, cache={"dir": str(tmp_path / "c")})) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # A volume that refuses flock (inductor's cache locks its entries): the same.
    import fcntl

    def refuse(fd, op):
        raise OSError(38, "Function not implemented")

    with monkeypatch.context() as patched:
        patched.setattr(fcntl, "flock", refuse)
        assert use(tiny_job_config(tmp_path, speedups=on,
                                   cache={"dir": str(tmp_path / "d")})) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # A noexec mount (compiled libraries are loaded from the folder): the same.
    real = os.statvfs
    with monkeypatch.context() as patched:
        patched.setattr(os, "statvfs", lambda path: type("V", (), {
            "f_flag": real(path).f_flag | os.ST_NOEXEC})())
        assert use(tiny_job_config(tmp_path, speedups=on,
                                   cache={"dir": str(tmp_path / "e")})) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # A later job of the process without the cache does not inherit an earlier one's.
    assert use(tiny_job_config(tmp_path, speedups=on, cache={"dir": str(tmp_path / "f")}))
    assert use(tiny_job_config(tmp_path, speedups=on, cache={"compile_kernels": False})) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert [p.name for p in (tmp_path / "f" / "compile").iterdir()] == []  # probes removed
    # The user's own folder wins.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use(tiny_job_config(tmp_path, speedups=on)) == str(tmp_path / "mine")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
