"""FSDP2 on the CPU (2 gloo processes): a full fine-tune of the tiny SDXL sharded over two
processes equals one process with the doubled batch (gradient accumulation and EMA on);
its checkpoints are sharded, and resume on two processes or on one; a failed or killed rank
leaves no checkpoint; LoRA, and one process, are refused with the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import ROOT, env, free_port, rows, run_one, run_two, settings
from helpers import tiny_job_config
from job.errors import ConfigError

UNET = "final/unet/diffusion_pytorch_model.safetensors"
# A full fine-tune with two micro-steps per step and a short-memory EMA, so that a wrong
# micro-step, reduction or EMA shard shows in the exported (EMA) weights. The schedule
# warms up over 5 steps whatever the step count: a run stopped at step 2 and continued
# sees the learning rates of an uninterrupted one. Adam's epsilon is raised from 1e-8: the
# UNet's biases in front of a group norm have a zero gradient up to rounding (the norm
# removes them), and a tiny epsilon turns that rounding, which differs with the order of
# the reduction, into steps as large as the learning rate.
FULL = ('model.model_type="full"', "train.gradient_accumulation_steps=2", "train.use_ema=true",
        "train.ema_decay=0.5", "checkpoint.step_interval=1000", "optimizer.epsilon=1e-5")
FSDP2 = 'distributed.strategy="fsdp2"'


@pytest.fixture
def models_dir(tiny_sdxl_hub: Path) -> Path:
    return tiny_sdxl_hub


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in rows(folder / "out", "train")]


def assert_same_unet(a: Path, b: Path) -> None:
    mine, theirs = load_file(a / "out" / "smoke" / UNET), load_file(b / "out" / "smoke" / UNET)
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], rtol=1e-4, atol=1e-6, msg=key)


def test_sharded_full_fine_tune_equals_one_process_and_resumes_anywhere(
        tmp_path: Path, models_dir: Path) -> None:
    one = run_one(settings(tmp_path / "one", models_dir, *FULL, "train.batch_size=4",
                           "train.max_train_steps=4"))
    assert one.returncode == 0, one.stderr[-3000:]
    # Two processes, sharded, stopped after step 2: its last checkpoint is the one resumed.
    two = tmp_path / "two"
    first = run_two(settings(two, models_dir, *FULL, FSDP2, "train.batch_size=2",
                             "train.max_train_steps=2"))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert losses(two) == pytest.approx(losses(tmp_path / "one")[:2], rel=1e-4)
    smoke = two / "out" / "smoke"
    manifest = json.loads((smoke / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp",
            "training_state.pt"} == set(manifest["files"])
    # Validation sampled on both ranks (a sharded forward needs both); rank 0 wrote it.
    assert sorted(p.name for p in (smoke / "validation" / "step-000002").iterdir()) == \
        ["grid.png", "validation-64x64.png"]
    assert json.loads((smoke / "summary.json").read_text())["status"] == "succeeded"

    # The same checkpoint continued by one process without FSDP: DCP reassembles the shards.
    shutil.copytree(two, tmp_path / "one_more")
    alone = run_one(settings(tmp_path / "one_more", models_dir, *FULL, "train.batch_size=4",
                             "train.max_train_steps=4"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    # ... and by two processes, sharded again, validating (with the EMA weights swapped in)
    # between steps 3 and 4, which must not change the run.
    second = run_two(settings(two, models_dir, *FULL, FSDP2, "train.batch_size=2",
                              "train.max_train_steps=4", "validation.step_interval=3"))
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert (two / "out" / "smoke" / "validation" / "step-000003" / "grid.png").is_file()
    for resumed in (two, tmp_path / "one_more"):
        assert [r["step"] for r in rows(resumed / "out", "resumed")] == [2]
        assert losses(resumed)[2:] == pytest.approx(losses(tmp_path / "one")[2:], rel=1e-4)
        assert_same_unet(tmp_path / "one", resumed)


SAVE_TOGETHER = """
import json, os, sys
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from job.train import distributed
from job.train.checkpoint import CheckpointManager

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=10))
distributed.set_topology(distributed.Topology(rank, 2))
manager = CheckpointManager(Path(sys.argv[1]))
shard = {"weights": torch.full((4,), float(rank))}

def write(fault):
    def files(folder):
        if rank == 1 and fault == "dcp":
            (folder / "dcp" / "__1_0.distcp").mkdir(parents=True)  # rank 1's shard cannot be written
        if rank == 1 and fault == "die":
            os._exit(9)  # killed mid-write
        dcp.save({f"rank{rank}": shard}, checkpoint_id=str(folder / "dcp"))
        if rank == 0 and fault == "disk":
            raise OSError(28, "No space left on device")
        if rank == 0:
            (folder / "extra.json").write_text("{}")
    return files

outcomes = {}
for step, fault in ((1, None), (2, "dcp"), (3, "disk"), (4, "die")):
    try:
        manager.save_together(step, write(fault))
        outcomes[step] = "saved"
    except BaseException as err:
        outcomes[step] = type(err).__name__
    print(json.dumps(outcomes), flush=True)
"""


def test_a_failed_or_killed_rank_leaves_no_sharded_checkpoint(tmp_path: Path) -> None:
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", SAVE_TOGETHER, str(tmp_path)], cwd=ROOT,
        env={**env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    last = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    # Step 2: DCP could not write rank 1's shard and raised on both ranks; step 3: rank 0 ran
    # out of disk for its own file after the shards, and told rank 1; step 4: rank 1 died,
    # and rank 0 lost its peer (exit 143: the retry resumes).
    assert last[0] == {"1": "saved", "2": "RuntimeError", "3": "DiskFullError",
                       "4": "PeerLost"}, outputs[0][1][-2000:]
    assert last[1] == {"1": "saved", "2": "RuntimeError", "3": "RuntimeError"}
    assert procs[1].returncode == 9

    from job.train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path)
    assert [c.step for c in manager.complete()] == [1]
    manifest = json.loads((tmp_path / "step-000001" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp",
                                      "extra.json"}
    # Steps 2 and 3 were cleaned up; step 4's folder stays without a manifest until the next
    # prune.
    [unfinished] = tmp_path.glob(".tmp-step-*")
    assert unfinished.name.startswith(".tmp-step-000004-")
    assert not (unfinished / "manifest.json").exists()
    manager.prune()
    assert not list(tmp_path.glob(".tmp-step-*"))


def test_lora_and_distillation_with_fsdp2_are_refused(tmp_path: Path) -> None:
    from job.config import check_rules

    cfg = tiny_job_config(tmp_path, distributed={"strategy": "fsdp2"})
    with pytest.raises(ConfigError, match='model_type = "lora".*\n.*use strategy = "ddp" '
                                          "for LoRA"):
        check_rules(cfg)
    lcm = tiny_job_config(tmp_path, model={"model_type": "full"},
                          distillation={"method": "lcm", "student": "full"},
                          distributed={"strategy": "fsdp2"})
    with pytest.raises(ConfigError, match="distillation"):
        check_rules(lcm)
    check_rules(tiny_job_config(tmp_path, model={"model_type": "full"},
                                distributed={"strategy": "fsdp2"}))


def test_channels_last_with_fsdp2_is_refused(tmp_path: Path) -> None:
    """FSDP2 cannot shard a channels_last convolution weight (NotImplementedError at
    fully_shard): an explicit channels_last = true is exit 2 with the fix; "auto" leaves
    it off (tests/test_compile.py)."""
    from job.config import check_rules

    cfg = tiny_job_config(tmp_path, model={"model_type": "full"},
                          distributed={"strategy": "fsdp2"}, speedups={"channels_last": True})
    with pytest.raises(ConfigError, match="channels_last = true.*\n.*set channels_last = false"):
        check_rules(cfg)


def test_fsdp2_on_one_process_is_refused_with_the_fix(tmp_path: Path) -> None:
    from job.run import preflight

    cfg = tiny_job_config(tmp_path, model={"model_type": "full"},
                          distributed={"strategy": "fsdp2"})
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="this run has one.*\n.*several processes"):
        preflight(cfg, tmp_path / "out")


def test_adamw_bf16_shards_and_resumes_like_an_uninterrupted_run(tmp_path: Path,
                                                                 models_dir: Path) -> None:
    """adamw_bf16 (bf16 weights with Kahan compensation buffers beside fp32 moments)
    under FSDP2: its sharded state resumes, and the resumed steps match an uninterrupted run's (step 4's loss follows step 3's update, made
    with the restored moments and compensation)."""
    extra = ('model.model_type="full"', FSDP2, 'optimizer.name="adamw_bf16"',
             'train.mixed_precision="bf16"', "train.batch_size=2", "checkpoint.step_interval=2")
    whole = run_two(settings(tmp_path / "whole", models_dir, *extra, "train.max_train_steps=4"))
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]
    cut = tmp_path / "cut"
    for steps in (2, 4):
        result = run_two(settings(cut, models_dir, *extra, f"train.max_train_steps={steps}"))
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert [r["step"] for r in rows(cut / "out", "resumed")] == [2]
    assert losses(cut) == pytest.approx(losses(tmp_path / "whole"), rel=1e-3)
