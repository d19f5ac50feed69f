"""`tunejob export --merge` for the families whose final/ LoRA file the stock diffusers
pipeline loads (SDXL, SD3, Kandinsky 5): the base pipeline at fp32, the LoRA loaded with
load_lora_weights (alpha from the file's adapter metadata), fused into the base weights
(W + alpha/r * B A), the LoRA layers removed, and the pipeline saved. Stable Cascade's
adapter is a peft one and has its own export_merged (stable_cascade_output.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class StockPipelineMerge:
    """A mixin: the family gives `merge_pipeline_class`, `source` and `_hub_kwargs()`."""

    merge_pipeline_class: Any
    final_lora_file = "pytorch_lora_weights.safetensors"  # what save_final writes

    def export_merged(self, adapter_dir: Path, out_dir: Path,
                      dtype: torch.dtype = torch.float32) -> list[Path]:
        """The base pipeline with the LoRA in `adapter_dir` fused in (in fp32), saved in
        `dtype` to `out_dir`: a folder the stock pipeline's from_pretrained loads, without
        LoRA layers. The whole pipeline is held in CPU memory at fp32 meanwhile."""
        pipeline = self.merge_pipeline_class.from_pretrained(
            self._weights_source(), torch_dtype=torch.float32, **self._hub_kwargs())
        pipeline.load_lora_weights(str(adapter_dir))
        pipeline.fuse_lora(lora_scale=1.0)  # the scale the LoRA was trained at
        pipeline.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
        self._finish_merged(pipeline)
        pipeline.to(dtype=dtype)
        out_dir = Path(out_dir)
        pipeline.save_pretrained(str(out_dir), safe_serialization=True)
        return [out_dir / "model_index.json"]

    def _weights_source(self) -> str:
        """The base weights' hub id or folder."""
        return self.source

    def _finish_merged(self, pipeline: Any) -> None:
        """What the family changes in the merged pipeline before it is saved (nothing here)."""
