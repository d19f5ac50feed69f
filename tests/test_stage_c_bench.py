"""bench/stage_c_step.py runs its CPU-size path and writes the JSON the GPU run reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_stage_c_bench_tiny_writes_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("stage_c_step", ROOT / "bench" / "stage_c_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.PRIORS["stage-c"]["block_out_channels"] == (2048, 2048)
    assert bench.PRIORS["stage-c-lite"]["down_num_layers_per_block"] == (4, 12)
    monkeypatch.setenv("OUT", str(tmp_path))
    result = bench.main(["--tiny", "--steps", "2", "--warmup", "1"])
    written = json.loads((tmp_path / "stage_c_bench.json").read_text())
    assert written == result and written["latents"] == [24, 24]
    for name in ("stage-c", "stage-c-lite"):
        for mode in ("fp32", "bf16"):
            entry = written["priors"][name][mode]
            assert entry["ours"]["samples_per_s"] > 0 and entry["reference"]["samples_per_s"] > 0
            assert entry["ratio_samples_per_s"] > 0
            # one model's work per sample divided by each row's time
            ours, ref = entry["ours"]["achieved_tflops"], entry["reference"]["achieved_tflops"]
            assert ours > 0 and ref > 0
            assert abs(ours / ref - entry["ratio_samples_per_s"]) < 0.02 * entry["ratio_samples_per_s"]


def test_text_caching_bench_tiny_writes_every_prompt(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("text_caching", ROOT / "bench" / "text_caching.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert (bench.CLIP_G["hidden_size"], bench.CLIP_G["num_hidden_layers"]) == (1280, 32)
    monkeypatch.setenv("OUT", str(tmp_path))
    [result] = bench.main(["--tiny", "--batch", "16"])
    assert json.loads((tmp_path / "text_caching.json").read_text()) == [result]
    assert result["written"] == result["prompts"] == 64
    assert result["ours_prompts_per_s"] > 0 and result["reference_prompts_per_s"] > 0
