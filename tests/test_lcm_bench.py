"""bench/lcm_step.py runs its CPU-size path, one mode per process as on the GPU: diffusers'
LCM-LoRA example step and tunejob's, with gradient accumulation counted in the samples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("lcm_step_bench", ROOT / "bench" / "lcm_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_lcm_bench_tiny_writes_one_line_per_mode(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench()
    monkeypatch.setenv("OUT", str(tmp_path))
    common = ["--tiny", "--steps", "1", "--warmup", "1", "--batch", "1", "--accumulation", "2",
              "--checkpointing", "--rank", "4"]
    reference = bench.main(["--mode", "reference", *common])
    ours = bench.main(["--mode", "ours", "--compile", "--channels-last", *common])
    lines = [json.loads(line) for line in (tmp_path / "lcm_bench.jsonl").read_text().splitlines()]
    assert lines == [reference, ours]
    for line in lines:
        # samples/s counts batch x accumulation per optimizer step
        assert line["samples_per_s"] * line["ms_per_step"] / 1000 == pytest.approx(2, rel=0.01)
        assert line["accumulation"] == 2 and line["checkpointing"]
    assert ours["compile"] and ours["channels_last"] and not reference["compile"]
    with pytest.raises(SystemExit):
        bench.main(["--mode", "reference", "--compile", "--tiny"])  # ours' flags only


def test_reference_accumulates_then_clips_and_steps_once() -> None:
    """The reference's optimizer wrapper steps every Nth call, as the example's
    accelerator.accumulate does, and the losses are scaled by 1/N."""
    bench = load_bench()
    param = torch.nn.Parameter(torch.zeros(1))
    inner = torch.optim.SGD([param], lr=1.0)
    wrapped = bench.AccumulatingOptimizer(inner, [param], accumulation=2)
    assert wrapped.scale == 0.5
    for _ in range(2):
        (param * wrapped.scale * 0.3).sum().backward()  # gradient 0.15 per call
        wrapped.step()
        wrapped.zero_grad()
    # One update of the summed gradient 0.3 (under the clip at norm 1).
    torch.testing.assert_close(param.detach(), torch.tensor([-0.3]))
    assert param.grad is None  # zeroed after the step
