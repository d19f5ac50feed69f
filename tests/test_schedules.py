"""Learning-rate schedules: warmup, decay to the end, cycles, and resume."""

from __future__ import annotations

import math

import pytest
import torch

from job.train.schedules import build_lr_scheduler


def lrs(name: str, warmup: int, total: int, **kwargs: float) -> list[float]:
    """The factor on the base lr before each of `total` steps, and after the last."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = build_lr_scheduler(opt, name, warmup, total, **kwargs)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out + [sched.get_last_lr()[0]]


def test_warmup_rises_linearly_then_holds() -> None:
    warm = lrs("constant_with_warmup", 4, 8)
    assert warm[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0]) and warm[-1] == 1.0


def test_constant_ignores_warmup() -> None:
    assert lrs("constant", 3, 3) == [1.0] * 4


def test_cosine_peaks_after_warmup_and_reaches_zero() -> None:
    cosine = lrs("cosine", 2, 10)
    assert cosine[1] == pytest.approx(0.5) and cosine[2] == pytest.approx(1.0)
    # Half-way through the decay (step 2 + 4) a half cosine is at 0.5.
    assert cosine[6] == pytest.approx(0.5)
    assert cosine[-1] == pytest.approx(0.0, abs=1e-9)


def test_cosine_cycles_restart_at_the_peak() -> None:
    two = lrs("cosine", 0, 10, num_cycles=2)
    assert two[0] == pytest.approx(1.0) and two[5] == pytest.approx(1.0)
    assert two[4] < 0.2 and two[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs("cosine", 2, 10, num_cycles=1) == pytest.approx(lrs("cosine", 2, 10))


def test_linear_and_polynomial_decay() -> None:
    assert lrs("linear", 0, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    square = lrs("polynomial", 0, 4, power=2.0)
    # diffusers' polynomial decays to lr_end = 1e-7, not to 0.
    assert square == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 1e-7], abs=1e-6)


def test_state_dict_round_trip_resumes_mid_schedule() -> None:
    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        return opt, build_lr_scheduler(opt, "cosine", 3, 20)

    opt, sched = fresh()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = fresh()
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == sched.get_last_lr()[0]
    progress = (12 - 3) / (20 - 3)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * progress)))


def test_unknown_schedule_names_the_choices() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match="constant, constant_with_warmup, cosine"):
        build_lr_scheduler(opt, "cosine_with_restarts", 0, 10)
