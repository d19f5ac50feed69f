"""Optimizers, LR schedules and EMA against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from job.train.ema import EMA
from job.train.optimizers import AdamWBF16, Lion, build_optimizer
from job.train.schedules import build_lr_scheduler


def run(opt_param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, steps: int,
        grad: float = 1.0) -> None:
    for _ in range(steps):
        opt_param.grad = torch.full_like(opt_param, grad)
        optimizer.step()


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
    assert torch.allclose(moved, reference, rtol=0.1)


def test_adamw_bf16_on_fp32_equals_torch_adamw() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamWBF16([a], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for i in range(20):
        grad = torch.randn(16, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(a, b, atol=1e-6)


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
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    run(p, Lion([p], lr=1e-4), 1000)
    assert torch.allclose(p.float(), torch.full((4,), 0.9), atol=2e-3)


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "optimi-lion"])
def test_optimizer_state_round_trip_is_exact(name: str) -> None:
    def fresh():
        p = torch.nn.Parameter(torch.linspace(-1, 1, 10))
        return p, build_optimizer([p], name, 1e-2, 0.9, 0.999, 0.01, 1e-8)

    def grads(step: int) -> torch.Tensor:
        return torch.randn(10, generator=torch.Generator().manual_seed(step))

    whole, opt = fresh()
    for s in range(10):
        whole.grad = grads(s)
        opt.step()
    half, opt = fresh()
    for s in range(5):
        half.grad = grads(s)
        opt.step()
    saved, weights = opt.state_dict(), half.detach().clone()
    resumed, opt2 = fresh()
    with torch.no_grad():
        resumed.copy_(weights)
    opt2.load_state_dict(saved)
    for s in range(5, 10):
        resumed.grad = grads(s)
        opt2.step()
    assert torch.equal(resumed, whole)


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ValueError, match="adamw_bf16"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], "sgd", 1e-3, 0.9, 0.99, 0, 1e-8)


def test_schedules_warmup_and_cosine_end() -> None:
    def lrs(name: str, warmup: int, total: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        sched = build_lr_scheduler(opt, name, warmup, total)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out + [sched.get_last_lr()[0]]

    warm = lrs("constant_with_warmup", 4, 8)
    assert warm[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0]) and warm[-1] == 1.0
    cosine = lrs("cosine", 2, 10)
    assert cosine[2] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs("linear", 0, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lrs("constant", 3, 3) == [1.0] * 4


def test_ema_formula_interval_swap_and_state() -> None:
    w = {"w": torch.nn.Parameter(torch.zeros(2))}
    ema = EMA(w, decay=0.9, update_interval=2)
    with torch.no_grad():
        w["w"].fill_(1.0)
    ema.update(w, step=1)  # not a multiple of 2: skipped
    assert torch.equal(ema.shadow["w"], torch.zeros(2))
    ema.update(w, step=2)
    ema.update(w, step=4)
    assert torch.allclose(ema.shadow["w"], torch.full((2,), 1 - 0.9 ** 2))
    with ema.swapped_in(w):
        assert torch.allclose(w["w"], torch.full((2,), 0.19))
    assert torch.equal(w["w"], torch.ones(2))
    other = EMA(w, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.decay == 0.9
    assert math.isclose(other.update_interval, 2)
