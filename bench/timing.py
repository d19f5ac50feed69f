"""Timing of a training step for the bench scripts: one definition of ms/step, samples/s and
the step's peak memory, and an optional profile of where the step's time goes.

The peak is `max_memory_allocated` over the warm-up and timed steps only: the statistics are
reset after setup (building the weights), whose own peak is reported as setup_peak_gib.

Achieved TFLOP/s is the model's work per sample (`flops_per_sample`: the plain reference
step counted once, without checkpointing's recompute, as MFU counts it) times samples/s. Every
row of one model, batch and resolution divides the same work by its own time, so two rows'
TFLOP/s compare as their samples/s do; the figure says how much of the GPU's matrix rate a
step reaches.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch


def flops_per_sample(build_step: Callable[[], Callable[[], None]]) -> int:
    """The model FLOPs of one training sample: `build_step()` must build the plain reference
    step at batch 1 without gradient checkpointing; one call of it runs under torch's
    FlopCounterMode, which counts matmuls, convolutions and attention, forward and backward
    (not elementwise work, which is small beside them). The per-sample work does not depend
    on the batch: every op of these denoisers is per sample. The step and its model are
    freed before the timed steps are built."""
    from torch.utils.flop_counter import FlopCounterMode

    step = build_step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    total = counter.get_total_flops()
    del step, counter
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the timed rows' setup peaks leave the count out
    return total


def timed(step: Callable[[], None], warmup: int, steps: int, batch: int,
          device: torch.device, profile: bool = False,
          sample_flops: int | None = None) -> dict:
    """Run `warmup` then `steps` steps; with `profile` (CUDA), two more under the profiler.
    With `sample_flops` (from `flops_per_sample`), also the achieved TFLOP/s."""
    cuda = device.type == "cuda"
    setup_peak = None
    if cuda:
        torch.cuda.synchronize()
        setup_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result = {"ms_per_step": round(seconds * 1000, 2), "samples_per_s": round(batch / seconds, 3),
              "peak_gpu_memory_gib": peak and round(peak, 2), "setup_peak_gib": setup_peak}
    if sample_flops:
        result["achieved_tflops"] = float(f"{sample_flops * batch / seconds / 1e12:.3g}")
    if profile and cuda:
        result.update(profiled(step))
    return result


def profiled(step: Callable[[], None], steps: int = 2) -> dict:
    """`steps` steps under torch.profiler: GPU kernel time per step against the wall time (a
    low share means the step waits on the CPU: launches, Python, syncs) and the kernels that
    take the most."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / steps
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
    return {"profiled_wall_ms": round(wall * 1000, 1), "gpu_kernel_ms": round(gpu, 1),
            "gpu_busy_share": round(gpu / (wall * 1000), 3),
            "top_kernels_ms": {e.key[:80]: round(e.self_device_time_total / 1e3 / steps, 1)
                               for e in top}}


def emit(line: dict, file_name: str) -> None:
    """Print one JSON result line, and append it to $OUT/`file_name` when OUT is set (the
    device tool brings $OUT back)."""
    import json
    import os
    from pathlib import Path

    text = json.dumps(line)
    print(text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        with open(Path(os.environ["OUT"], file_name), "a") as f:
            f.write(text + "\n")


def bench_device(tiny: bool) -> tuple[bool, torch.device, torch.dtype]:
    """(on CUDA, device, dtype): the GPU in bf16 unless --tiny asks for the CPU check in
    fp32."""
    cuda = torch.cuda.is_available() and not tiny
    return cuda, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
