"""Optimizers against torch's AdamW and Lion's formula, in bf16 and fp32, across a resume."""

from __future__ import annotations

import io

import pytest
import torch

from job.train.optimizers import AdamWBF16, Lion, build_optimizer


def run(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, steps: int,
        grad: float = 1.0) -> None:
    for _ in range(steps):
        param.grad = torch.full_like(param, grad)
        optimizer.step()


def random_grad(step: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.randn(like.shape, generator=torch.Generator().manual_seed(step))
    return g.to(like.dtype)


def test_adamw_bf16_keeps_sub_ulp_updates_where_plain_adamw_stalls() -> None:
    # Near 1.0 a bf16 ulp is 2**-7 = 0.0078; each step moves the weight by ~lr = 1e-4.
    plain = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    kahan = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    exact = torch.nn.Parameter(torch.ones(8, dtype=torch.float32))
    run(plain, torch.optim.AdamW([plain], lr=1e-4, weight_decay=0), 1000)
    run(kahan, AdamWBF16([kahan], lr=1e-4, weight_decay=0), 1000)
    run(exact, torch.optim.AdamW([exact], lr=1e-4, weight_decay=0), 1000)
    assert torch.all(plain == 1.0), "plain bf16 AdamW was expected to stall"
    moved, reference = 1.0 - kahan.float(), 1.0 - exact
    assert reference.min() > 0.09  # the fp32 run really moved ~1000 * lr
    assert torch.allclose(moved, reference, rtol=0.1)


def test_adamw_bf16_weights_stay_within_half_ulp_of_fp32_adamw() -> None:
    # With weight decay and noisy gradients the bf16 weight is the fp32 run, rounded.
    torch.manual_seed(0)
    start = torch.randn(64)
    low = torch.nn.Parameter(start.to(torch.bfloat16))
    full = torch.nn.Parameter(low.detach().float())
    ours = AdamWBF16([low], lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    theirs = torch.optim.AdamW([full], lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(300):
        low.grad, full.grad = random_grad(step, low), random_grad(step, low).float()
        ours.step()
        theirs.step()
    ulp = torch.finfo(torch.bfloat16).eps * full.detach().abs()  # eps is 2**-7 at 1.0
    assert torch.all((low.float() - full).abs() <= 0.51 * ulp + 1e-6)
    assert not torch.equal(low.float(), start.to(torch.bfloat16).float())


def test_adamw_bf16_on_fp32_equals_torch_adamw() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamWBF16([a], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(20):
        a.grad, b.grad = random_grad(step, a), random_grad(step, b)
        ours.step()
        theirs.step()
    assert "compensation" not in ours.state[a]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, torch.randn(16, generator=torch.Generator().manual_seed(0)))


def test_lion_matches_its_formula() -> None:
    p = torch.nn.Parameter(torch.tensor([0.5, -0.2, 1.0]))
    ref, m = p.detach().clone(), torch.zeros(3)
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    for i in range(5):
        g = torch.tensor([1.0, -2.0, 0.5]) * (i - 2)
        p.grad = g.clone()
        opt.step()
        ref = ref - lr * (torch.sign(b1 * m + (1 - b1) * g) + wd * ref)
        m = b2 * m + (1 - b2) * g
    assert torch.allclose(p, ref, atol=1e-7)


def test_lion_bf16_does_not_stall() -> None:
    # Each Lion step moves by exactly lr = 1e-4, an 1/78 of a bf16 ulp at 1.0.
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    run(p, Lion([p], lr=1e-4), 1000)
    assert torch.allclose(p.float(), torch.full((4,), 0.9), atol=2e-3)


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "optimi-lion"])
def test_params_without_gradient_are_skipped(name: str) -> None:
    trained = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([trained, frozen], name, 1e-2, 0.9, 0.999, 0.01, 1e-8)
    trained.grad = torch.ones(3)
    opt.step()
    assert torch.equal(frozen, torch.ones(3)) and not opt.state[frozen]
    assert not torch.equal(trained, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "optimi-lion"])
def test_optimizer_state_round_trip_is_exact(name: str, dtype: torch.dtype) -> None:
    def fresh() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 10).to(dtype))
        return p, build_optimizer([p], name, 1e-3, 0.9, 0.999, 0.01, 1e-8)

    whole, opt = fresh()
    for s in range(10):
        whole.grad = random_grad(s, whole)
        opt.step()
    half, opt = fresh()
    for s in range(5):
        half.grad = random_grad(s, half)
        opt.step()
    # Through bytes and map_location, as a checkpoint travels.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed, opt2 = fresh()
    with torch.no_grad():
        resumed.copy_(half)
    opt2.load_state_dict(saved)
    if name != "adamw":
        assert opt2.state[resumed]["exp_avg"].dtype == torch.float32
    for s in range(5, 10):
        resumed.grad = random_grad(s, resumed)
        opt2.step()
    assert torch.equal(resumed, whole)


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ValueError, match="adamw, adamw_bf16, optimi-lion"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], "sgd", 1e-3, 0.9, 0.99, 0, 1e-8)


def test_adamw_is_not_fused_on_cpu() -> None:
    opt = build_optimizer([torch.nn.Parameter(torch.ones(1))], "adamw", 1e-3, 0.9, 0.99, 0, 1e-8)
    assert not opt.param_groups[0]["fused"]


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda_and_bf16_optimizers_run_there() -> None:
    p = torch.nn.Parameter(torch.ones(8, device="cuda"))
    assert build_optimizer([p], "adamw", 1e-3, 0.9, 0.99, 0, 1e-8).param_groups[0]["fused"]
    for name in ("adamw_bf16", "optimi-lion"):
        q = torch.nn.Parameter(torch.ones(8, device="cuda", dtype=torch.bfloat16))
        opt = build_optimizer([q], name, 1e-4, 0.9, 0.999, 0.0, 1e-8)
        run(q, opt, 1000)
        assert torch.allclose(q.float().cpu(), torch.full((8,), 0.9), atol=2e-3), name
        opt.load_state_dict(opt.state_dict())
        assert opt.state[q]["compensation"].device == q.device
