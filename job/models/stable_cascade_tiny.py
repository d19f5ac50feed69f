"""A tiny random Stable Cascade in the release's layouts, built locally from the real classes.

Two folders, as the hub has them:

- the prior (stabilityai/stable-cascade-prior): a StableCascadePriorPipeline folder with a
  two-level StableCascadeUNet under `prior/`, CLIP-G (CLIPTextModelWithProjection) and the
  DDPMWuerstchenScheduler;
- the decoder (stabilityai/stable-cascade): a StableCascadeDecoderPipeline folder whose
  model_index.json names the vqgan's library `wuerstchen`, as the released snapshot does,
  with the EfficientNet encoder's `effnet_encoder.safetensors` (toy backbone, released
  key layout) at its root.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from job.models.sdxl_tiny import build_tokenizer, ensure_model_folder, write_vocab_files
from job.models.stable_cascade_effnet import EFFNET_FILE, EfficientNetEncoder, tiny_backbone

CLIP_HIDDEN = 32
PRIOR_WIDTH = 32


def _clip(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=1000, hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=CLIP_HIDDEN, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))


def tiny_prior():
    """Shaped like stage-c (two levels of Res/Timestep/Attn blocks, CLIP text, pooled text
    and image inputs) at width 32, without dropout so tests are exact."""
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=16, out_channels=16, conditioning_dim=PRIOR_WIDTH,
        block_out_channels=(PRIOR_WIDTH, PRIOR_WIDTH), num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
        switch_level=(False,), clip_text_in_channels=CLIP_HIDDEN,
        clip_text_pooled_in_channels=CLIP_HIDDEN, clip_image_in_channels=24, clip_seq=4,
        dropout=(0.0, 0.0))


def tiny_decoder():
    """A Stage B UNet: 4 latent channels, effnet and pixel mappers, pooled text only."""
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(16, 32),
        num_attention_heads=(0, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                               ("SDCascadeResBlock", "SDCascadeTimestepBlock",
                                "SDCascadeAttnBlock")),
        clip_text_pooled_in_channels=CLIP_HIDDEN, clip_seq=4, effnet_in_channels=16,
        pixel_mapper_in_channels=3, timestep_conditioning_type=("sca",), switch_level=None,
        dropout=(0.0, 0.0))


def _vqgan():
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    return PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4,
                         num_vq_embeddings=32)


def build_tiny_prior(path: Path, seed: int = 0) -> Path:
    """Write a tiny StableCascadePriorPipeline folder at `path` (deterministic)."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer", "!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = tiny_prior()
        torch.manual_seed(seed + 1)
        text_encoder = _clip(tokenizer.get_vocab())
    pipeline = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                                          prior=prior, scheduler=DDPMWuerstchenScheduler())
    pipeline.save_pretrained(str(path), safe_serialization=True)
    write_vocab_files(Path(path) / "tokenizer")
    return Path(path)


def build_tiny_decoder(path: Path, seed: int = 0) -> Path:
    """Write a tiny StableCascadeDecoderPipeline folder in the released snapshot's layout
    (vqgan library `wuerstchen`, `decoder` and `decoder_lite` UNets, the effnet file)."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline
    from safetensors.torch import save_file

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer", "!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        decoder = tiny_decoder()
        torch.manual_seed(seed + 1)  # the prior's CLIP-G, as in the release
        text_encoder = _clip(tokenizer.get_vocab())
        torch.manual_seed(seed + 11)
        vqgan = _vqgan()
        torch.manual_seed(seed + 12)
        effnet = EfficientNetEncoder(tiny_backbone())
        # Batch-norm statistics as a trained encoder has them (not the init's 0 and 1).
        for module in effnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        torch.manual_seed(seed + 13)
        decoder_lite = tiny_decoder()
    pipeline = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer,
                                            text_encoder=text_encoder,
                                            scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan)
    pipeline.save_pretrained(str(path), safe_serialization=True)
    decoder_lite.save_pretrained(str(path / "decoder_lite"), safe_serialization=True)
    write_vocab_files(path / "tokenizer")
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    index["vqgan"] = ["wuerstchen", "PaellaVQModel"]  # as in the released snapshot
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, str(path / EFFNET_FILE))
    return path


def ensure_tiny_prior(folder: Path, seed: int = 0) -> Path:
    return ensure_model_folder(Path(folder), build_tiny_prior, seed)


def ensure_tiny_decoder(folder: Path, seed: int = 0) -> Path:
    return ensure_model_folder(Path(folder), build_tiny_decoder, seed)
