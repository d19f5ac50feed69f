"""Several processes on the CPU (gloo): the tiny SDXL job through `accelerate launch` equals
one process with the doubled batch; caching never waits in a collective; resuming on another
process count reshards and keeps the counters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import (ROOT, SMOKE, env, free_port, rows, run_one, run_two, settings,
                                 start_machine)

LORA = "final/pytorch_lora_weights.safetensors"


@pytest.fixture
def models_dir(tiny_sdxl_hub: Path) -> Path:
    return tiny_sdxl_hub


def test_two_processes_equal_one_with_the_doubled_batch(tmp_path: Path, models_dir: Path) -> None:
    one = run_one(settings(tmp_path / "one", models_dir, "train.batch_size=4"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_two(settings(tmp_path / "two", models_dir, "train.batch_size=2"))
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    # Rank 0 (the one logging below warnings) left the process group before its last word.
    logs = (two.stdout + two.stderr).splitlines()
    assert sum('"process_group_closed"' in line for line in logs) == 1
    assert '"job_finished"' in [line for line in logs if '"event"' in line][-1]

    out = tmp_path / "two" / "out"
    training = rows(out, "train")
    assert [r["samples_seen"] for r in training] == [4 * s for s in range(1, 7)]
    ready = rows(out, "data_ready")[0]
    # Rank 0 encoded its share only; rank 1 the rest (12 images in all).
    assert 0 < ready["encoded_latents"] < 12
    summary = json.loads((out / "smoke" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps_done"] == 6
    losses_one = [r["loss"] for r in rows(tmp_path / "one" / "out", "train")]
    assert [r["loss"] for r in training] == pytest.approx(losses_one, rel=1e-4)
    a = load_file(tmp_path / "one" / "out" / "smoke" / LORA)
    b = load_file(out / "smoke" / LORA)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)

    # Resumed by one process: the data is resharded, the counters go on.
    resumed = run_one(settings(tmp_path / "two", models_dir, "train.batch_size=2",
                               "train.max_train_steps=8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '"resharded"' in resumed.stderr + resumed.stdout
    assert [r["samples_seen"] for r in rows(out, "train")][-2:] == [26, 28]


SLOW_RANK = """
import os, sys, time
import job.models.sdxl as sdxl
encode = sdxl.SDXLFamily.encode_images
slept = []
def slow(self, pixels):
    if os.environ["RANK"] == "1" and not slept:
        slept.append(True)
        time.sleep(float(os.environ["SLOW_S"]))  # the first VAE batch of rank 1
    return encode(self, pixels)
sdxl.SDXLFamily.encode_images = slow
from job.cli import entry
entry()
"""


def test_a_slow_caching_rank_never_times_out_a_collective(tmp_path: Path,
                                                          models_dir: Path) -> None:
    """Process-group timeout 10 s; rank 1 caches for about 30 s while rank 0 waits."""
    port = str(free_port())
    args = settings(tmp_path, models_dir, "train.batch_size=1", "train.max_train_steps=2",
                    "distributed.timeout_s=10", "cache.vae_batch_size=1")
    procs = []
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", SLOW_RANK, "run", str(SMOKE), *args], cwd=ROOT,
            env={**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "SLOW_S": "30"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    phases = json.loads((tmp_path / "out" / "smoke" / "summary.json").read_text())["wall_time_s"]
    assert phases["cache"] > 10, phases  # rank 0 waited longer than the collective timeout


CLOSE = """
import json, os, sys, time
from datetime import timedelta
import torch.distributed as dist
from job.train import distributed

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
distributed.set_topology(distributed.Topology(rank, 2))
mode = sys.argv[1]
late = 1 if mode == "late_failure" else 0  # the rank that ends 3 s after the other
time.sleep(3 if rank == late else 0)  # e.g. rank 0's final validation and export
started = time.monotonic()
finished = mode == "finished" or (mode in ("waited_out", "stopped")) or \
    (mode == "late_failure" and rank == 0)
stop = (lambda: time.monotonic() - started > 1) if mode == "stopped" else (lambda: False)
distributed.close_process_group(finished, 1.0 if mode == "waited_out" else 60.0, stop)
print(json.dumps({"open": dist.is_initialized(), "waited": time.monotonic() - started}))
"""


@pytest.mark.parametrize("mode", ["finished", "failed", "waited_out", "stopped",
                                  "late_failure"])
def test_a_finished_rank_waits_for_the_others_then_leaves_the_process_group(mode: str) -> None:
    """Left to the interpreter's exit, the group's teardown raced with a peer's exit (a
    finished rank died of SIGABRT). A failed rank leaves the group alone (a peer may be
    mid-collective) and releases a finished one waiting for it. A rank whose wait ran out,
    or was stopped by a signal, leaves it open and holds up no later one."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", CLOSE, mode], cwd=ROOT,
        env={**env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ends = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    left_open = ["process_group_left_open" in out + err for out, err in outputs]
    if mode == "finished":  # rank 1 waited for rank 0, then both left
        assert [end["open"] for end in ends] == [False, False]
        assert ends[1]["waited"] > 2.5 and ends[0]["waited"] < 2.0
    elif mode == "failed":
        assert [end["open"] for end in ends] == [True, True]
        assert ends[1]["waited"] < 1.0 and left_open == [False, False]
    elif mode == "late_failure":  # rank 0 waited for rank 1, which failed: no destroy
        assert [end["open"] for end in ends] == [True, True]
        assert 2.5 < ends[0]["waited"] < 10 and left_open == [True, False]
    else:  # rank 1 gave up after 1 s; rank 0, later, left at once
        assert [end["open"] for end in ends] == [False, True]
        assert 0.9 < ends[1]["waited"] < 2.5 and ends[0]["waited"] < 1.0
        assert left_open == [False, True]


def test_two_machines_through_the_entrypoint_equal_one_process(tmp_path: Path,
                                                               models_dir: Path) -> None:
    """The image's several-machine path, for real: two entrypoints (two "machines" of one
    process each, as two pods of the indexed Job would be: NNODES, NODE_RANK, MASTER_ADDR)
    run accelerate's static rendezvous over TCP and train with gloo; machine 1 starts 5 s
    late, so machine 0's launcher waits for it. The run equals one process with the
    doubled batch."""
    one = run_one(settings(tmp_path / "one", models_dir, "train.batch_size=4"))
    assert one.returncode == 0, one.stderr[-3000:]
    port, args = str(free_port()), settings(tmp_path / "two", models_dir, "train.batch_size=2")
    procs = []
    for machine in (0, 1):
        if machine:
            time.sleep(5)
        procs.append(start_machine(machine, port, args, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    out = tmp_path / "two" / "out"
    assert [r["samples_seen"] for r in rows(out, "train")] == [4 * s for s in range(1, 7)]
    losses_one = [r["loss"] for r in rows(tmp_path / "one" / "out", "train")]
    assert [r["loss"] for r in rows(out, "train")] == pytest.approx(losses_one, rel=1e-4)
    summary = json.loads((out / "smoke" / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert '"process_group_closed"' in outputs[0]
