"""Optimizations, each an `apply_*` function, applied by `apply_speedups` in one order."""

from __future__ import annotations

from job.config import JobConfig
from job.models.registry import spec_for
from job.speedups.tf32 import apply_tf32


def apply_speedups(cfg: JobConfig, family) -> None:
    """Apply the enabled speedups in their documented order.

    Order: numeric modes first (TF32), since later steps specialise on them; then weight
    quantisation, before the text encoders fill the cache and before the LoRA is added on
    top of the quantised base; channels_last for convolutional denoisers; TREAD's routing
    hooks on the training forward; the sampling-only attention backend. Later, in run.py:
    group offload once the LoRA exists (job/speedups/offload.py), the fp32 attention kernel
    (job/speedups/attention.py), then regional compile (job/speedups/compile.py). A family
    without a feature never gets here with it set: the config rules refuse it or say that
    it is ignored.
    """
    features = spec_for(cfg.model.family).features
    apply_tf32(family, cfg.speedups)
    if "quantisation" in features:
        from job.speedups.quantize import apply_quantization

        apply_quantization(family, cfg.speedups)
    if "channels_last" in features and cfg.speedups.channels_last:
        from job.speedups.memory_format import apply_channels_last

        apply_channels_last(family.denoiser())
    if "tread" in features and cfg.tread.routes:
        from job.speedups.tread import apply_tread

        apply_tread(family)
    if "sageattention" in features:
        from job.speedups.attention import apply_sageattention

        apply_sageattention(family, cfg.speedups)
