"""Quantised SD3 base (torchao int8, the quanto presets, fp8's hardware check) and the
sampling-only attention backend, on the tiny SD3."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import fit_fixed_batch
from job.errors import ConfigError
from job.speedups import apply_speedups
from job.speedups.attention import JointAttentionProcessor, apply_sageattention
from job.speedups.quantize import apply_quantization
from sd3_helpers import load_family, make_batch, stock_pipeline, tiny_folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    tiny_folder(folder)
    return folder


def quantised_family(tmp_path: Path, models_dir: Path, preset: str, **speedups):
    family = load_family(tmp_path, models_dir, torch.bfloat16,
                         train={"mixed_precision": "bf16"}, optimizer={"name": "adamw_bf16"},
                         lora={"rank": 4, "alpha": 4.0},
                         speedups={"base_model_precision": preset, **speedups})
    apply_speedups(family.cfg, family)
    return family


def train_steps(family, steps: int) -> list[float]:
    return fit_fixed_batch(family, family.transformer, make_batch(family), steps, lr=1e-2)


def test_int8_torchao_base_trains_a_plain_lora(tmp_path: Path, models_dir: Path) -> None:
    pytest.importorskip("torchao", reason="the int8-torchao preset needs the torchao extra")
    from torchao.utils import TorchAOBaseTensor

    family = quantised_family(tmp_path, models_dir, "int8-torchao",
                              text_encoder_3_precision="int8-torchao")
    blocks = family.transformer.transformer_blocks
    assert isinstance(blocks[0].attn.to_q.weight, TorchAOBaseTensor)
    assert isinstance(blocks[0].ff.net[2].weight, TorchAOBaseTensor)
    # Embedders and the output projection stay unquantised.
    assert not isinstance(family.transformer.proj_out.weight, TorchAOBaseTensor)
    assert not isinstance(family.transformer.context_embedder.weight, TorchAOBaseTensor)
    assert isinstance(family.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight,
                      TorchAOBaseTensor)
    assert not isinstance(family.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight,
                          TorchAOBaseTensor)
    family.add_lora()
    trainable = [p for p in family.transformer.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)  # adamw_bf16
    losses = train_steps(family, 12)
    assert losses[-1] < 0.9 * losses[0], losses
    [path] = family.save_final(tmp_path / "final")
    tensors = load_file(str(path))
    assert all(type(t) is torch.Tensor and t.dtype == torch.bfloat16 for t in tensors.values())
    pipeline = stock_pipeline(tiny_folder(models_dir))
    pipeline.load_lora_weights(str(tmp_path / "final"))  # unquantised pipeline, same LoRA
    assert family.sample("a red circle", "", 64, 64, 4.0, 2, seed=0).size == (64, 64)


def test_quantised_text_encoder_changes_the_text_fingerprint(tmp_path: Path,
                                                             models_dir: Path) -> None:
    pytest.importorskip("torchao")
    plain = load_family(tmp_path, models_dir)
    quantised = load_family(tmp_path, models_dir,
                            speedups={"text_encoder_3_precision": "int8-torchao"})
    assert plain.fingerprint("text") != quantised.fingerprint("text")
    assert plain.fingerprint("latent") == quantised.fingerprint("latent")


@pytest.mark.parametrize("preset", ["fp8-torchao", "fp8-quanto"])
def test_fp8_without_an_fp8_gpu_is_exit_2_naming_int8(tmp_path: Path, models_dir: Path,
                                                      preset: str) -> None:
    family = load_family(tmp_path, models_dir, speedups={"base_model_precision": preset})
    with pytest.raises(ConfigError) as caught:
        apply_quantization(family, family.cfg.speedups)
    assert caught.value.exit_code == 2 and "compute capability 8.9" in caught.value.message
    assert '"int8-torchao"' in caught.value.hint


@pytest.mark.parametrize("preset", ["int8-quanto", "int4-quanto", "int2-quanto"])
def test_quanto_without_the_package_is_exit_2_naming_torchao(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, preset: str) -> None:
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import fails as if absent
    family = load_family(tmp_path, models_dir, speedups={"base_model_precision": preset})
    with pytest.raises(ConfigError) as caught:
        apply_quantization(family, family.cfg.speedups)
    assert caught.value.exit_code == 2 and "optimum-quanto" in caught.value.message
    assert '"int8-torchao"' in caught.value.hint and "tunejob[quanto]" in caught.value.hint


def test_int8_quanto_base_trains_a_lora_when_installed(tmp_path: Path, models_dir: Path) -> None:
    pytest.importorskip("optimum.quanto", reason="the *-quanto presets need the quanto extra")
    from optimum.quanto import QLinear

    family = quantised_family(tmp_path, models_dir, "int8-quanto")
    assert isinstance(family.transformer.transformer_blocks[0].attn.to_q, QLinear)
    family.add_lora()
    losses = train_steps(family, 12)
    assert losses[-1] < 0.9 * losses[0], losses
    [path] = family.save_final(tmp_path / "final")
    assert all(type(t) is torch.Tensor for t in load_file(str(path)).values())


def test_joint_attention_processor_matches_diffusers(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    batch = make_batch(family)
    timesteps = torch.tensor([300.0, 800.0])
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = family.denoise(noisy, timesteps, batch)
        calls = []

        def sdpa(q, k, v):
            calls.append(q.shape)
            return F.scaled_dot_product_attention(q, k, v)

        family.transformer.set_attn_processor(JointAttentionProcessor(sdpa))
        ours = family.denoise(noisy, timesteps, batch)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert len(calls) == 4 + 1  # four joint blocks and the dual-attention block's attn2


def test_sampling_attention_is_swapped_in_for_sampling_only(tmp_path: Path, models_dir: Path,
                                                            caplog) -> None:
    family = load_family(tmp_path, models_dir, speedups={"attention_mechanism": "sageattention"})
    assert apply_sageattention(family, family.cfg.speedups) is False  # no CUDA GPU here
    assert family.sampling_attention is None
    calls = []
    family.sampling_attention = JointAttentionProcessor(
        lambda q, k, v: calls.append(1) or F.scaled_dot_product_attention(q, k, v))
    family.add_lora()
    family.training_loss(make_batch(family), torch.Generator().manual_seed(0)).mean().backward()
    assert calls == []
    family.sample("a red circle", "", 64, 64, 4.0, 2, seed=0)
    assert len(calls) == 2 * 5  # two steps, five attention modules
    before = len(calls)
    family.training_loss(make_batch(family), torch.Generator().manual_seed(0))
    assert len(calls) == before  # SDPA is back for training


def test_base_model_default_dtype_sets_the_frozen_base_dtype(tmp_path: Path,
                                                             models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, torch.bfloat16, train={"mixed_precision": "bf16"},
                         speedups={"base_model_default_dtype": "fp32"})
    assert family.transformer.proj_out.weight.dtype == torch.float32
    assert family.text_encoder_3.dtype == torch.bfloat16  # encoders follow mixed_precision
    auto = load_family(tmp_path, models_dir, torch.bfloat16, train={"mixed_precision": "bf16"})
    assert auto.transformer.proj_out.weight.dtype == torch.bfloat16
