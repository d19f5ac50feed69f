"""The image's entrypoint.sh, run here as the image runs it: which command it builds (one
process, or `accelerate launch` for several GPUs or machines), where it finds the job file,
the NVIDIA driver check, the exit code it returns after a supervised launch, and stopping a
RunPod/Vast instance (deploy/stop_instance.py). nvidia-smi and accelerate are stand-ins on
PATH; `python` is this interpreter, so job files are read by the real job package.
tests/container/run.sh runs the same paths inside the built image."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "entrypoint.sh"
SMOKE = "jobs/smoke.toml"

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=driver_version*) i=0; while [ $i -lt "$FAKE_GPUS" ]; do echo "$FAKE_DRIVER"; i=$((i+1)); done ;;
  -L) i=0; while [ $i -lt "$FAKE_GPUS" ]; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; i=$((i+1)); done ;;
  *) echo "| NVIDIA-SMI $FAKE_DRIVER  Driver Version: $FAKE_DRIVER  CUDA Version: 12.2 |" ;;
esac
"""


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """PATH entries standing in for the image: python, and nvidia-smi for FAKE_GPUS GPUs."""
    folder = tmp_path / "bin"
    folder.mkdir()
    # A wrapper, not a link: a link to a venv's python would not find the venv.
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    smi = folder / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    return folder


def entrypoint(bin_dir: Path, tmp_path: Path, *args: str, gpus: int = 0,
               driver: str = "580.95.05", dry_run: bool = True, **env: str
               ) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TUNEJOB_", "CUDA_VISIBLE", "NNODES", "NODE_RANK", "MASTER_",
                                 "JOB_COMPLETION", "RUNPOD_", "CONTAINER_"))}
    full = {**base, "PATH": f"{bin_dir}:{base['PATH']}", "FAKE_GPUS": str(gpus),
            "FAKE_DRIVER": driver, "TUNEJOB_ACCELERATOR": "cuda",
            "TUNEJOB_ACCELERATOR_VERSION": "13.0", "TUNEJOB_DATA": str(tmp_path / "data"),
            # The job file written from TUNEJOB_JOB_TOML goes under the test's folder.
            "TMPDIR": str(tmp_path),
            "HF_HUB_OFFLINE": "1", **({"TUNEJOB_DRY_RUN": "1"} if dry_run else {}), **env}
    if gpus == 0:
        (bin_dir / "nvidia-smi").unlink(missing_ok=True)  # a machine without NVIDIA GPUs
    return subprocess.run(["bash", str(ENTRYPOINT), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def command(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def test_help(bin_dir: Path, tmp_path: Path) -> None:
    done = entrypoint(bin_dir, tmp_path, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage:")
    assert "TUNEJOB_JOB_TOML" in done.stdout


def test_no_job_is_exit_2_with_the_usage(bin_dir: Path, tmp_path: Path) -> None:
    done = entrypoint(bin_dir, tmp_path)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "tunejob: no job file given" in done.stderr


def test_one_gpu_runs_one_process(bin_dir: Path, tmp_path: Path) -> None:
    done = entrypoint(bin_dir, tmp_path, SMOKE, "--set", "train.max_train_steps=5", gpus=1)
    assert command(done) == ["python", "-m", "job", "run", SMOKE, "--set",
                             "train.max_train_steps=5"]


def test_validate_and_cache_keep_their_command(bin_dir: Path, tmp_path: Path) -> None:
    assert command(entrypoint(bin_dir, tmp_path, "validate", SMOKE, gpus=2))[:4] == [
        "python", "-m", "job", "validate"]
    assert command(entrypoint(bin_dir, tmp_path, "cache", SMOKE, gpus=2))[:4] == [
        "python", "-m", "job", "cache"]


def test_several_gpus_use_accelerate_launch(bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, "--set", "train.seed=3", gpus=4))
    assert cmd[:6] == ["accelerate", "launch", "--num_processes", "4", "--multi_gpu",
                       "--num_machines"]
    assert cmd[cmd.index("-m"):] == ["-m", "job", "run", SMOKE, "--set", "train.seed=3"]
    assert "--machine_rank" not in cmd


def test_cuda_visible_devices_narrows_the_count(bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, gpus=4, CUDA_VISIBLE_DEVICES="2"))
    assert cmd[:3] == ["python", "-m", "job"]
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, gpus=4, CUDA_VISIBLE_DEVICES="1,3"))
    assert cmd[cmd.index("--num_processes") + 1] == "2"


def test_the_job_can_ask_for_fewer_processes(bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, "--set", "distributed.num_processes=2",
                             gpus=8))
    assert cmd[cmd.index("--num_processes") + 1] == "2"


def test_several_machines(bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, gpus=8, NNODES="2",
                             JOB_COMPLETION_INDEX="1", MASTER_ADDR="tunejob-multinode-0.svc"))
    options = [a for a in cmd[2:cmd.index("-m")] if a != "--multi_gpu"]
    flags = dict(zip(options[::2], options[1::2]))
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2"
    assert flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "tunejob-multinode-0.svc"
    assert flags["--main_process_port"] == "29500"
    # A pod pending or pulling the image on a fresh node must not time out the rendezvous
    # after accelerate's 600 s.
    assert flags["--rdzv_conf"] == "timeout=1800"
    # NODE_RANK wins over the completion index.
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, gpus=8, NNODES="2", NODE_RANK="0",
                             JOB_COMPLETION_INDEX="1", MASTER_ADDR="a", MASTER_PORT="1234"))
    assert cmd[cmd.index("--machine_rank") + 1] == "0"
    assert cmd[cmd.index("--main_process_port") + 1] == "1234"


def test_more_processes_than_gpus_or_an_uneven_split_is_exit_2(bin_dir: Path,
                                                                tmp_path: Path) -> None:
    done = entrypoint(bin_dir, tmp_path, SMOKE, "--set", "distributed.num_processes=8", gpus=4)
    assert done.returncode == 2 and "8 processes on 1 machine(s)" in done.stderr
    assert "at most 4" in done.stderr
    done = entrypoint(bin_dir, tmp_path, SMOKE, "--set", "distributed.num_processes=5",
                      gpus=4, NNODES="2", NODE_RANK="0", MASTER_ADDR="a")
    assert done.returncode == 2 and "do not divide evenly over 2 machines" in done.stderr
    assert "multiple of 2" in done.stderr


def test_several_machines_need_a_rank_and_rank_0s_address(bin_dir: Path,
                                                          tmp_path: Path) -> None:
    done = entrypoint(bin_dir, tmp_path, SMOKE, gpus=8, NNODES="2", MASTER_ADDR="a")
    assert done.returncode == 2 and "NODE_RANK" in done.stderr and "fix:" in done.stderr
    done = entrypoint(bin_dir, tmp_path, SMOKE, gpus=8, NNODES="2", NODE_RANK="1")
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr
    done = entrypoint(bin_dir, tmp_path, SMOKE, gpus=0, NNODES="2", NODE_RANK="1",
                      MASTER_ADDR="a")
    assert done.returncode == 2 and "no GPU" in done.stderr


@pytest.mark.parametrize("driver, image_cuda, ok", [
    ("535.104.05", "13.0", False),  # CUDA 13 needs a 580 driver
    ("575.57.08", "13.0", False),
    ("580.65.06", "13.0", True),
    ("580.95.05", "13.2", True),    # minor-version compatibility: any 13.x on any 580+
    ("535.104.05", "12.8", True),   # ... and any 12.x on any 525+
    ("470.256.02", "12.8", False),
    ("470.256.02", "11.8", True),
])
def test_driver_check(bin_dir: Path, tmp_path: Path, driver: str, image_cuda: str,
                      ok: bool) -> None:
    done = entrypoint(bin_dir, tmp_path, SMOKE, gpus=1, driver=driver,
                      TUNEJOB_ACCELERATOR_VERSION=image_cuda)
    if ok:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2 and done.stdout == ""
    first = done.stderr.splitlines()[0]
    assert first.startswith("tunejob: ") and f"CUDA {image_cuda}" in first and driver in first
    assert "supports CUDA up to 12.2" in first and "fix:" in done.stderr


def test_driver_check_can_be_skipped_and_ignores_rocm(bin_dir: Path, tmp_path: Path) -> None:
    assert entrypoint(bin_dir, tmp_path, SMOKE, gpus=1, driver="470.256.02",
                      TUNEJOB_SKIP_DRIVER_CHECK="1").returncode == 0
    assert entrypoint(bin_dir, tmp_path, SMOKE, gpus=1, driver="470.256.02",
                      TUNEJOB_ACCELERATOR="rocm").returncode == 0


def test_job_as_toml_text_in_an_environment_variable(bin_dir: Path, tmp_path: Path) -> None:
    text = (ROOT / SMOKE).read_text()
    cmd = command(entrypoint(bin_dir, tmp_path, TUNEJOB_JOB_TOML=text))
    assert cmd[:4] == ["python", "-m", "job", "run"]
    assert cmd[4].endswith("/TUNEJOB_JOB_TOML.toml") and Path(cmd[4]).read_text() == text + "\n"
    # For real: validate reads it; an unknown key is exit 2 naming the key.
    done = entrypoint(bin_dir, tmp_path, "validate", dry_run=False, TUNEJOB_JOB_TOML=text)
    assert done.returncode == 0, done.stderr
    bad = text.replace('[job]\n', '[job]\nbogus_setting = 1\n')
    done = entrypoint(bin_dir, tmp_path, "validate", dry_run=False, TUNEJOB_JOB_TOML=bad)
    assert done.returncode == 2 and "bogus_setting" in done.stderr
    assert "TUNEJOB_JOB_TOML.toml" in done.stderr


def test_job_under_the_data_volume(bin_dir: Path, tmp_path: Path) -> None:
    mine = tmp_path / "data" / "jobs" / "mine.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text((ROOT / SMOKE).read_text())
    assert command(entrypoint(bin_dir, tmp_path, "jobs/mine.toml"))[4] == str(mine)
    assert command(entrypoint(bin_dir, tmp_path, str(mine)))[4] == str(mine)
    # A file of the image wins over one of the same name on the volume.
    (tmp_path / "data" / SMOKE).write_text("")
    assert command(entrypoint(bin_dir, tmp_path, SMOKE))[4] == SMOKE
    assert command(entrypoint(bin_dir, tmp_path, TUNEJOB_JOB=str(mine)))[4] == str(mine)


def test_overrides_from_the_environment_come_first(bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, "--set", "train.seed=2",
                             TUNEJOB_SET="train.seed=1\n  train.max_train_steps=9"))
    assert cmd[5:] == ["--set", "train.seed=1", "--set", "train.max_train_steps=9",
                       "--set", "train.seed=2"]


def test_an_override_from_the_environment_may_hold_blanks_inside_quotes(
        bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, SMOKE, TUNEJOB_SET=(
        'validation.prompt="a corgi on a beach"  train.seed=3 '
        "validation.negative_prompt='blurry, low quality' job.name=dog's")))
    assert cmd[5:] == ["--set", 'validation.prompt="a corgi on a beach"', "--set", "train.seed=3",
                       "--set", "validation.negative_prompt='blurry, low quality'",
                       "--set", "job.name=dog's"]  # an apostrophe inside a word is plain
    done = entrypoint(bin_dir, tmp_path, SMOKE, TUNEJOB_SET='validation.prompt="a corgi')
    assert done.returncode == 2 and "TUNEJOB_SET" in done.stderr and "unclosed" in done.stderr
    assert "fix:" in done.stderr and done.stdout == ""


def test_export_runs_in_the_image_on_the_cpu(bin_dir: Path, tmp_path: Path) -> None:
    cmd = command(entrypoint(bin_dir, tmp_path, "export", SMOKE, "--merge", "--dtype", "bf16",
                             gpus=4, TUNEJOB_SET="train.seed=3"))
    assert cmd == ["python", "-m", "job", "export", SMOKE, "--set", "train.seed=3", "--merge",
                   "--dtype", "bf16"]  # no accelerate launch, whatever the GPU count


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_exit_2(bin_dir: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    done = entrypoint(bin_dir, tmp_path, SMOKE, "--set",
                      f'job.output_dir="{locked}/output"')
    assert done.returncode == 2 and str(locked) in done.stderr and "--user" in done.stderr


def fake_accelerate(bin_dir: Path, body: str) -> None:
    script = bin_dir / "accelerate"
    script.write_text("#!/bin/bash\n" + body)
    script.chmod(0o755)


def smoke_output(tmp_path: Path) -> Path:
    return tmp_path / "data" / "output" / "smoke"


def test_launcher_exit_code_is_replaced_by_the_jobs(bin_dir: Path, tmp_path: Path) -> None:
    # torch's launcher exits 1 whatever its workers returned; rank 0's summary.json has the
    # job's code (here: preempted), which Kubernetes' podFailurePolicy acts on.
    fake_accelerate(bin_dir, 'mkdir -p "$OUT"\n'
                    'echo \'{"status": "preempted", "exit_code": 143}\' > "$OUT/summary.json"\n'
                    'exit 1\n')
    done = entrypoint(bin_dir, tmp_path, SMOKE, gpus=2, dry_run=False,
                      OUT=str(smoke_output(tmp_path)))
    assert done.returncode == 143, done.stderr
    # An old summary (from an earlier run) does not count.
    fake_accelerate(bin_dir, "exit 1\n")
    os.utime(smoke_output(tmp_path) / "summary.json", (1, 1))
    assert entrypoint(bin_dir, tmp_path, SMOKE, gpus=2, dry_run=False).returncode == 1


def test_sigterm_reaches_the_launcher_and_means_143(bin_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "got-sigterm"
    fake_accelerate(bin_dir, f'trap \'touch "{marker}"; exit 1\' TERM\n'
                    'echo started >&2\nwhile :; do sleep 0.1; done\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEJOB_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_GPUS="2", FAKE_DRIVER="580.95.05",
               TUNEJOB_ACCELERATOR="cuda", TUNEJOB_ACCELERATOR_VERSION="13.0",
               TUNEJOB_DATA=str(tmp_path / "data"))
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), SMOKE], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert marker.exists()


class StopApi(BaseHTTPRequestHandler):
    """A provider API on loopback that records each request."""

    seen: list[dict] = []
    status = 200

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append({"method": self.command, "path": self.path,
                          "auth": self.headers.get("Authorization"),
                          "body": self.rfile.read(length).decode()})
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stop_api():
    StopApi.seen, StopApi.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), StopApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_runpod_pod_is_stopped_when_the_job_ends(bin_dir: Path, tmp_path: Path,
                                                 stop_api: str) -> None:
    # The job fails fast (no such file: exit 2); the pod is stopped, the code kept.
    done = entrypoint(bin_dir, tmp_path, "jobs/missing.toml", dry_run=False,
                      TUNEJOB_STOP_INSTANCE="1", RUNPOD_POD_ID="pod123",
                      RUNPOD_API_KEY="secret-key", TUNEJOB_RUNPOD_API=stop_api)
    assert done.returncode == 2, done.stderr
    assert StopApi.seen == [{"method": "POST", "path": "/pods/pod123/stop",
                             "auth": "Bearer secret-key", "body": ""}]
    assert "secret-key" not in done.stderr + done.stdout


def test_vast_instance_stop_request(stop_api: str) -> None:
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import stop_instance
    finally:
        sys.path.pop(0)
    env = {"CONTAINER_ID": "4242", "CONTAINER_API_KEY": "k", "TUNEJOB_VAST_API": stop_api}
    assert stop_instance.main(env) == 0
    assert StopApi.seen == [{"method": "PUT", "path": "/instances/4242/", "auth": "Bearer k",
                             "body": json.dumps({"state": "stopped"})}]
    StopApi.status = 401  # a refused key is not retried
    started = time.monotonic()
    assert stop_instance.main(env) == 1 and len(StopApi.seen) == 2
    assert time.monotonic() - started < 5
    assert stop_instance.main({}) == 1  # neither provider
