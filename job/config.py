"""The job schema: one pydantic model per TOML table, strict, torch-free.

Every key has a type, a default (or is required) and a one-line description; the
description and the established name users know it by (`json_schema_extra`) feed
docs/config.md and the JSON Schema (see job/schema_docs.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def setting(default: Any, doc: str, established: str | None = None, **constraints: Any) -> Any:
    """A schema field with its one-line description and established name."""
    extra = {"established": established} if established else None
    return Field(default, description=doc, json_schema_extra=extra, **constraints)


class Table(BaseModel):
    """Base of every table: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class JobTable(Table):
    """[job]: who this job is and where it writes."""

    name: str = setting(..., "Job name; outputs go to <output_dir>/<name>/.", "tracker_run_name",
                        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = setting("/data/output", "Parent folder of the job's output folder.", "output_dir")
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", "auto: the GPU when one is present, else the CPU.")
    preemption_grace_s: float = setting(
        20.0, "Seconds between SIGTERM and the kill; the job stops and saves inside it.", gt=0)
    i_know_what_i_am_doing: bool = setting(
        False, "Turns some refusals of risky settings into warnings.", "i_know_what_i_am_doing")


class ModelTable(Table):
    """[model]: which family, which weights, what is trained."""

    family: str = setting(..., "Model family: sdxl, sd3, stable_cascade or kandinsky5-image "
                          "(an LCM student is sdxl with [distillation]).", "model_family")
    flavour: str | None = setting(
        None, "Family flavour; picks the default weights. None: the family's default.",
        "model_flavour")
    pretrained_model_name_or_path: str | None = setting(
        None, "Hub id or local folder of the weights; wins over the flavour's default.",
        "pretrained_model_name_or_path")
    revision: str | None = setting(None, "Hub revision (branch, tag or commit).", "revision")
    model_type: Literal["lora", "full"] = setting(
        "lora", "lora: train a LoRA adapter; full: fine-tune every weight.", "model_type")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = setting(
        "auto", "Training target; auto: the scheduler config's prediction_type.", "prediction_type")
    hub_cache_dir: str = setting("/data/models", "Hub cache folder (HF_HOME).", "HF_HOME")


class LoraTable(Table):
    """[lora]: the adapter, when model.model_type = "lora"."""

    rank: int = setting(16, "LoRA rank.", "lora_rank", gt=0)
    alpha: float | None = setting(None, "LoRA alpha; None: equal to the rank.", "lora_alpha", gt=0)
    dropout: float = setting(0.0, "Dropout on the LoRA path.", "lora_dropout", ge=0, lt=1)
    target_modules: list[str] = setting(
        ["to_q", "to_k", "to_v", "to_out.0"], "Module names that receive adapters.",
        "lora_target_modules", min_length=1)
    lora_type: Literal["standard"] = setting("standard", "Adapter kind.", "lora_type")


class TrainTable(Table):
    """[train]: the loop."""

    batch_size: int = setting(1, "Samples per step on each GPU.", "train_batch_size", gt=0)
    max_train_steps: int | None = setting(
        None, "Optimizer steps to run; wins over num_train_epochs.", "max_train_steps", gt=0)
    num_train_epochs: int | None = setting(
        None, "Passes over the data when max_train_steps is not set.", "num_train_epochs", gt=0)
    gradient_accumulation_steps: int = setting(
        1, "Micro-batches per optimizer step.", "gradient_accumulation_steps", gt=0)
    max_grad_norm: float | None = setting(
        1.0, "Gradient clipping norm; None: no clipping.", "max_grad_norm", gt=0)
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass to save memory.",
        "gradient_checkpointing")
    gradient_checkpointing_ratio: float = setting(
        1.0, "With gradient_checkpointing: the share of the denoiser's blocks that recompute, "
        "evenly spaced (1.0 every block; 0.5 every other block keeps its activations: more "
        "memory, less recompute).", gt=0, le=1)
    activation_memory_budget: float | None = setting(
        None, "With compile_blocks: the share of the compiled blocks' activations kept for "
        "the backward pass, torch's partitioner recomputing the rest it judges cheapest "
        "(selective activation checkpointing by a memory budget: 0.5 keeps about half). "
        "None: all kept. Blocks that gradient_checkpointing recomputes keep only their "
        "inputs anyway.", gt=0, le=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = setting(
        "bf16", "Autocast precision; trainable weights stay fp32 unless the optimizer says.",
        "mixed_precision")
    seed: int = setting(42, "Seed of noise, timesteps, crops and data order.", "seed")
    snr_gamma: float | None = setting(
        None, "Min-SNR loss weighting gamma (5.0 is usual); None: unweighted.", "snr_gamma", gt=0)
    caption_dropout_probability: float = setting(
        0.0, "Chance a sample trains with the empty prompt.", "caption_dropout_probability",
        ge=0, le=1)
    use_ema: bool = setting(False, "Keep an exponential moving average of the trained weights.",
                            "use_ema")
    ema_decay: float = setting(0.9999, "EMA decay per update.", "ema_decay", gt=0, lt=1)
    ema_update_interval: int = setting(1, "Optimizer steps between EMA updates.",
                                       "ema_update_interval", gt=0)
    max_nonfinite_steps: int = setting(
        10, "Skipped steps with NaN/inf loss or gradients allowed before exit 4.", ge=0)
    log_every: int = setting(10, "Steps between metrics.jsonl rows.", "logging_steps", gt=0)


class OptimizerTable(Table):
    """[optimizer]: optimizer and learning-rate schedule."""

    name: Literal["adamw", "adamw_bf16", "optimi-lion"] = setting(
        "adamw", "adamw: fused torch AdamW; adamw_bf16: bf16 weights with Kahan-compensated "
        "updates; optimi-lion: Lion.", "optimizer")
    learning_rate: float = setting(1e-4, "Peak learning rate.", "learning_rate", gt=0)
    beta1: float = setting(0.9, "First moment decay.", "adam_beta1", ge=0, lt=1)
    beta2: float = setting(0.999, "Second moment decay.", "adam_beta2", ge=0, lt=1)
    weight_decay: float = setting(1e-2, "Decoupled weight decay.", "adam_weight_decay", ge=0)
    epsilon: float = setting(1e-8, "Adam epsilon.", "adam_epsilon", gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear", "polynomial"] = \
        setting("constant", "Learning-rate schedule.", "lr_scheduler")
    lr_warmup_steps: int = setting(0, "Linear warmup steps.", "lr_warmup_steps", ge=0)
    lr_num_cycles: int = setting(1, "Cosine cycles.", "lr_num_cycles", gt=0)
    lr_power: float = setting(1.0, "Polynomial schedule power.", "lr_power", gt=0)


class DatasetTable(Table):
    """[[datasets]]: one local image folder."""

    id: str = setting(..., "Dataset name, unique in the job.", "id")
    type: Literal["local"] = setting("local", "Where the images live.", "type")
    instance_data_dir: str = setting(..., "Folder of images (searched recursively).",
                                     "instance_data_dir")
    repeats: int = setting(0, "Extra passes over this dataset per epoch (0: seen once).",
                           "repeats", ge=0)
    disabled: bool = setting(False, "Skip this dataset.", "disabled")
    caption_strategy: Literal["filename", "textfile", "instanceprompt"] = setting(
        "filename", "filename: the file name; textfile: the .txt beside the image; "
        "instanceprompt: instance_prompt for every image.", "caption_strategy")
    instance_prompt: str | None = setting(None, "The instance prompt.", "instance_prompt")
    prepend_instance_prompt: bool = setting(
        False, "Put instance_prompt before every caption.", "prepend_instance_prompt")
    resolution: float | int | str = setting(
        1024, "Training size: pixels of the short edge (pixel), megapixels (area) or pixels "
        "turned into an area (pixel_area); 'WxH' means the pixel area of W*H.", "resolution")
    resolution_type: Literal["pixel", "area", "pixel_area"] = setting(
        "pixel", "Unit of resolution and of the image size limits.", "resolution_type")
    minimum_image_size: float | None = setting(
        None, "Skip smaller images (pixels of the short edge for pixel, megapixels otherwise).",
        "minimum_image_size", ge=0)
    maximum_image_size: float | None = setting(
        None, "Images larger than this are first downsampled to target_downsample_size.",
        "maximum_image_size", gt=0)
    target_downsample_size: float | None = setting(
        None, "Size oversized images are downsampled to before cropping.",
        "target_downsample_size", gt=0)
    crop: bool = setting(False, "Crop to the bucket size (else resize to fit and crop the "
                         "alignment remainder only).", "crop")
    crop_style: Literal["center", "random"] = setting("center", "Where the crop sits.",
                                                      "crop_style")
    crop_aspect: Literal["square", "preserve", "closest"] = setting(
        "square", "With crop: square: 1:1 buckets; preserve: the image's own aspect; closest: "
        "the nearest standard aspect (1:1, 4:3, 3:2, 16:9 and their portraits). "
        "bucket_resolutions, when set, take precedence.", "crop_aspect")
    aspect_bucket_alignment: int | None = setting(
        None, "Bucket sides are multiples of this (pixels); None: 64, or the family's "
        "alignment if larger.", "aspect_bucket_alignment", gt=0)
    aspect_bucket_rounding: int = setting(
        2, "Decimal places aspect ratios are rounded to when grouping into buckets.",
        "aspect_bucket_rounding", ge=1, le=9)
    bucket_resolutions: list[str] | None = setting(
        None, "Explicit buckets as 'WxH'; every image goes to the nearest aspect.",
        "bucket_resolutions")
    conditioning_data_dir: str | None = setting(
        None, "Folder of conditioning images paired with this dataset's images by relative "
        "file name (image-to-image flavours; the extension may differ).")
    cache_dir_vae: str | None = setting(
        None, "Latent cache folder for this dataset; None: under [cache] dir.", "cache_dir_vae")
    synthetic_images: int = setting(
        0, "When the folder is missing or empty, first write this many generated images with "
        "captions (for smoke tests; 0: never).", ge=0)


class CacheTable(Table):
    """[cache]: the text-embedding and latent caches."""

    dir: str = setting("/data/cache", "Cache root; entries are keyed by a fingerprint.",
                       "cache_dir")
    vae_batch_size: int = setting(4, "Images per VAE encode call.", "vae_batch_size", gt=0)
    text_batch_size: int = setting(16, "Prompts per text-encoder call.", gt=0)
    write_batch_size: int = setting(
        128, "Encoded entries that may wait for the background writer before encoding pauses "
        "(bounds memory while disk writes overlap encoding).", "write_batch_size", gt=0)
    compile_kernels: bool = setting(
        True, "With compile_blocks: keep torch.compile's compiled kernels under <dir>/compile "
        "(TORCHINDUCTOR_CACHE_DIR), so a resumed or repeated job on the same torch and GPU "
        "reuses them instead of compiling again; a TORCHINDUCTOR_CACHE_DIR set in the "
        "environment wins. Safe to delete at any time.")


class ValidationTable(Table):
    """[validation]: sample images and the eval loss."""

    enabled: bool = setting(True, "Run validation (every step_interval and at the end).")
    step_interval: int | None = setting(
        None, "Steps between validations; None: only at the end.", "validation_step_interval",
        gt=0)
    prompt: str | None = setting(None, "The validation prompt.", "validation_prompt")
    negative_prompt: str = setting("", "Negative prompt for every validation image.",
                                   "validation_negative_prompt")
    prompt_library: dict[str, str] | str | None = setting(
        None, "Name -> prompt, as a table or the path of a JSON file.",
        "validation_prompt_library")
    resolution: list[str] | str | int = setting(
        "1024x1024", "Sizes to sample, 'WxH' or a list ('1024x1024,1280x768' is accepted).",
        "validation_resolution")
    guidance: float = setting(7.0, "Classifier-free guidance scale.", "validation_guidance", ge=0)
    num_inference_steps: int = setting(30, "Sampling steps.", "validation_num_inference_steps",
                                       gt=0)
    seed: int = setting(42, "Seed of every validation image.", "validation_seed")
    use_ema: bool = setting(True, "Sample with the EMA weights when train.use_ema is on.",
                            "ema_validation")
    conditioning_images: list[str] = setting(
        [], "Image-to-image flavours: a conditioning image per validation prompt, in order "
        "(validation.prompt first, then the library's); one image serves every prompt.")
    eval_dataset: str | None = setting(
        None, "Dataset id held out for the eval loss (not trained on).", "eval_dataset_id")
    eval_split: float = setting(
        0.0, "Fraction of the training images held out for the eval loss when no eval_dataset. "
        "0 (and no eval_dataset): the eval loss is measured on the first 8 training images "
        "(eval_source train_subset in the log): comparable across steps, but not held out.",
        ge=0, lt=1)
    eval_timesteps: list[int] = setting(
        [100, 300, 500, 700, 900], "Fixed timesteps the eval loss is scored at.")
    eval_seed: int = setting(1234, "Seed of the fixed eval noise.")
    guidance_skip_layers: list[int] | None = setting(
        None, "Skip-layer guidance: transformer blocks skipped in the extra guidance pass "
        "(SD3.5 Medium: [7, 8, 9]); None: off. Needs guidance > 1.",
        "validation_guidance_skip_layers")
    guidance_skip_layers_start: float = setting(
        0.01, "Fraction of the sampling steps after which skip-layer guidance starts.",
        "validation_guidance_skip_layers_start", ge=0, le=1)
    guidance_skip_layers_stop: float = setting(
        0.2, "Fraction of the sampling steps at which skip-layer guidance stops.",
        "validation_guidance_skip_layers_stop", ge=0, le=1)
    guidance_skip_scale: float = setting(
        2.8, "Scale of the skip-layer guidance term (double it per extra skipped layer).",
        "validation_guidance_skip_scale", ge=0)


class CheckpointTable(Table):
    """[checkpoint]: when to save and what to resume from."""

    step_interval: int | None = setting(500, "Steps between checkpoints; None: only at the end.",
                                        "checkpoint_step_interval", gt=0)
    total_limit: int | None = setting(
        None, "Keep at most this many checkpoints (besides one superseded-*/ set: see "
        "resume_from).", "checkpoints_total_limit", gt=0)
    resume_from: str = setting(
        "latest", "latest: the newest complete checkpoint if any; none: start fresh; or a path. "
        "This folder's checkpoints of later steps than the run starts from (all of them with "
        "none) are moved to checkpoints/superseded-<time>/: kept, the latest set only, never "
        "resumed or pruned.", "resume_from_checkpoint")


Precision = Literal["no_change", "int8-torchao", "fp8-torchao", "int8-quanto", "int4-quanto",
                    "int2-quanto", "fp8-quanto"]


class SpeedupsTable(Table):
    """[speedups]: optimizations applied after the model is built."""

    allow_tf32: bool = setting(
        True, "TF32 matmuls on Ampere and newer GPUs (10 mantissa bits in, fp32 sums).",
        "allow_tf32")
    fp32_attention: Literal["auto", "sdpa", "fp16_flash"] = setting(
        "auto", "Kernel for fp32 attention (mixed_precision = \"no\") in sdxl's and the Stage C "
        "prior's blocks. sdpa: PyTorch SDPA, whose fp32 kernel runs on the CUDA cores (44% of "
        "a Stage C lite fp32 step, bench/RESULTS.md); fp16_flash: FlashAttention with fp16 "
        "inputs and fp32 sums on the tensor cores (the 10 mantissa bits TF32 gives every "
        "other fp32 matmul), v and the output gradient scaled exactly by powers of two per "
        "head so fp16's range does not cut them; needs allow_tf32 (whose rounding it "
        "matches) and a CUDA GPU of compute capability 8.0+ (elsewhere: SDPA, with a "
        "warning); head dims over 128 keep SDPA. auto: fp16_flash where a GPU run measured "
        "it (the Stage C prior in fp32: lite 1.68x the TF32 reference step, 1.76x with "
        "checkpointing), sdpa elsewhere. bf16/fp16 attention keeps SDPA.")
    attention_mechanism: Literal["diffusers", "sageattention"] = setting(
        "diffusers", "diffusers: PyTorch SDPA everywhere; sageattention: SageAttention for "
        "validation sampling only (it has no backward pass), SDPA with a warning when the "
        "package or a CUDA GPU is missing.", "attention_mechanism")
    base_model_precision: Precision = setting(
        "no_change", "Weight quantisation of the frozen base (LoRA trains on top): "
        "int8-torchao (tested path), fp8-torchao (GPUs with fp8), *-quanto (extra "
        "tunejob[quanto]); no_change: unquantised.", "base_model_precision")
    text_encoder_1_precision: Precision = setting(
        "no_change", "Weight quantisation of the first text encoder while caching.",
        "text_encoder_1_precision")
    text_encoder_2_precision: Precision = setting(
        "no_change", "Weight quantisation of the second text encoder while caching.",
        "text_encoder_2_precision")
    text_encoder_3_precision: Precision = setting(
        "no_change", "Weight quantisation of the third text encoder (SD3's T5) while caching.",
        "text_encoder_3_precision")
    fp8_base_matmuls: bool = setting(
        False, "LoRA on a DiT (sd3, kandinsky5-image): the frozen block linears multiply in "
        "float8 (e4m3, row-wise scales; forward and input gradient, no weight gradient), an "
        "approximation of bf16; GPUs of compute capability 8.9+ (the CPU runs the same math, "
        "slowly, for checks).")
    compile_blocks: bool | Literal["auto"] = setting(
        "auto", "torch.compile each repeated block of the denoiser (regional compile; the "
        "first steps are slower while it compiles; needs a C compiler on a GPU). auto: on with "
        "a CUDA GPU and a C compiler, where it was measured faster (1.1-2.2x the plain step, "
        "bench/RESULTS.md); off on the CPU, with a quantised base, group offload or fsdp2 "
        "(not measured). With train.gradient_checkpointing the UNets' blocks (sdxl, the Stage C "
        "prior) that recompute (all, or the gradient_checkpointing_ratio share) do it inside "
        "their compiled graphs.")
    cuda_graphs: bool | Literal["auto"] = setting(
        "auto", "With compile_blocks on a CUDA GPU: the UNets' blocks (sdxl, the Stage C prior) "
        "replay as CUDA graphs (torch.compile's reduce-overhead mode), so the step stops "
        "waiting on the CPU to launch kernels (SDXL: 2.18x the plain step, 3.9x with gradient "
        "checkpointing). Not with group offload or fsdp2. "
        "auto: on where measured: an sdxl LoRA on an unquantised base, checkpointing all "
        "blocks or none, and a Stage C prior LoRA in bf16 without checkpointing (lite: 2.14x "
        "the plain step with graphs, 1.42x without); off for the Stage C prior with "
        "checkpointing (no gain measured) and otherwise (Stage C in fp32, LCM distillation, "
        "full fine-tunes, ratio < 1: not measured on a GPU yet; true to try).")
    channels_last: bool | Literal["auto"] = setting(
        "auto", "Convolutional denoisers (sdxl's UNet, the Stage C prior) in channels_last "
        "memory format, which cuDNN's tensor-core convolutions prefer; the same numbers. "
        "auto: with compile_blocks (eager, SDXL measured 0.88x with it), not with fsdp2.")
    base_model_default_dtype: Literal["auto", "bf16", "fp32"] = setting(
        "auto", "dtype of the frozen base's unquantised weights; auto: the "
        "train.mixed_precision dtype.", "base_model_default_dtype")
    enable_group_offload: bool = setting(
        False, "Keep the frozen transformer blocks in CPU memory and bring each group to the "
        "GPU only while it runs (diffusers group offloading; families with the offload "
        "feature). Needs train.gradient_checkpointing to lower training memory.",
        "enable_group_offload")
    group_offload_type: Literal["block_level", "leaf_level"] = setting(
        "block_level", "Offload granularity: groups of transformer blocks, or single layers.",
        "group_offload_type")
    group_offload_blocks_per_group: int = setting(
        1, "Transformer blocks per offload group (block_level).",
        "group_offload_blocks_per_group", gt=0)
    group_offload_use_stream: bool = setting(
        False, "Prefetch the next group on a CUDA stream while the current one runs (CUDA "
        "only; one block per group).", "group_offload_use_stream")
    enable_model_cpu_offload: bool = setting(
        False, "Components wait in CPU memory except while they run (kandinsky5-image: the "
        "VAE, which otherwise stays on the GPU after caching, comes only to decode "
        "validation images; the text encoders always wait there after caching). Not "
        "together with enable_group_offload.",
        "enable_model_cpu_offload")
    offload_during_startup: bool = setting(
        False, "While caching, the text encoders and the VAE are never on the GPU at the same "
        "time (each waits in CPU memory while the other works).", "offload_during_startup")


class LcmTable(Table):
    """[distillation.lcm]: latent consistency distillation (arXiv 2310.04378, 2311.05556)."""

    num_ddim_timesteps: int = setting(
        50, "Points of the teacher's DDIM grid; one solver step skips num_train_timesteps / "
        "this.", "num_ddim_timesteps", gt=0, le=1000)
    w_min: float = setting(1.0, "Smallest guidance w drawn per sample (CFG scale w + 1).",
                           "w_min", ge=0)
    w_max: float = setting(12.0, "Largest guidance w drawn per sample (CFG scale w + 1).",
                           "w_max", ge=0)
    loss_type: Literal["l2", "huber"] = setting(
        "l2", "l2: mean squared error; huber: pseudo-Huber sqrt(d^2 + c^2) - c.", "loss_type")
    huber_c: float = setting(0.001, "The pseudo-Huber loss's c.", "huber_c", gt=0)
    timestep_scaling_factor: float = setting(
        10.0, "Timestep scale in the boundary scalings c_skip and c_out (LCMScheduler's "
        "timestep_scaling).", "timestep_scaling_factor", gt=0)


class DistributedTable(Table):
    """[distributed]: several GPUs or hosts (the entrypoint runs `accelerate launch`)."""

    strategy: Literal["ddp", "fsdp2"] = setting(
        "ddp", "ddp: every GPU holds the model, gradients averaged; fsdp2: a full fine-tune's "
        "weights, gradients and optimizer state sharded over the GPUs (torch FSDP2; needs "
        "several processes and a shared output folder; not for LoRA).")
    num_processes: int = setting(
        0, "Processes (GPUs) in all, for the entrypoint; 0: every GPU of every machine.", ge=0)
    num_machines: int = setting(1, "Machines (hosts) in the job, for the entrypoint.", ge=1)
    timeout_s: float = setting(
        1800.0, "Seconds a collective may wait before the run fails (the process group's "
        "timeout); caching never waits in a collective. Also the longest a finished process "
        "waits at the end for the others.", gt=0)
    rendezvous_timeout_s: int = setting(
        1800, "Several machines: seconds each machine's launcher waits for the others to "
        "join (pods pending or pulling the image on a fresh node); accelerate's own default "
        "is 600.", gt=0)
    cache_stall_s: float = setting(
        600.0, "While waiting for other ranks' cache entries: seconds without a new one before "
        "this rank encodes the rest itself.", gt=0)
    scale_lr: bool = setting(
        False, "Multiply learning_rate by the number of processes (linear scaling rule); "
        "off: the configured rate is used as is.")


class DistillationTable(Table):
    """[distillation]: distil the model into a few-step student."""

    method: Literal["none", "lcm"] = setting(
        "none", "none: plain fine-tuning; lcm: latent consistency distillation.",
        "distillation_method")
    student: Literal["lora", "full"] = setting(
        "lora", "lora: a LoRA on the teacher (LCM-LoRA; must match model.model_type); full: "
        "every weight, with an EMA target network.")
    target_ema_decay: float = setting(
        0.95, "EMA decay of the target network of a full student.", gt=0, lt=1)
    lcm: LcmTable = Field(default_factory=LcmTable, description="LCM settings.")


class Sd3Table(Table):
    """[sd3]: Stable Diffusion 3 / 3.5 (model.family = "sd3"): flow matching and text."""

    flow_schedule_shift: float = setting(
        3.0, "Static shift of the training sigmas, s*sigma / (1 + (s-1)*sigma); 1: none.",
        "flow_schedule_shift", gt=0)
    flow_schedule_auto_shift: bool = setting(
        False, "Shift from each batch's image size (diffusers' calculate_shift over the "
        "scheduler config's sequence lengths and shifts) instead of flow_schedule_shift.",
        "flow_schedule_auto_shift")
    flow_use_uniform_schedule: bool = setting(
        False, "Draw sigmas uniformly instead of logit-normal.", "flow_use_uniform_schedule")
    logit_mean: float = setting(0.0, "Mean of the logit-normal sigma distribution: above 0 "
                                "draws more noise, as in the SD3 paper (diffusers' SD3 scripts "
                                "read it with the opposite sign).", "logit_mean")
    logit_std: float = setting(1.0, "Standard deviation of the logit-normal sigma "
                               "distribution.", "logit_std", gt=0)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = setting(
        "none", "Per-sample loss weight from the SD3 paper: none (plain MSE), sigma_sqrt "
        "(sigma^-2) or cosmap (diffusers' weighting_scheme values of the same names).")
    tokenizer_max_length: int = setting(
        154, "T5 tokens per caption: 154 (SimpleTuner's), 77 to save cache space, up to 256 "
        "(SD3.5 was trained with 77 and 256; the pipeline's default); above 256 needs "
        "job.i_know_what_i_am_doing.", "tokenizer_max_length", gt=0)
    t5_padding: Literal["unmodified", "zero"] = setting(
        "unmodified", "unmodified: T5's outputs at padding as the stock pipeline feeds them; "
        "zero: zeroed at padding positions.", "t5_padding")
    clip_uncond_behaviour: Literal["empty_string", "zero"] = setting(
        "empty_string", "Unconditional CLIP input (caption dropout, CFG without a negative "
        "prompt): the encoded empty caption, or zeros.", "sd3_clip_uncond_behaviour")
    t5_uncond_behaviour: Literal["empty_string", "zero"] = setting(
        "empty_string", "Unconditional T5 input: the encoded empty caption, or zeros.",
        "sd3_t5_uncond_behaviour")


class StableCascadeTable(Table):
    """[stable_cascade]: Stable Cascade Stage C prior (model.family = "stable_cascade")."""

    effnet_encoder_path: str | None = setting(
        None, "The release's effnet_encoder.safetensors (EfficientNet latent encoder); None: "
        "that file of decoder_model_name_or_path (hub or folder). Required to cache latents.")
    loss_weighting: Literal["p2", "adaptive"] = setting(
        "p2", "p2: 1 / (1 + SNR); adaptive: the release's per-noise-level inverse running "
        "loss (its state is saved in checkpoints).")
    use_decoder_for_validation: bool = setting(
        True, "Decode validation priors to images with the stock Stage B decoder pipeline; "
        "off: save the prior latents and a colour preview.",
        "stable_cascade_use_decoder_for_validation")
    previewer_path: str | None = setting(
        None, "The release's previewer.safetensors: without the decoder, previews come from "
        "it; None: a colour projection of the latent channels.")
    decoder_model_name_or_path: str = setting(
        "stabilityai/stable-cascade", "Hub id or folder of the Stage B decoder pipeline.",
        "stable_cascade_decoder_model_name_or_path")
    decoder_subfolder: str = setting(
        "decoder", "Decoder UNet subfolder: decoder, decoder_lite or a custom one.",
        "stable_cascade_decoder_subfolder")
    validation_prior_num_inference_steps: int = setting(
        20, "Prior sampling steps (validation.num_inference_steps sets the decoder's).",
        "stable_cascade_validation_prior_num_inference_steps", gt=0)
    validation_prior_guidance_scale: float | None = setting(
        None, "Prior CFG scale; wins over validation.guidance when both are set (None: "
        "validation.guidance).", "stable_cascade_validation_prior_guidance_scale", ge=0)
    validation_decoder_guidance_scale: float = setting(
        0.0, "Decoder CFG scale (0: photographic; above 0 follows the prompt more).",
        "stable_cascade_validation_decoder_guidance_scale", ge=0)


class TreadRoute(Table):
    """One [[tread.routes]] entry: which blocks a share of the image tokens skips."""

    selection_ratio: float = setting(
        ..., "Share of the image tokens that skip the routed blocks (0 routes none).", ge=0, lt=1)
    start_layer_idx: int = setting(
        ..., "First routed block (negative: counted from the end).")
    end_layer_idx: int = setting(
        ..., "Last routed block, inclusive (negative: counted from the end).")


class TreadTable(Table):
    """[tread]: TREAD token routing in training (arXiv 2501.04765)."""

    routes: list[TreadRoute] = setting(
        [], "Routes (families kandinsky5-image and sd3); during training a random subset "
        "of image tokens bypasses each route's blocks and rejoins after them. Empty: no "
        "routing.")


class Kandinsky5Table(Table):
    """[kandinsky5]: settings of the kandinsky5-image family."""

    flow_schedule_shift: float = setting(
        1.0, "Static shift of the training sigmas: above 1 more time at high noise (layout and "
        "colour), below 1 more at low noise (texture).", "flow_schedule_shift", gt=0)
    flow_use_uniform_schedule: bool = setting(
        False, "Draw training sigmas uniformly instead of logit-normal.",
        "flow_use_uniform_schedule")
    logit_mean: float = setting(0.0, "Mean of the logit-normal sigma distribution.",
                                "flow_matching_loss_logit_mean")
    logit_std: float = setting(1.0, "Standard deviation of the logit-normal sigma "
                               "distribution.", "flow_matching_loss_logit_std", gt=0)
    tokenizer_max_length: int | None = setting(
        None, "Qwen2.5-VL tokens kept per caption after the template; None: the stock "
        "pipeline's (512 t2i, 1024 i2i).", "tokenizer_max_length", gt=0, le=1024)


class JobConfig(Table):
    """The whole job file."""

    job: JobTable
    model: ModelTable
    lora: LoraTable = Field(default_factory=LoraTable, description="The LoRA adapter.")
    train: TrainTable = Field(default_factory=TrainTable, description="The training loop.")
    optimizer: OptimizerTable = Field(default_factory=OptimizerTable,
                                      description="Optimizer and schedule.")
    datasets: list[DatasetTable] = Field(..., description="Image folders.", min_length=1)
    cache: CacheTable = Field(default_factory=CacheTable, description="Caches.")
    validation: ValidationTable = Field(default_factory=ValidationTable,
                                        description="Validation.")
    checkpoint: CheckpointTable = Field(default_factory=CheckpointTable,
                                        description="Checkpoints.")
    speedups: SpeedupsTable = Field(default_factory=SpeedupsTable, description="Speedups.")
    distillation: DistillationTable = Field(default_factory=DistillationTable,
                                            description="Distillation.")
    distributed: DistributedTable = Field(default_factory=DistributedTable,
                                          description="Several GPUs or hosts.")
    sd3: Sd3Table = Field(default_factory=Sd3Table, description="SD3 family settings.")
    stable_cascade: StableCascadeTable = Field(default_factory=StableCascadeTable,
                                               description="Stable Cascade family settings.")
    kandinsky5: Kandinsky5Table = Field(default_factory=Kandinsky5Table,
                                        description="Kandinsky 5 family settings.")
    tread: TreadTable = Field(default_factory=TreadTable, description="TREAD token routing.")

    def output_path(self) -> str:
        """The job's own output folder."""
        return f"{self.job.output_dir.rstrip('/')}/{self.job.name}"

    def enabled_datasets(self) -> list[DatasetTable]:
        """Datasets not marked disabled."""
        return [d for d in self.datasets if not d.disabled]


def parse_size(text: str, where: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); ConfigError naming the key otherwise."""
    from job.errors import ConfigError

    parts = text.lower().strip().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{where} = {text!r} is not a size", "write sizes as 'WIDTHxHEIGHT', "
                          "e.g. '1024x1024'")
    return int(parts[0]), int(parts[1])


def validation_sizes(cfg: JobConfig) -> list[tuple[int, int]]:
    """The validation sizes as (width, height), from a list, 'A,B' text or an int."""
    value = cfg.validation.resolution
    if isinstance(value, int):
        return [(value, value)]
    items = value if isinstance(value, list) else value.split(",")
    return [parse_size(item, "validation.resolution") for item in items if item.strip()]


def check_rules(cfg: JobConfig) -> list[str]:
    """Cross-field rules: raise ConfigError on a contradiction, return warnings to log."""
    from job.errors import ConfigError
    from job.models.registry import family_names, family_rules, spec_for

    if cfg.model.family not in family_names():
        import difflib

        wanted = cfg.model.family.lower()
        close = [n for n in family_names() if n.startswith(wanted[:3])] or \
            difflib.get_close_matches(wanted, family_names(), n=1)
        raise ConfigError(
            f"model.family = {cfg.model.family!r} is not a known family",
            f"use one of {', '.join(family_names())}"
            + (f" (did you mean {close[0]!r}?)" if close else ""))
    spec = spec_for(cfg.model.family)
    if cfg.model.flavour is not None and cfg.model.flavour not in spec.flavours:
        raise ConfigError(
            f"model.flavour = {cfg.model.flavour!r} does not exist for family {spec.name!r}",
            f"use one of {', '.join(spec.flavours)}, or leave it out for {spec.default_flavour!r}")
    if cfg.train.max_train_steps is None and cfg.train.num_train_epochs is None:
        raise ConfigError("neither train.max_train_steps nor train.num_train_epochs is set",
                          "set one of them, e.g. max_train_steps = 1000")
    _check_datasets(cfg, spec.alignment)
    for width, height in validation_sizes(cfg):
        if width % spec.alignment or height % spec.alignment:
            raise ConfigError(
                f"validation.resolution {width}x{height} is not divisible by {spec.alignment}",
                f"{spec.name} needs sizes that are multiples of {spec.alignment}")
    if cfg.optimizer.name == "adamw_bf16" and cfg.train.mixed_precision != "bf16" \
            and "bf16_weights_fp32_compute" not in spec.features:
        raise ConfigError(
            f'optimizer.name = "adamw_bf16" keeps weights in bf16 but train.mixed_precision = '
            f'"{cfg.train.mixed_precision}"', 'set mixed_precision = "bf16" or use "adamw"')
    if cfg.distillation.method != "none":
        _check_distillation(cfg, spec)
    if cfg.distributed.strategy == "fsdp2":
        _check_fsdp2(cfg)
    notes = _check_family_features(cfg, spec) + _warnings(cfg)
    rules = family_rules(spec.name)
    return notes + (rules(cfg) if rules is not None else [])


def _check_family_features(cfg: JobConfig, spec: Any) -> list[str]:
    """Settings the chosen family cannot act on: an error where the result would differ
    from what was asked (quantisation), a warning where it is only ignored."""
    from job.errors import ConfigError
    from job.models.registry import FAMILIES

    s, notes = cfg.speedups, []
    quantised = {k: getattr(s, k) for k in ("base_model_precision", "text_encoder_1_precision",
                                            "text_encoder_2_precision", "text_encoder_3_precision")
                 if getattr(s, k) != "no_change"}
    if quantised and "quantisation" not in spec.features:
        key, value = next(iter(quantised.items()))
        raise ConfigError(f'speedups.{key} = "{value}" but family {spec.name!r} loads its '
                          "weights unquantised", f"quantisation works with family "
                          f"{_able('quantisation')}; or set {key} = \"no_change\"")
    if cfg.validation.guidance_skip_layers and "skip_layer_guidance" not in spec.features:
        notes.append(f"validation.guidance_skip_layers is ignored: family {spec.name!r} samples "
                     "with a pipeline that has no skip-layer guidance")
    if s.attention_mechanism == "sageattention" and "sageattention" not in spec.features:
        notes.append(f'speedups.attention_mechanism = "sageattention" is ignored: family '
                     f"{spec.name!r} samples with PyTorch SDPA")
    notes += _check_offload(cfg, spec) + _check_kernel_settings(cfg, spec) \
        + _check_routing(cfg, spec) + _check_fp8(cfg, spec)
    for other in FAMILIES.values():
        table = other.settings_table
        if table and other.name != spec.name and table in cfg.model_fields_set:
            notes.append(f"[{table}] is ignored: it holds settings of family {other.name!r}, and "
                         f"this job trains {spec.name!r}")
    return notes


def _check_fp8(cfg: JobConfig, spec: Any) -> list[str]:
    """[speedups] fp8_base_matmuls: a LoRA on a DiT's unquantised bf16 base, not offloaded."""
    from job.errors import ConfigError

    s = cfg.speedups
    if not s.fp8_base_matmuls:
        return []
    where = "speedups.fp8_base_matmuls = true"
    if "fp8_matmuls" not in spec.features:
        raise ConfigError(f"{where} but family {spec.name!r} has no float8 block linears",
                          f"fp8_base_matmuls works with family {_able('fp8_matmuls')}; or set "
                          "it to false")
    problems = [
        (cfg.model.model_type != "lora", 'model.model_type = "full" (a full fine-tune needs '
         "weight gradients, which this layer does not compute)", 'train a LoRA'),
        (cfg.train.mixed_precision != "bf16", f'train.mixed_precision = '
         f'"{cfg.train.mixed_precision}" (the float8 matmuls return bf16)',
         'set train.mixed_precision = "bf16"'),
        (s.base_model_precision != "no_change", f'speedups.base_model_precision = '
         f'"{s.base_model_precision}" (the base is quantised to float8 already)',
         'set base_model_precision = "no_change"'),
        (s.enable_group_offload, "speedups.enable_group_offload = true (the float8 weights "
         "are not offloaded)", "set enable_group_offload = false"),
    ]
    _refuse_first(where, problems, ", or set fp8_base_matmuls = false")
    return []


def _refuse_first(where: str, problems: list[tuple[bool, str, str]], or_else: str = "") -> None:
    """A ConfigError for the first (bad, what, fix) of `problems` that is bad: "`where` with
    `what`", its fix followed by `or_else`."""
    from job.errors import ConfigError

    for bad, what, fix in problems:
        if bad:
            raise ConfigError(f"{where} with {what}", fix + or_else)


def _check_offload(cfg: JobConfig, spec: Any) -> list[str]:
    """Group offload and model CPU offload against the family and each other."""
    from job.errors import ConfigError

    s, notes = cfg.speedups, []
    if s.enable_group_offload and s.enable_model_cpu_offload:
        raise ConfigError("speedups.enable_group_offload and speedups.enable_model_cpu_offload "
                          "are both on; they move the same weights with different hooks",
                          "keep enable_group_offload (it also lowers training memory) and set "
                          "enable_model_cpu_offload = false")
    if s.enable_group_offload and "offload" not in spec.features:
        raise ConfigError(f"speedups.enable_group_offload = true but family {spec.name!r} keeps "
                          "its denoiser on the GPU", f"group offload works with family "
                          f"{_able('offload')}; or set enable_group_offload = false")
    if s.enable_group_offload and cfg.train.gradient_checkpointing \
            and cfg.train.gradient_checkpointing_ratio < 1:
        raise ConfigError(f"speedups.enable_group_offload = true with "
                          f"train.gradient_checkpointing_ratio = "
                          f"{cfg.train.gradient_checkpointing_ratio}: a block that keeps its "
                          "activations keeps its weights on the GPU until the backward pass",
                          "set gradient_checkpointing_ratio = 1.0 with group offload")
    if s.group_offload_use_stream and cfg.job.device == "cpu":
        raise ConfigError('speedups.group_offload_use_stream = true needs CUDA, and job.device '
                          '= "cpu"', "set group_offload_use_stream = false on the CPU")
    if s.group_offload_use_stream and s.group_offload_type == "block_level" \
            and s.group_offload_blocks_per_group != 1:
        raise ConfigError(f"speedups.group_offload_use_stream = true prefetches one block at a "
                          f"time, but group_offload_blocks_per_group = "
                          f"{s.group_offload_blocks_per_group}", "set group_offload_blocks_per_group "
                          "= 1, or group_offload_use_stream = false")
    if s.enable_group_offload and s.group_offload_use_stream \
            and s.base_model_precision.endswith("-torchao"):
        raise ConfigError(f'speedups.group_offload_use_stream = true with base_model_precision = '
                          f'"{s.base_model_precision}": the stream copies from pinned memory, '
                          "and torchao's quantised weights cannot be pinned",
                          "set group_offload_use_stream = false (synchronous offload), or "
                          'base_model_precision = "no_change"')
    for key in ("enable_model_cpu_offload", "offload_during_startup"):
        if getattr(s, key) and "offload" not in spec.features:
            notes.append(f"speedups.{key} is ignored: family {spec.name!r} does not offload")
    return notes


def _check_kernel_settings(cfg: JobConfig, spec: Any) -> list[str]:
    """Settings of the denoiser's kernels: the fp32 attention kernel, those that act
    through the compiled blocks, and channels_last's family."""
    from job.errors import ConfigError

    s, notes = cfg.speedups, []
    if s.fp32_attention == "fp16_flash" and "fp32_attention" not in spec.features:
        notes.append(f'speedups.fp32_attention = "fp16_flash" is ignored: family '
                     f"{spec.name!r} has its own attention processors (SDPA)")
    elif s.fp32_attention == "fp16_flash" and cfg.train.mixed_precision != "no":
        notes.append(f'speedups.fp32_attention = "fp16_flash" is ignored with mixed_precision '
                     f'= "{cfg.train.mixed_precision}": the attention runs in '
                     f"{cfg.train.mixed_precision} through SDPA; it applies to fp32 training")
    elif s.fp32_attention == "fp16_flash" and not s.allow_tf32:
        raise ConfigError('speedups.fp32_attention = "fp16_flash" with allow_tf32 = false: it '
                          "rounds the attention's matmul inputs to 10 mantissa bits, as TF32 "
                          "does, and allow_tf32 = false asks for full fp32 matmuls",
                          'set allow_tf32 = true, or fp32_attention = "sdpa"')
    if cfg.train.activation_memory_budget is not None and s.compile_blocks is False:
        raise ConfigError(f"train.activation_memory_budget = "
                          f"{cfg.train.activation_memory_budget} with speedups.compile_blocks = "
                          "false: the budget is applied by torch.compile's partitioner to the "
                          "compiled blocks", 'set compile_blocks = true (or "auto" on a GPU), '
                          "or remove activation_memory_budget")
    if s.channels_last is True and "channels_last" not in spec.features:
        notes.append(f"speedups.channels_last is ignored: family {spec.name!r} has no "
                     "convolutional denoiser")
    return notes


def _check_routing(cfg: JobConfig, spec: Any) -> list[str]:
    """TREAD routes and conditioning images against the family."""
    from job.errors import ConfigError

    if cfg.tread.routes and "tread" not in spec.features:
        raise ConfigError(f"[tread] routes are set but family {spec.name!r} has no token "
                          f"routing", f"TREAD works with family {_able('tread')}; or remove "
                          "[tread]")
    if "conditioning" in spec.features:
        return []
    return [f"datasets[{i}].conditioning_data_dir is ignored: family {spec.name!r} trains "
            "without conditioning images" for i, ds in enumerate(cfg.datasets)
            if ds.conditioning_data_dir]


def _able(feature: str) -> str:
    """The families with `feature`, for an error's fix."""
    from job.models.registry import FAMILIES

    return ", ".join(f.name for f in FAMILIES.values() if feature in f.features) or "(none)"


def _check_distillation(cfg: JobConfig, spec: Any) -> None:
    """The family supports the method; the student and the guidance range make sense."""
    from job.errors import ConfigError
    from job.models.registry import FAMILIES

    d = cfg.distillation
    if not spec.supports_lcm:
        able = [s.name for s in FAMILIES.values() if s.supports_lcm]
        raise ConfigError(f'distillation.method = "{d.method}" is not supported by family '
                          f"{spec.name!r}", f"LCM distillation works with family "
                          f"{', '.join(able) or '(none)'}; or set distillation.method = \"none\"")
    if d.student != cfg.model.model_type:
        raise ConfigError(f'distillation.student = "{d.student}" but model.model_type = '
                          f'"{cfg.model.model_type}"', "set both to the same value")
    if d.lcm.w_min > d.lcm.w_max:
        raise ConfigError(f"distillation.lcm.w_min = {d.lcm.w_min} is above w_max = "
                          f"{d.lcm.w_max}", "set w_min <= w_max (w = w_min = w_max fixes w)")


def _check_fsdp2(cfg: JobConfig) -> None:
    """FSDP2 shards a full fine-tune's plain weights, and nothing kept beside them."""
    where = 'distributed.strategy = "fsdp2"'
    s = cfg.speedups
    problems = [
        (cfg.model.model_type != "full", f'model.model_type = "{cfg.model.model_type}": a '
         "LoRA's frozen base is the same on every GPU and its adapter is small, so there is "
         "nothing worth sharding", 'use strategy = "ddp" for LoRA (or model_type = "full")'),
        (cfg.distillation.method != "none", f'distillation.method = "{cfg.distillation.method}"'
         ": the distillation keeps a frozen teacher and a target network beside the student, "
         "which are not sharded", 'use strategy = "ddp" for distillation'),
        (s.base_model_precision != "no_change", f'speedups.base_model_precision = '
         f'"{s.base_model_precision}": FSDP2 shards plain weights, not quantised ones',
         'set base_model_precision = "no_change"'),
        (s.enable_group_offload, "speedups.enable_group_offload = true: FSDP2 places the "
         "weights itself", "set enable_group_offload = false"),
        (s.channels_last is True, "speedups.channels_last = true: FSDP2 shards contiguous "
         "weights only, and channels_last convolution weights are not", "set channels_last = "
         'false (or "auto", which leaves it off with fsdp2)'),
    ]
    _refuse_first(where, problems)


def _check_datasets(cfg: JobConfig, alignment: int) -> None:
    """Dataset ids, captions, sizes and buckets."""
    from job.data.sizes import check_sizes
    from job.errors import ConfigError

    ids = [d.id for d in cfg.datasets]
    for i, ds_id in enumerate(ids):
        if ids.index(ds_id) != i:
            raise ConfigError(f"datasets[{i}].id = {ds_id!r} is already the id of "
                              f"datasets[{ids.index(ds_id)}]", "give every [[datasets]] its own id")
    if not cfg.enabled_datasets():
        keys = ", ".join(f"datasets[{i}].disabled" for i in range(len(cfg.datasets)))
        raise ConfigError(f"every [[datasets]] entry is disabled ({keys} = true)",
                          "set disabled = false on at least one dataset, or add one")
    held_out = cfg.validation.eval_dataset
    if held_out is not None and held_out not in ids:
        raise ConfigError(f"validation.eval_dataset = {held_out!r} names no "
                          "dataset", f"use one of {', '.join(ids)}")
    if held_out is not None and {d.id for d in cfg.enabled_datasets()} == {held_out}:
        raise ConfigError(f"validation.eval_dataset = {held_out!r} is the only enabled dataset, "
                          "so nothing is left to train on", "add a [[datasets]] to train on, or "
                          "remove eval_dataset and hold out a fraction with "
                          "validation.eval_split = 0.1")
    for i, ds in enumerate(cfg.datasets):
        needs_prompt = ds.caption_strategy == "instanceprompt" or ds.prepend_instance_prompt
        if needs_prompt and not ds.instance_prompt:
            raise ConfigError(f"datasets[{i}] ({ds.id}) uses the instance prompt but "
                              "instance_prompt is not set", "set instance_prompt = \"...\"")
        check_sizes(ds)
        if ds.aspect_bucket_alignment and ds.aspect_bucket_alignment % alignment:
            raise ConfigError(
                f"datasets[{i}].aspect_bucket_alignment = {ds.aspect_bucket_alignment} is not a "
                f"multiple of {alignment}, the family's alignment, so buckets would have sides "
                "the model cannot take", f"use a multiple of {alignment} (e.g. {alignment * 4}), "
                "or leave aspect_bucket_alignment out")
        for text in ds.bucket_resolutions or []:
            width, height = parse_size(text, f"datasets[{i}].bucket_resolutions")
            step = ds.aspect_bucket_alignment or alignment
            if width % step or height % step:
                raise ConfigError(
                    f"datasets[{i}].bucket_resolutions {text!r} is not divisible by {step}",
                    "use sides that are multiples of aspect_bucket_alignment")


def _warnings(cfg: JobConfig) -> list[str]:
    """Settings that will be ignored or look wrong, said aloud (never silently changed)."""
    notes = []
    if cfg.model.model_type == "full" and "lora" in cfg.model_fields_set:
        notes.append("[lora] is ignored: model.model_type = \"full\" trains every weight")
    for i, ds in enumerate(cfg.datasets):
        for key in ("crop_aspect", "crop_style"):
            if getattr(ds, key) == type(ds).model_fields[key].default:
                continue
            if not ds.crop:
                notes.append(f"datasets[{i}].{key} is ignored: datasets[{i}].crop is false "
                             "(images are resized to fit their own aspect's bucket); set "
                             "crop = true to use it")
            elif key == "crop_aspect" and ds.bucket_resolutions:
                notes.append(f"datasets[{i}].crop_aspect is ignored: datasets[{i}]."
                             "bucket_resolutions set the bucket sizes")
    v = cfg.validation
    if v.enabled and not v.prompt and not v.prompt_library:
        notes.append("no validation.prompt or prompt_library: validation scores the eval loss "
                     "only and writes no images")
    steps = cfg.train.max_train_steps
    if steps is not None and cfg.optimizer.lr_warmup_steps > steps:
        notes.append(f"optimizer.lr_warmup_steps ({cfg.optimizer.lr_warmup_steps}) exceeds "
                     f"train.max_train_steps ({steps}): the peak learning rate is never reached")
    if cfg.optimizer.lr_scheduler == "constant" and cfg.optimizer.lr_warmup_steps:
        notes.append('optimizer.lr_warmup_steps is ignored with lr_scheduler = "constant"; '
                     'use "constant_with_warmup" to warm up')
    if not cfg.train.gradient_checkpointing and cfg.train.gradient_checkpointing_ratio < 1:
        notes.append("train.gradient_checkpointing_ratio is ignored: gradient_checkpointing is "
                     "off")
    if not cfg.train.use_ema and "use_ema" in cfg.validation.model_fields_set:
        notes.append("validation.use_ema is ignored: train.use_ema is off")
    return notes
