"""What a Trainer writes into a checkpoint and reads back on resume (a mixin of Trainer,
job/train/loop.py, which owns the state it saves).

Two layouts. One process or ddp: rank 0 writes `trainable.safetensors` (the trained weights),
`ema.pt`, `objective.safetensors` and `training_state.pt` (optimizer, schedule, scaler,
random streams, counters). fsdp2: every rank writes its shards of the weights, optimizer
state and EMA into `dcp/` (job/train/fsdp.py), rank 0 adds `training_state.pt` without the
optimizer. Resume reads either layout by what the folder holds; a sharded checkpoint also
resumes without FSDP (on one process or with ddp), since DCP reassembles the shards.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from job.errors import ConfigError
from job.train import distributed, fsdp
from job.train.checkpoint import Checkpoint


class CheckpointIO:
    """save_checkpoint(), resume() and their disk-space checks, for Trainer."""

    def identity(self) -> dict[str, Any]:
        """What makes a checkpoint this job's: refused on resume when it differs."""
        m = self.cfg.model
        identity: dict[str, Any] = {"job_name": self.cfg.job.name, "family": m.family,
                    "model_type": m.model_type, "flavour": m.flavour,
                    "model": m.pretrained_model_name_or_path,
                    "lora_rank": self.cfg.lora.rank if m.model_type == "lora" else None}
        if self.cfg.distillation.method != "none":
            identity["distillation"] = self.cfg.distillation.method
            identity["student"] = self.cfg.distillation.student
        return identity

    def save_checkpoint(self) -> Checkpoint | None:
        """Write a complete checkpoint of everything resume needs. Unsharded: rank 0 alone
        (every rank holds the same weights, optimizer state, counters and random streams);
        sharded: every rank writes its shards, and every rank must call this."""
        if not (self.topology.main or self.sharded):
            return None
        started = time.perf_counter()
        if self.sharded:
            checkpoint = self.checkpoints.save_together(
                self.state.step, self._write_sharded_files, self.identity(),
                self.estimated_checkpoint_bytes())
        else:
            checkpoint = self.checkpoints.save(self.state.step, self._write_checkpoint_files,
                                               self.identity(), self.estimated_checkpoint_bytes())
        seconds = time.perf_counter() - started
        self.saved.append(str(checkpoint.path))
        self.metrics.write("checkpoint", step=self.state.step, path=str(checkpoint.path),
                           seconds=round(seconds, 3))
        if self.topology.main:
            self.log.info("checkpoint_saved", step=self.state.step, path=str(checkpoint.path),
                          seconds=round(seconds, 3))
        self.last_checkpoint_s = seconds
        return checkpoint

    def estimated_checkpoint_bytes(self) -> int:
        """Weights, optimizer moments (+ Kahan buffers), EMA: an upper estimate (of all
        shards together when sharded)."""
        numel = sum(p.numel() for p in self.params)
        weights = sum(p.numel() * p.element_size() for p in self.params)
        state_per_weight = {"adamw": 8, "adamw_bf16": 12, "optimi-lion": 8}[self.cfg.optimizer.name]
        ema = 4 * numel if self.ema is not None else 0
        return weights + numel * state_per_weight + ema + self._objective_state_bytes()

    def _objective_state_bytes(self) -> int:
        return self.objective.state_bytes() if hasattr(self.objective, "state_bytes") else 0

    def _objective_state(self) -> dict[str, torch.Tensor]:
        """What the objective keeps besides the trained weights (a distillation's target)."""
        return self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}

    def check_disk_space(self) -> None:
        """Refuse to start when the volume cannot hold even one checkpoint (exit 2)."""
        needed = self.estimated_checkpoint_bytes()
        self.checkpoints.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.checkpoints.root).free
        if free < needed:
            raise ConfigError(
                f"the output volume has {free / 2**20:.1f} MiB free under "
                f"{self.checkpoints.root}, and one checkpoint needs about {needed / 2**20:.1f} MiB",
                "free space on the volume, or point job.output_dir at a larger one")
        self.log.info("disk_space", free_gib=round(free / 2**30, 2),
                      checkpoint_mib=round(needed / 2**20, 2))

    def _write_checkpoint_files(self, folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in
                   self.family.trainable_state_dict().items()}, str(folder / "trainable.safetensors"))
        if self.ema is not None:
            torch.save(self.ema.state_dict(), folder / "ema.pt")
        objective_state = self._objective_state()
        if objective_state:
            save_file({k: v.detach().cpu().contiguous() for k, v in objective_state.items()},
                      str(folder / "objective.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), **self._training_state()},
                   folder / "training_state.pt")

    def _write_sharded_files(self, folder: Path) -> None:
        """Every rank: its shards into folder/dcp; rank 0: the unsharded rest."""
        fsdp.save_sharded(folder, self.family.denoiser(), self.optimizer,
                          self.ema.shadow if self.ema is not None else None)
        if self.topology.main:
            torch.save(self._training_state(), folder / "training_state.pt")

    def _training_state(self) -> dict[str, Any]:
        """Schedule, loss scale, random streams and counters (the same on every rank)."""
        return {"lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": self.rng.state_dict(), "state": self.state.state_dict()}

    def resume(self) -> Checkpoint | None:
        """Load the checkpoint `checkpoint.resume_from` names, if any; then set aside this
        folder's checkpoints of later steps (an abandoned attempt's), so that "latest" and
        total_limit only ever see this run's line."""
        checkpoint = self._resume()
        if self.topology.main:
            self.checkpoints.set_aside_later_than(self.state.step)
        return checkpoint

    def _resume(self) -> Checkpoint | None:
        target = self.cfg.checkpoint.resume_from
        if target == "none":
            return None
        if target == "latest":
            # Every rank verifies on its own (no rank waits in a collective while another
            # hashes), then takes rank 0's choice: a rank that listed the folder before rank 0
            # restored a checkpoint there must still load the same one.
            mine = self.checkpoints.latest()
            mine = mine and (mine.step, str(mine.path))
            chosen = distributed.broadcast_object(mine)
            if chosen != mine:
                self.log.warning("resume_rank0_choice", mine=mine and mine[1],
                                 rank0=chosen and chosen[1])
            if chosen is None:
                return None
            checkpoint = Checkpoint(chosen[0], Path(chosen[1]))
            self._check_identity(checkpoint)
        else:
            path = Path(target)
            problem = self.checkpoints.problem(path)
            if problem:
                raise ConfigError(f"checkpoint.resume_from = {target!r} cannot be used: {problem}",
                                  'point it at a complete checkpoints/step-N folder, or "latest"')
            checkpoint = Checkpoint(int(path.name.split("-")[-1]), path)
        self._load_checkpoint(checkpoint)
        self.metrics.write("resumed", step=self.state.step, path=str(checkpoint.path))
        self.log.info("resumed", step=self.state.step, epoch=self.state.epoch,
                      samples_seen=self.state.samples_seen, path=str(checkpoint.path))
        return checkpoint

    def _reshard_if_needed(self) -> None:
        """A checkpoint of another process count: keep samples seen, the optimizer state and
        the random streams; restart the data position at the same share of the epoch."""
        saved_world, world = self.state.world_size, self.topology.world
        if saved_world == world:
            return
        old_global = self.cfg.train.batch_size * saved_world
        done_in_epoch = self.state.batch_in_epoch * old_global
        self.state.batch_in_epoch = done_in_epoch // (self.cfg.train.batch_size * world)
        self.state.world_size = world
        self.log.warning("resharded", checkpoint_processes=saved_world, processes=world,
                         samples_seen=self.state.samples_seen, epoch=self.state.epoch,
                         note="the data order of the rest of this epoch differs from an "
                              "uninterrupted run's; samples seen and the optimizer state are kept")

    def _check_identity(self, checkpoint: Checkpoint) -> None:
        theirs, ours = self.checkpoints.identity(checkpoint), self.identity()
        differs = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if differs:
            detail = ", ".join(f"{k}: checkpoint {a!r}, job {b!r}" for k, (a, b) in differs.items())
            raise ConfigError(
                f"{checkpoint.path} belongs to a different job ({detail})",
                'use another job.name or output_dir, set checkpoint.resume_from = "none" to '
                "start fresh, or name the checkpoint path explicitly to resume from it anyway")

    def _load_checkpoint(self, checkpoint: Checkpoint) -> None:
        folder = checkpoint.path
        if (folder / fsdp.SHARDED_DIR).is_dir():
            self._load_sharded(folder)
        else:
            self._load_unsharded(folder)
        saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        if "optimizer" in saved:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if self.scaler is not None and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        self.rng.load_state_dict(saved["rng"])
        self.state.load_state_dict(saved["state"])
        self._reshard_if_needed()

    def _load_sharded(self, folder: Path) -> None:
        """Weights, optimizer state and EMA from the DCP shards, into this run's sharded or
        whole model (a collective when several processes run)."""
        if self._objective_state():
            raise ConfigError(f"{folder} is a sharded (fsdp2) checkpoint, which holds no "
                              "distillation target network", 'resume from a checkpoint of '
                              'this job, or set checkpoint.resume_from = "none"')
        fsdp.load_sharded(folder, self.family.denoiser(), self.optimizer,
                          self.ema.shadow if self.ema is not None else None)

    def _load_unsharded(self, folder: Path) -> None:
        """Weights, distillation target and EMA of a one-process or ddp checkpoint."""
        if self.sharded:
            raise ConfigError(
                f"{folder} was written by one process or strategy ddp (whole weights in "
                "trainable.safetensors), and fsdp2 resumes from sharded checkpoints only",
                'resume it with distributed.strategy = "ddp", or set '
                'checkpoint.resume_from = "none" to start fresh')
        self.family.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
        if self._objective_state():
            if not (folder / "objective.safetensors").is_file():
                raise ConfigError(f"{folder} has no objective.safetensors (the distillation's "
                                  "target network)", 'resume from a checkpoint of this job, '
                                  'or set checkpoint.resume_from = "none"')
            self.objective.load_state_dict(load_file(str(folder / "objective.safetensors"),
                                                     device=str(self.device)))
        if self.ema is not None and (folder / "ema.pt").is_file():
            self.ema.load_state_dict(torch.load(folder / "ema.pt", map_location="cpu",
                                                weights_only=True))
