"""Shared by the several-process tests: the smoke job's settings for a short CPU run, and
launching it on one process or on several through `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "jobs" / "smoke.toml"


def settings(tmp_path: Path, models_dir: Path, *extra: str) -> list[str]:
    """--set arguments: the smoke job in tmp_path, on the CPU, short."""
    items = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
             f"model.hub_cache_dir={json.dumps(str(models_dir))}",
             f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
             f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
             'job.device="cpu"', "train.max_train_steps=6", "train.log_every=1",
             "checkpoint.step_interval=3", "validation.step_interval=1000",
             'validation.resolution=["64x64"]', "validation.num_inference_steps=2",
             "validation.prompt_library={}", *extra]
    return [arg for item in items for arg in ("--set", item)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def rows(out: Path, event: str) -> list[dict]:
    lines = (out / "smoke" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def run_one(args: list[str]) -> subprocess.CompletedProcess:
    """The smoke job with these --set arguments in one process."""
    return subprocess.run([sys.executable, "-m", "job", "run", str(SMOKE), *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)


def run_two(args: list[str]) -> subprocess.CompletedProcess:
    """The smoke job in two processes. --multi_gpu is accelerate's torchrun launcher (its
    --cpu mode needs MPI); the job's device "cpu" makes accelerate set up a gloo process
    group."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "job", "run", str(SMOKE), *args],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def start_machine(machine: int, port: str, args: list[str], **popen) -> subprocess.Popen:
    """Machine `machine` of a two-machine job, as a pod of the indexed Job runs it: the image's
    entrypoint with NNODES=2, NODE_RANK and MASTER_ADDR, one (CPU) process, rank 0's machine
    at 127.0.0.1:`port`. Launcher variables of the calling process are left out."""
    base = {k: v for k, v in env().items()
            if not k.startswith(("TUNEJOB_", "NNODES", "NODE_RANK", "MASTER_", "RANK",
                                 "WORLD_SIZE", "LOCAL_RANK", "JOB_COMPLETION"))}
    return subprocess.Popen(
        ["bash", str(ROOT / "entrypoint.sh"), str(SMOKE), *args], cwd=ROOT,
        env={**base, "PATH": f"{Path(sys.executable).parent}:{base['PATH']}",
             "TUNEJOB_NUM_GPUS": "1", "NNODES": "2", "NODE_RANK": str(machine),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, **popen)
