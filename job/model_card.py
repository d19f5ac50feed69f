"""The model card: a short README beside the final weights."""

from __future__ import annotations

from pathlib import Path

from job.config import JobConfig


def write_model_card(cfg: JobConfig, folder: Path, trainer) -> None:
    """A short README beside the final weights: what was trained, how to load it."""
    folder.mkdir(parents=True, exist_ok=True)
    m = cfg.model
    card = [f"# {cfg.job.name}", "",
            f"- family: {m.family}, flavour: {m.flavour}, base: "
            f"{m.pretrained_model_name_or_path or 'the flavour default'}",
            f"- model_type: {m.model_type}" + (f", LoRA rank {cfg.lora.rank}, alpha "
                                                f"{cfg.lora.alpha or cfg.lora.rank}"
                                                if m.model_type == "lora" else ""),
            f"- steps: {trainer.state.step}, samples seen: {trainer.state.samples_seen}",
            f"- EMA weights exported: {cfg.train.use_ema}", "",
            "Trained with tunejob; the job file is job.resolved.toml in the output folder."]
    if cfg.distillation.method == "lcm":
        card[-2:-2] = _lcm_lines(cfg)
    (folder / "README.md").write_text("\n".join(card) + "\n", encoding="utf-8")


def _lcm_lines(cfg: JobConfig) -> list[str]:
    """How to sample an LCM student with the stock pipeline."""
    from job.distill.lcm import lcm_scheduler_config

    lcm, settings = cfg.distillation.lcm, lcm_scheduler_config(cfg)
    distilled = (f"distilled with w in [{lcm.w_min}, {lcm.w_max}], i.e. CFG "
                 f"{lcm.w_min + 1}-{lcm.w_max + 1}")
    if cfg.distillation.student == "full":
        mid = 1 + 0.5 * (lcm.w_min + lcm.w_max)
        return [f"- LCM student, full UNet with a guidance embedding ({distilled}); the folder "
                "is a StableDiffusionXLPipeline with its LCMScheduler: guidance_scale sets w + 1 "
                "through the embedding (no CFG pass)", "", "```python",
                "pipe = StableDiffusionXLPipeline.from_pretrained(FOLDER)",
                f"image = pipe(prompt, num_inference_steps=4, guidance_scale={mid:g}).images[0]",
                "```"]
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
    return [f"- LCM-LoRA student ({distilled}): sample in 4-8 steps with guidance_scale 0 "
            "(CFG off; guidance is distilled in)",
            "", "```python", "pipe.load_lora_weights(FOLDER)",
            f"pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, {args})",
            "image = pipe(prompt, num_inference_steps=4, guidance_scale=0.0).images[0]",
            "```"]
