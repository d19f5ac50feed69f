"""bench/sd3_step.py runs its CPU-size path and writes the JSON the GPU run reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_sd3_bench_tiny_writes_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("sd3_step", ROOT / "bench" / "sd3_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.SD35_MEDIUM["num_layers"] == 24 and bench.SD35_MEDIUM["in_channels"] == 16
    assert bench.SD35_LARGE["num_layers"] == 38 and bench.SD35_LARGE["caption_projection_dim"] == 2432
    monkeypatch.setenv("OUT", str(tmp_path))
    result = bench.main(["--tiny", "--steps", "2", "--warmup", "1"])
    written = json.loads((tmp_path / "sd3_bench.jsonl").read_text().splitlines()[-1])
    assert written == result and written["latents"] == [2, 16, 8, 8]
    for side in ("ours", "reference"):
        assert written[side]["samples_per_s"] > 0 and written[side]["ms_per_step"] > 0
        assert written[side]["achieved_tflops"] > 0
    assert written["ratio_samples_per_s"] > 0
