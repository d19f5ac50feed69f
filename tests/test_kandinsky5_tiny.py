"""The tiny Kandinsky 5 (job/models/kandinsky5_tiny.py): the t2i and i2i folders load with
the stock pipelines and generate, the Qwen tokenizer puts the prompt right after the
pipelines' template cut, and the transformer's modulations are non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from job.models.kandinsky5_tiny import KINDS, ensure_tiny_kandinsky5

PROMPT = "a red cube"
SUBFOLDERS = ["model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
              "tokenizer_2", "transformer", "vae"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kandinsky5")
    return {kind: ensure_tiny_kandinsky5(root / kind, kind) for kind in KINDS}


def _pipeline(folders: dict[str, Path], kind: str):
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

    pipeline_class = Kandinsky5I2IPipeline if kind == "i2i" else Kandinsky5T2IPipeline
    pipeline = pipeline_class.from_pretrained(folders[kind])
    # Sizes outside `resolutions` are snapped to the nearest trained one (1024 and up).
    pipeline.resolutions = [(64, 64)]
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 30, 30))


def test_t2i_folder_generates_64(folders: dict[str, Path]) -> None:
    folder = folders["t2i"]
    assert sorted(p.name for p in folder.iterdir()) == SUBFOLDERS
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 4 * 2**20
    pipeline = _pipeline(folders, "t2i")
    image = pipeline(PROMPT, height=64, width=64, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).image[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("kind,start", [("t2i", 40), ("i2i", 54)])
def test_prompt_starts_at_the_template_cut(folders: dict[str, Path], kind: str,
                                           start: int) -> None:
    pipeline = _pipeline(folders, kind)
    processor, template = pipeline.tokenizer, pipeline.prompt_template
    assert pipeline.prompt_template_encode_start_idx == start
    # The i2i pipeline sends its (halved) image with the prompt; its tokens follow the prompt.
    images = [_image(32)] if kind == "i2i" else None
    ids = processor(text=[template.format(PROMPT)], images=images, videos=None,
                    return_tensors="pt")["input_ids"][0].tolist()
    prefix = processor.tokenizer(template.split("{}")[0])["input_ids"]
    prompt = processor.tokenizer(PROMPT)["input_ids"]
    assert len(prefix) == start and ids[:start] == prefix
    assert ids[start:start + len(prompt)] == prompt and len(prompt) == 3
    if kind == "i2i":
        image_positions = [i for i, token in enumerate(ids) if token == processor.image_token_id]
        assert len(image_positions) == 4 and min(image_positions) > start + len(prompt)


def test_i2i_encodes_the_image_tokens_and_generates_64(folders: dict[str, Path]) -> None:
    pipeline = _pipeline(folders, "i2i")
    image = _image(64)
    qwen, clip, cu_seqlens = pipeline.encode_prompt(prompt=PROMPT, image=image, device="cpu",
                                                    dtype=torch.float32)
    # The prompt's 3 tokens, <|vision_start|>, 4 image tokens (64x64 halved to 32x32, scaled
    # up to 56x56: 4x4 patches, 2x2 after the merge), <|vision_end|>, <|im_end|>.
    assert qwen.shape == (1, 3 + 1 + 4 + 2, 32) and clip.shape == (1, 16)
    assert cu_seqlens.tolist() == [0, 10]
    out = pipeline(image=image, prompt=PROMPT, height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
    assert out.image[0].size == (64, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_modulations_are_non_zero(folders: dict[str, Path], kind: str) -> None:
    from safetensors.torch import load_file

    weights = load_file(folders[kind] / "transformer" / "diffusion_pytorch_model.safetensors")
    modulations = {name: tensor for name, tensor in weights.items() if "modulation." in name}
    # One per text block, per visual block and in the output layer; weight and bias each.
    assert len(modulations) == 2 * (1 + 4 + 1)
    assert all(tensor.abs().min() > 0 for tensor in modulations.values())
