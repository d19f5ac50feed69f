"""bench/timing.py: the model FLOPs each bench row divides by its step time (achieved
TFLOP/s), checked against the count worked out by hand for a known step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from timing import flops_per_sample, timed  # noqa: E402


def frozen_then_trained_step():
    """A frozen 64->32 layer feeding a trained 32->16 one, at batch 1: the forward is
    2*64*32 + 2*32*16 FLOPs; the backward computes only the trained weight's gradient
    (2*32*16): nothing upstream of it needs one."""
    torch.manual_seed(0)
    frozen = torch.nn.Linear(64, 32).requires_grad_(False)
    trained = torch.nn.Linear(32, 16)
    x = torch.randn(1, 64)
    return lambda: trained(frozen(x)).square().sum().backward()


def test_flops_per_sample_counts_forward_and_the_backward_that_runs() -> None:
    assert flops_per_sample(frozen_then_trained_step) == 2 * 64 * 32 + 2 * (2 * 32 * 16)


def test_timed_reports_tflops_as_work_times_rate() -> None:
    sample_flops = 10**12
    result = timed(frozen_then_trained_step(), warmup=1, steps=3, batch=8,
                   device=torch.device("cpu"), sample_flops=sample_flops)
    expected = sample_flops * result["samples_per_s"] / 1e12
    assert abs(result["achieved_tflops"] - expected) <= 1e-2 * expected
    assert "achieved_tflops" not in timed(frozen_then_trained_step(), 1, 1, 8,
                                          torch.device("cpu"))
