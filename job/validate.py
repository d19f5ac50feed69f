"""Validation: images from the family's stock pipeline, and an eval loss at fixed noise.

The eval loss scores every eval sample at the fixed `validation.eval_timesteps` with
noise drawn from `validation.eval_seed` per (sample, timestep), so the number means the
same thing at every step and in every run of the same job.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from job.atomic import replace_atomically
from job.config import JobConfig, validation_sizes
from job.data.batches import BatchLoader
from job.data.prepare import PreparedData, Sample
from job.errors import ConfigError
from job.log import get_logger
from job.metrics import MetricsWriter
from job.models.base import Family


def prompt_library(cfg: JobConfig) -> dict[str, str]:
    """Name -> prompt from validation.prompt and the prompt library (table or JSON file)."""
    v = cfg.validation
    prompts = {"validation": v.prompt} if v.prompt else {}
    library = v.prompt_library
    if isinstance(library, str):
        path = Path(library)
        try:
            library = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"validation.prompt_library = {str(path)!r} cannot be read: {err}",
                              "give a JSON file of {\"name\": \"prompt\"} or a TOML table") from None
        if not isinstance(library, dict) or not all(isinstance(x, str) for x in library.values()):
            raise ConfigError(f"validation.prompt_library file {str(path)!r} is not an object of "
                              "name -> prompt strings", 'write {"name": "a prompt", ...}')
    prompts.update(library or {})
    return prompts


class Validator:
    """Runs validation at a step: writes images and the eval loss, returns what it wrote.

    With `writes` off it samples and scores the same way and writes nothing: the ranks of a
    sharded model besides rank 0, whose forward passes rank 0's needs (each all-gathers the
    weights). Their `should_stop` must then be rank 0's answer, so every rank stops sampling
    at the same image.
    """

    def __init__(self, cfg: JobConfig, family: Family, data: PreparedData, out_dir: Path,
                 metrics: MetricsWriter, device: torch.device,
                 should_stop: Callable[[], bool] = lambda: False,
                 eval_loss_fn: Optional[Callable[..., torch.Tensor]] = None,
                 writes: bool = True) -> None:
        self.cfg, self.family, self.data, self.metrics = cfg, family, data, metrics
        self.should_stop, self.writes = should_stop, writes
        # Per-sample eval loss at (batch, timesteps, noise): a distillation scores its own.
        self.eval_loss_fn = eval_loss_fn if eval_loss_fn is not None else family.eval_loss
        self.out_dir, self.device = out_dir / "validation", device
        self.prompts = prompt_library(cfg) if cfg.validation.enabled else {}
        self.sizes = validation_sizes(cfg)
        self.loader = BatchLoader(data, device)
        self.images: list[str] = []
        self.last_eval_loss: float | None = None
        self.seconds = 0.0
        self.log = get_logger()
        self.teacher_guidance = self._teacher_guidance()
        v = cfg.validation
        full_student = cfg.distillation.method == "lcm" and cfg.distillation.student == "full"
        if v.enabled and self.prompts and v.negative_prompt and (v.guidance <= 1 or full_student):
            why = (f"validation.guidance = {v.guidance} <= 1 turns classifier-free guidance off"
                   if v.guidance <= 1 else "the full LCM student takes guidance through its "
                   "guidance embedding, without classifier-free guidance")
            self.log.warning("setting_ignored", key="validation.negative_prompt",
                             reason=f"{why}, so the negative prompt has no effect on the "
                                    "student's images (the teacher's still use it)"
                                    if self.teacher_guidance else f"{why}, so the negative "
                                    "prompt has no effect")

    def _teacher_guidance(self) -> float | None:
        """CFG scale of the teacher images beside a distilled student's (None: no teacher):
        1 + the middle of the w range the student was distilled over."""
        if self.cfg.distillation.method != "lcm":
            return None
        lcm = self.cfg.distillation.lcm
        guidance = 1 + 0.5 * (lcm.w_min + lcm.w_max)
        self.log.info("validation_teacher", steps=self.cfg.validation.num_inference_steps,
                      guidance=guidance, note="the teacher samples with the model's own "
                      "scheduler at the student's step count, beside the student in the grid")
        return guidance

    def run(self, step: int) -> None:
        """Eval loss, then images, at this step."""
        if not self.cfg.validation.enabled:
            return
        started = time.perf_counter()
        denoiser = self.family.denoiser()
        was_training = denoiser.training
        denoiser.eval()
        try:
            eval_loss = self.eval_loss()
            paths = self.sample_images(step)
        finally:
            denoiser.train(was_training)
        self.last_eval_loss = eval_loss
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.metrics.write("validation", step=step, eval_loss=eval_loss,
                           eval_source=self.data.eval_source, images=paths,
                           seconds=round(seconds, 3))
        self.log.info("validation", step=step, eval_loss=eval_loss,
                      eval_source=self.data.eval_source, images=len(paths))

    def images_missing(self, step: int) -> bool:
        """Whether validation at `step` should have written images and did not finish them
        (no grid.png, its last file): a run killed while validating after that step's
        checkpoint."""
        return bool(self.cfg.validation.enabled and self.prompts and self.writes
                    and not (self.out_dir / f"step-{step:06d}" / "grid.png").is_file())

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        """Mean loss over eval samples x fixed timesteps with fixed noise."""
        samples = self.data.eval
        if not samples:
            return None
        timesteps = self.cfg.validation.eval_timesteps
        total, count = 0.0, 0
        for group in _by_bucket(samples, self.cfg.train.batch_size):
            batch = self.loader.load([s for _, s in group], [False] * len(group))
            for t_index, t in enumerate(timesteps):
                noise = torch.stack([self._noise(i, t_index, batch["latents"][0].shape)
                                     for i, _ in group]).to(self.device)
                steps = torch.full((len(group),), t, dtype=torch.long, device=self.device)
                losses = self.eval_loss_fn(batch, steps, noise)
                total += float(losses.float().sum())
                count += len(group)
        return total / count

    def _noise(self, sample_index: int, t_index: int, shape: torch.Size) -> torch.Tensor:
        """Noise that depends only on (eval seed, sample, timestep index)."""
        seed = self.cfg.validation.eval_seed * 1_000_003 + sample_index * 101 + t_index
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def sample_images(self, step: int) -> list[str]:
        """One PNG per prompt and size, plus grid.png; returns the paths (none written
        without `writes`)."""
        if not self.prompts:
            return []
        v = self.cfg.validation
        folder = self.out_dir / f"step-{step:06d}"
        if self.writes:
            folder.mkdir(parents=True, exist_ok=True)
        rows, paths = [], []
        runs = [("", v.guidance)]
        if self.teacher_guidance is not None:
            runs.append(("-teacher", self.teacher_guidance))
        for name, prompt in self.prompts.items():
            row = []
            for suffix, guidance in runs:
                for width, height in self.sizes:
                    if self.should_stop():
                        # Preemption: images are a luxury inside the grace period.
                        self.log.warning("validation_interrupted", step=step,
                                         images_written=len(paths))
                        return paths
                    with self.family.teacher() if suffix else nullcontext():
                        image = self.family.sample(prompt, v.negative_prompt, width, height,
                                                   guidance, v.num_inference_steps, v.seed)
                    row.append(image)
                    if self.writes:
                        path = folder / f"{_safe(name)}-{width}x{height}{suffix}.png"
                        save_png(image, path)
                        paths.append(str(path))
            rows.append(row)
        if not self.writes:
            return []
        grid = folder / "grid.png"
        save_png(make_grid(rows), grid)
        paths.append(str(grid))
        self.images.extend(paths)
        return paths


def save_png(image, path: Path) -> None:
    """A PNG under a temp name, renamed into place: a kill never leaves a truncated image."""
    replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def _by_bucket(samples: list[Sample], size: int) -> list[list[tuple[int, Sample]]]:
    """Chunks of (index, sample) that share a bucket, so their latents stack."""
    groups: dict[tuple[int, int], list[tuple[int, Sample]]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.bucket, []).append((index, sample))
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _safe(name: str) -> str:
    """A file-name-safe version of a prompt name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80] or "prompt"


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of images (prompts x sizes) on one canvas, each cell the largest image's size."""
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (cell_w * columns, cell_h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * cell_w, r * cell_h))
    return grid
