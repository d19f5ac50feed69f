"""fp16_flash_attention and Fp32AttnProcessor (job/speedups/attention.py), run through torch's
CPU flash kernels, which take fp16 like the CUDA ones: the attention and its gradients
against float64 SDPA within fp16's input rounding, exactly as well for a batch item whose v
or output gradient is far outside fp16's range (the per-head power-of-two scaling; without
it the same inputs give zeros and NaNs), the processor against diffusers' AttnProcessor2_0
on the Stage C and SDXL blocks, and one graph under torch.compile with its backward; the
CUDA branch's op calls on "meta" tensors (their shape functions). The CUDA kernels'
numbers are tests/test_gpu_fp16_flash_attention.py's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock

import job.speedups.attention as attention
from helpers import relative_error
from job.speedups.attention import (Fp32AttnProcessor, apply_fp16_flash_attention,
                                    fp16_flash_attention)

# fp16 rounds each input to 11 significant bits (2**-11 = 4.9e-4 relative); the sums are
# fp32. Measured here: 4e-4 to 6e-4 per batch item for the output and each gradient.
FP16_ROUNDING = 2e-3


@pytest.fixture
def cpu_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "FP16_FLASH_DEVICES", ("cuda", "cpu"))


def attention_and_grads(fn, q, k, v, grad, dtype):
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(dtype))
    return [t.double() for t in (out, q.grad, k.grad, v.grad)]


def per_item_errors(ours, exact) -> list[list[float]]:
    """For the output and each gradient, the relative error of each batch item."""
    return [[relative_error(a[i], b[i]) for i in range(a.shape[0])] for a, b in zip(ours, exact)]


def far_inputs():
    """Cross-attention (37 queries, 51 keys: not multiples of the kernels' tiles), head dim
    64; batch item 1's v is 1e-7 of the others' (fp16 keeps no digit of it) and item 2's
    1e3; the output gradient of item 0 is 1e-9 (an fp32 step without loss scale: fp16
    flushes it to zero) and of item 2 1e2 (with item 2's v, over 65504 in the kernel)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 64, generator=g) for n in (37, 51, 51))
    grad = torch.randn(3, 2, 37, 64, generator=g)
    v[1] *= 1e-7
    v[2] *= 1e3
    grad[0] *= 1e-9
    grad[2] *= 1e2
    return q, k, v, grad


def test_attention_and_gradients_within_fp16_rounding_at_any_scale() -> None:
    q, k, v, grad = far_inputs()
    exact = attention_and_grads(F.scaled_dot_product_attention, q, k, v, grad, torch.float64)
    ours = attention_and_grads(fp16_flash_attention, q, k, v, grad, torch.float32)
    for name, errors in zip(("out", "dq", "dk", "dv"), per_item_errors(ours, exact)):
        assert max(errors) < FP16_ROUNDING, (name, errors)


def test_without_the_scaling_fp16_loses_those_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails without the power-of-two scaling: it is what saves the items
    outside fp16's range."""
    monkeypatch.setattr(attention, "_pow2_scale",
                        lambda x: torch.ones(x.shape[0], x.shape[1], 1, 1))
    q, k, v, grad = far_inputs()
    exact = attention_and_grads(F.scaled_dot_product_attention, q, k, v, grad, torch.float64)
    ours = attention_and_grads(fp16_flash_attention, q, k, v, grad, torch.float32)
    (out, dq, dk, dv) = per_item_errors(ours, exact)
    assert out[1] > 0.5  # v of 1e-7: mostly flushed
    assert dq[0] == dk[0] == dv[0] == 1.0  # the gradient of 1e-9: all zeros
    assert not torch.isfinite(ours[1][2]).all()  # item 2 overflows
    assert max(out[0], out[2], dv[1]) < FP16_ROUNDING  # the rest as before


def test_pow2_scale_is_exact_per_batch_item_and_head() -> None:
    x = torch.randn(2, 3, 5, 8)
    x[0, 1] *= 1e-20
    x[1, 2] = 0
    scale = attention._pow2_scale(x)
    assert scale.shape == (2, 3, 1, 1)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # a power of two
    largest = (x * scale).abs().amax(dim=(-2, -1))
    assert ((largest >= 1) & (largest < 2) | (largest == 0)).all()
    assert torch.equal(x * scale / scale, x)


def _processors(block: torch.nn.Module, processor) -> None:
    for module in block.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(processor)


def _block(kind: str):
    torch.manual_seed(0)
    if kind == "stage_c":  # 4-D input, self-attention over the image and the conditioning
        block = SDCascadeAttnBlock(c=128, c_cond=32, nhead=2, self_attn=True)  # head dim 64
        inputs = (torch.randn(2, 128, 5, 7), torch.randn(2, 9, 32))
        return block, inputs, lambda b, x, kv: b(x, kv)
    # Self-attention then cross-attention, with the norm and feed-forward around them.
    block = BasicTransformerBlock(128, 2, 64, cross_attention_dim=48)
    inputs = (torch.randn(2, 35, 128), torch.randn(2, 11, 48))
    return block, inputs, lambda b, x, c: b(x, encoder_hidden_states=c)


@pytest.mark.parametrize("kind", ["stage_c", "sdxl"])
def test_processor_gives_attnprocessor2_0s_output_and_gradients(kind: str, cpu_flash: None,
                                                                monkeypatch) -> None:
    calls, apply = [], fp16_flash_attention
    monkeypatch.setattr(attention, "fp16_flash_attention",
                        lambda q, k, v: calls.append(q.shape) or apply(q, k, v))
    block, inputs, call = _block(kind)
    results = []
    for processor in (AttnProcessor2_0(), Fp32AttnProcessor()):
        _processors(block, processor)
        block.zero_grad()
        x = inputs[0].clone().requires_grad_(True)
        out = call(block, x, inputs[1])
        out.square().mean().backward()
        results.append((out.detach(), x.grad, {n: p.grad.clone()
                                               for n, p in block.named_parameters()}))
    # Stage C: one self-attention over 35 image and 9 conditioning tokens; SDXL: self- and
    # cross-attention; 2 heads of 64.
    assert calls == ([torch.Size([2, 2, 35, 64])] if kind == "stage_c" else
                     [torch.Size([2, 2, 35, 64])] * 2), calls
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert relative_error(out_b, out_a) < FP16_ROUNDING
    assert relative_error(gx_b, gx_a) < FP16_ROUNDING
    assert relative_error(torch.cat([g.flatten() for g in gp_b.values()]),
                          torch.cat([g.flatten() for g in gp_a.values()])) < FP16_ROUNDING
    # Each projection on its own too: to_q and to_k take theirs through dq and dk alone.
    projections = [n for n in gp_a if n.endswith(("to_q.weight", "to_k.weight"))]
    assert len(projections) == 2 * len(calls)
    for name in projections:
        assert relative_error(gp_b[name], gp_a[name]) < FP16_ROUNDING, name


def test_bf16_and_odd_head_dims_keep_sdpa(cpu_flash: None, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(attention, "fp16_flash_attention", lambda *a: calls.append(a) or None)
    block = SDCascadeAttnBlock(c=60, c_cond=32, nhead=2, self_attn=True)  # head dim 30
    _processors(block, Fp32AttnProcessor())
    with torch.no_grad():
        block(torch.randn(1, 60, 3, 3), torch.randn(1, 4, 32))
        block, inputs, call = _block("stage_c")
        _processors(block, Fp32AttnProcessor())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            call(block, *inputs)
    assert calls == []


def test_compiled_block_traces_it_into_one_graph_with_its_backward(cpu_flash: None) -> None:
    """As regional compile does on a GPU: the Stage C attention block with the processor,
    compiled with fullgraph (a graph break is an error), forward and backward, gives the
    eager block's output and gradients."""
    block, (x, kv), call = _block("stage_c")
    _processors(block, Fp32AttnProcessor())
    results = []
    for compiled in (False, True):
        block.zero_grad()
        run = torch.compile(block, backend="aot_eager", fullgraph=True) if compiled else block
        torch._dynamo.reset()
        out = call(run, x, kv)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in block.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_nothing_is_swapped_without_cuda() -> None:
    prior = torch.nn.Sequential(SDCascadeAttnBlock(c=64, c_cond=32, nhead=2))
    assert apply_fp16_flash_attention(prior) == 0
    assert type(prior[0].attention.processor) is AttnProcessor2_0


def test_config_rules(tmp_path) -> None:
    """fp32_attention = "fp16_flash" applies to fp32 sdxl and Stage C jobs, compiled or not,
    and refuses allow_tf32 = false (it rounds like TF32; exit 2); elsewhere (another family,
    bf16) it is ignored with a note, never an error."""
    from helpers import tiny_job_config

    from job.config import check_rules
    from job.errors import ConfigError
    from job.speedups.attention import fp16_flash_applies

    flash = {"fp32_attention": "fp16_flash"}
    for speedups in (flash, {**flash, "compile_blocks": False}):
        cfg = tiny_job_config(tmp_path, speedups=speedups)
        assert not any("fp32_attention" in note for note in check_rules(cfg))
        assert fp16_flash_applies(cfg)
    with pytest.raises(ConfigError, match="allow_tf32 = false.*\n.*set allow_tf32 = true"):
        check_rules(tiny_job_config(tmp_path, speedups={**flash, "allow_tf32": False}))
    sd3 = {"model": {"family": "sd3", "flavour": "medium"}}
    bf16 = {"model": {"family": "stable_cascade", "flavour": "tiny"},
            "train": {"mixed_precision": "bf16"}, "job": {"i_know_what_i_am_doing": True}}
    for other, said in ((sd3, "is ignored: family 'sd3'"),
                        (bf16, 'is ignored with mixed_precision = "bf16"')):
        cfg = tiny_job_config(tmp_path, speedups=flash, **other)
        assert any(said in note for note in check_rules(cfg)), check_rules(cfg)
        assert not fp16_flash_applies(cfg)


def test_auto_is_fp16_flash_for_stage_c_fp32_on_a_capable_gpu(tmp_path, monkeypatch) -> None:
    """fp32_attention = "auto" (the default) turns fp16_flash on where GPU runs measured it,
    a Stage C prior trained in fp32 on a CUDA GPU of compute capability 8.0+ with TF32 on,
    and logs why not elsewhere; where no fp32 attention runs through diffusers' Attention
    (another family, bf16) it says nothing. An explicit setting is kept."""
    from helpers import tiny_job_config

    from job.speedups.compile import resolve_auto

    stage_c = {"family": "stable_cascade", "flavour": "tiny",
               "hub_cache_dir": str(tmp_path / "models")}
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability[0])
    logged = []
    import job.speedups.compile as compile_speedup

    class Log:
        def info(self, event, **fields):
            logged.append(fields)
    monkeypatch.setattr(compile_speedup, "get_logger", lambda: Log())

    def decided(device, **overrides):
        cfg = tiny_job_config(tmp_path, speedups={"compile_blocks": False,
                                                  **overrides.pop("speedups", {})},
                              **overrides)
        logged.clear()
        resolve_auto(cfg, device)
        said = next((fields.get("fp32_attention") for fields in logged), None)
        return cfg.speedups.fp32_attention, said

    assert decided(gpu, model=stage_c) == ("fp16_flash", "on")
    assert decided(gpu, model=stage_c, speedups={"fp32_attention": "sdpa"}) == ("sdpa", None)
    assert decided(cpu, model=stage_c) == ("sdpa", "off: no CUDA GPU (the fp16 flash "
                                                   "training kernels are CUDA-only)")
    flavour, said = decided(gpu, model=stage_c, speedups={"allow_tf32": False})
    assert flavour == "sdpa" and "allow_tf32 = false" in said
    flavour, said = decided(gpu)  # sdxl in fp32: correct on a GPU, its speed not measured
    assert flavour == "sdpa" and "not measured on a GPU" in said
    monkeypatch.setattr(torch.version, "hip", "6.2")
    flavour, said = decided(gpu, model=stage_c)
    assert flavour == "sdpa" and "ROCm" in said
    monkeypatch.setattr(torch.version, "hip", None)
    capability[0] = (7, 5)
    flavour, said = decided(gpu, model=stage_c)
    assert flavour == "sdpa" and "compute capability 8.0" in said
    bf16 = decided(gpu, model=stage_c, train={"mixed_precision": "bf16"},
                   job={"i_know_what_i_am_doing": True})
    sd3 = decided(gpu, model={"family": "sd3", "flavour": "medium"})
    assert bf16 == sd3 == ("sdpa", None)


def test_divergence_names_the_setting_only_where_it_runs(tmp_path) -> None:
    from helpers import tiny_job_config

    from job.train.loop import divergence_fix

    flash = tiny_job_config(tmp_path, speedups={"fp32_attention": "fp16_flash"})
    assert 'fp32_attention = "sdpa"' in divergence_fix(flash, torch.device("cuda"))
    assert "fp32_attention" not in divergence_fix(flash, torch.device("cpu"))
    sdpa = tiny_job_config(tmp_path, speedups={"fp32_attention": "sdpa"})
    assert "fp32_attention" not in divergence_fix(sdpa, torch.device("cuda"))
    assert divergence_fix(sdpa, torch.device("cuda")).startswith("lower the learning rate")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("kind", ["sdxl", "stable_cascade"])
def test_compiled_training_step_has_no_graph_break(kind: str, checkpointing: bool, tmp_path,
                                                   cpu_flash: None, monkeypatch) -> None:
    """A training step of the tiny family (its LoRA on the attention projections) with the
    processor on its blocks' attention and regional compile, with and without the recompute
    inside the blocks: every block one graph, the flash path traced (head dims permitting)."""
    from diffusers.models.attention_processor import Attention

    from job.speedups.compile import BLOCK_CLASSES, apply_regional_compile
    from test_compile import _family_with_batch

    family, denoiser, batch = _family_with_batch(kind, tmp_path)
    modules = [m for block in denoiser.modules() if type(block).__name__ in BLOCK_CLASSES
               for m in block.modules() if isinstance(m, Attention)]
    for module in modules:
        module.set_processor(Fp32AttnProcessor())
    calls, forward = [], attention._flash_forward
    monkeypatch.setattr(attention, "_flash_forward",
                        lambda q, k, v: calls.append(q.shape) or forward(q, k, v))
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    apply_regional_compile(denoiser, backend="aot_eager",
                           recompute_inside=1.0 if checkpointing else 0.0)
    family.training_loss(batch, torch.Generator().manual_seed(0)).mean().backward()
    assert modules and calls, (len(modules), calls)
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("mode", ["eager", "compiled", "compiled_dynamic", "checkpointed"])
def test_cuda_kernel_calls_on_meta_tensors(mode: str) -> None:
    """The CUDA branch's calls (their arguments' order and types, what the forward keeps for
    the backward) on "meta" tensors, which run the CUDA flash ops' shape functions: eagerly,
    traced by dynamo as regional compile does (static and dynamic shapes: the sequence
    lengths the backward reads from the shapes become SymInts), and inside a non-reentrant
    checkpoint. A wrong argument count or type, or q and k swapped, is an error here without
    a GPU (the CPU ops take different ones); the shape functions do not see the values, so
    the numbers are the GPU test's."""
    from torch.utils.checkpoint import checkpoint

    def heads(length: int) -> torch.Tensor:  # [B, H, S, D] views of [B, S, H, D], as _heads
        return torch.empty(2, length, 4, 64, device="meta").transpose(1, 2).requires_grad_(True)

    q, k, v = heads(77), heads(93), heads(93)
    call = fp16_flash_attention
    if mode == "checkpointed":
        call = lambda q, k, v: checkpoint(fp16_flash_attention, q, k, v,  # noqa: E731
                                          use_reentrant=False)
    if mode != "eager":
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True,
                             dynamic=mode == "compiled_dynamic")
    out = call(q, k, v)
    assert out.shape == (2, 4, 77, 64) and out.dtype == torch.float32
    out.sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad.shape == tensor.shape and tensor.grad.dtype == torch.float32


def test_a_full_lcm_student_runs_it_in_all_three_unets(tmp_path, monkeypatch) -> None:
    """run.py puts the kernel on the trained denoiser and, for a full LCM student, on its
    EMA target and its frozen teacher too: the three UNets of its loss attend alike."""
    from job.run import _prepare_denoiser
    from test_sdxl_family import load_family

    family = load_family(tmp_path, tmp_path / "models", model={"model_type": "full"},
                         distillation={"method": "lcm", "student": "full"},
                         speedups={"fp32_attention": "fp16_flash", "compile_blocks": False})
    given = []
    monkeypatch.setattr(attention, "apply_fp16_flash_attention",
                        lambda *models: given.append(models) or 0)
    objective = _prepare_denoiser(family.cfg, family, torch.device("cpu"))
    assert len(given) == 1 and len(given[0]) == 3
    student, target, teacher = given[0]
    assert student is family.unet and target is objective.target
    assert teacher is family.teacher_unet and len({id(m) for m in given[0]}) == 3
    # None installed (the stub returned 0): the setting says so, for the divergence hint.
    assert family.cfg.speedups.fp32_attention == "sdpa"


def saved_for_backward(call, *inputs) -> list[tuple[torch.dtype, int]]:
    """(dtype, bytes) of each tensor that `call`'s forward keeps for its backward."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel() * t.element_size()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(*inputs)
    out.sum().backward()
    return saved


@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", "inductor"])
def test_a_recomputing_compiled_block_keeps_what_sdpa_keeps(backend: str,
                                                          cpu_flash: None) -> None:
    """With the checkpoint inside a compiled block (regional compile with gradient
    checkpointing) the attention is recomputed in the backward like SDPA's: the block keeps
    its inputs and weights only, no fp16 copy. This guards the custom ops on this torch; the
    regression they fixed was torch 2.11's on a GPU, where the partitioner kept an
    autograd.Function's saved tensors (the Function passes here: bench/RESULTS.md session
    10; tests/test_gpu_fp16_flash_attention.py checks the GPU). Without the checkpoint the
    fp16 tensors are kept, which shows the hook sees them."""
    from job.speedups.compile import recompute_in_own_graph

    kept = {}
    for processor in (AttnProcessor2_0(), Fp32AttnProcessor()):
        for checkpointing in (True, False):
            torch.manual_seed(0)
            block = SDCascadeAttnBlock(c=128, c_cond=32, nhead=2, self_attn=True)
            block.attention.set_processor(processor)
            if checkpointing:
                recompute_in_own_graph(block)
            torch._dynamo.reset()
            x = torch.randn(2, 128, 6, 6, requires_grad=True)
            kept[type(processor).__name__, checkpointing] = saved_for_backward(
                torch.compile(block, backend=backend), x, torch.randn(2, 9, 32))
    sdpa, flash = kept["AttnProcessor2_0", True], kept["Fp32AttnProcessor", True]
    assert sum(b for _, b in flash) == sum(b for _, b in sdpa)
    assert all(dtype == torch.float32 for dtype, _ in flash)
    assert sum(dtype == torch.float16 for dtype, _ in kept["Fp32AttnProcessor", False]) >= 4
