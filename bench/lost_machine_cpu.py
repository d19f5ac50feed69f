"""A CPU experiment, not a benchmark: a two-machine job loses a machine and Kubernetes
replaces it. Two entrypoints stand for the indexed Job's two pods (NNODES=2, NODE_RANK,
MASTER_ADDR=127.0.0.1, one gloo process each, a shared output folder). At step 120 every
process of machine 1 is killed (SIGKILL, as a deleted pod's are); its replacement starts
3 s later, while machine 0 is still running; when machine 0 has exited (143: its peer was
lost), its replacement starts 3 s later. The two replacements should rendezvous, resume
from the last checkpoint and finish.

    python bench/lost_machine_cpu.py [--work /tmp/lost-machine]

Prints each event with its time and exits 0 when both replacements exited 0 and the run
reached its last step (the logs of each launch are kept in the work folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from distributed_helpers import free_port, settings, start_machine  # noqa: E402

from job.models.sdxl_tiny import ensure_tiny_sdxl  # noqa: E402

STEPS, KILL_AT, GAP_S = 600, 120, 3.0


def descendants(pid: int) -> list[int]:
    """pid and every process under it (torchrun's workers start their own sessions, so a
    process-group kill would miss them)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                children.append(int(entry.name))
    return [pid] + [p for child in children for p in descendants(child)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lost-machine"))
    work = parser.parse_args().work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = work / "models"
    ensure_tiny_sdxl(models / "tunejob-tiny" / "sdxl")
    args = settings(work, models, "train.batch_size=2", f"train.max_train_steps={STEPS}",
                    "checkpoint.step_interval=50", "distributed.timeout_s=10",
                    "train.log_every=10")
    port = str(free_port())
    started = time.monotonic()

    def say(*what: object) -> None:
        print(f"[{time.monotonic() - started:6.1f} s]", *what, flush=True)

    def launch(machine: int, attempt: str) -> subprocess.Popen:
        log = open(work / f"machine{machine}-{attempt}.log", "w")  # noqa: SIM115
        say(f"machine {machine} ({attempt}) starts")
        return start_machine(machine, port, args, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)

    def last_step() -> int:
        metrics = work / "out" / "smoke" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()
                if '"train"' in line] if metrics.exists() else []
        return max((r["step"] for r in rows if r.get("event") == "train"), default=0)

    first = [launch(0, "first"), launch(1, "first")]
    while last_step() < KILL_AT and first[0].poll() is None:
        time.sleep(0.2)
    say(f"step {last_step()}: every process of machine 1 killed")
    for pid in descendants(first[1].pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first[1].wait()
    time.sleep(GAP_S)
    replacement1 = launch(1, "replacement")
    code0 = first[0].wait()
    say(f"machine 0 (first) exited {code0}")
    time.sleep(GAP_S)
    replacement0 = launch(0, "replacement")
    codes = []
    for machine, proc in ((0, replacement0), (1, replacement1)):
        try:
            codes.append(proc.wait(timeout=600))
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            codes.append(None)
        say(f"machine {machine} (replacement) exited {codes[-1]}")
    say(f"last step {last_step()} of {STEPS}; logs in {work}")
    return 0 if codes == [0, 0] and code0 == 143 and last_step() == STEPS else 1


if __name__ == "__main__":
    sys.exit(main())
