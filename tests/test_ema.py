"""EMA of trained weights: its formula, interval, swapping for validation, and resume."""

from __future__ import annotations

import pytest
import torch

from job.train.ema import EMA


def weights(value: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Parameter]:
    return {"a": torch.nn.Parameter(torch.full((2,), value, dtype=dtype)),
            "b": torch.nn.Parameter(torch.full((3,), value, dtype=dtype))}


def set_all(named: dict[str, torch.nn.Parameter], value: float) -> None:
    with torch.no_grad():
        for p in named.values():
            p.fill_(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_updates_follow_the_formula(dtype: torch.dtype) -> None:
    w = weights(0.0, dtype)
    ema = EMA(w, decay=0.9)
    set_all(w, 1.0)
    ema.update(w, step=1)
    set_all(w, 3.0)
    ema.update(w, step=2)
    expected = 0.9 * (0.9 * 0.0 + 0.1 * 1.0) + 0.1 * 3.0  # 0.39
    for name in w:
        assert ema.shadow[name].dtype == torch.float32
        assert torch.allclose(ema.shadow[name], torch.full_like(ema.shadow[name], expected))


def test_update_interval_skips_steps_between() -> None:
    w = weights(0.0)
    ema = EMA(w, decay=0.5, update_interval=3)
    set_all(w, 1.0)
    for step in (1, 2, 4, 5):
        ema.update(w, step)
    assert torch.equal(ema.shadow["a"], torch.zeros(2))
    ema.update(w, step=3)
    ema.update(w, step=6)
    assert torch.allclose(ema.shadow["a"], torch.full((2,), 0.75))


def test_swapped_in_shows_ema_weights_and_restores_originals() -> None:
    w = weights(0.0)
    ema = EMA(w, decay=0.9)
    set_all(w, 1.0)
    ema.update(w, step=1)
    with ema.swapped_in(w):
        assert torch.allclose(w["b"], torch.full((3,), 0.1))
    assert torch.equal(w["a"], torch.ones(2)) and torch.equal(w["b"], torch.ones(3))
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped_in(w):
            raise RuntimeError("inside")
    assert torch.equal(w["b"], torch.ones(3))


def test_copy_to_writes_ema_weights() -> None:
    w = weights(2.0)
    ema = EMA(w)
    set_all(w, 5.0)
    ema.copy_to(w)
    assert torch.equal(w["a"], torch.full((2,), 2.0))


def test_state_dict_round_trip_continues_identically() -> None:
    w = weights(0.0)
    ema = EMA(w, decay=0.9, update_interval=2)
    set_all(w, 1.0)
    ema.update(w, step=2)
    resumed = EMA(weights(7.0), decay=0.9, update_interval=2)
    resumed.load_state_dict(ema.state_dict())
    set_all(w, 4.0)
    ema.update(w, step=4)
    resumed.update(w, step=4)
    for name in w:
        assert torch.equal(resumed.shadow[name], ema.shadow[name])
    assert torch.allclose(resumed.shadow["a"], torch.full((2,), 0.9 * 0.1 + 0.4))


def test_loading_state_for_other_weights_is_refused() -> None:
    ema = EMA(weights(0.0))
    with pytest.raises(ValueError, match="'c'"):
        ema.load_state_dict({"shadow": {"a": torch.zeros(2), "c": torch.zeros(3)}})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({"shadow": {"a": torch.zeros(1), "b": torch.zeros(3)}})


@pytest.mark.gpu
def test_state_loaded_from_cpu_stays_on_the_gpu() -> None:
    w = {n: torch.nn.Parameter(p.detach().cuda()) for n, p in weights(1.0).items()}
    ema = EMA(w)
    ema.load_state_dict({"shadow": {n: t.cpu() for n, t in ema.state_dict()["shadow"].items()}})
    ema.update(w, step=1)
    assert ema.shadow["a"].is_cuda
