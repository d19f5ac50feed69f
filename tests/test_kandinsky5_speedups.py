"""Kandinsky 5's training speedups on a small random transformer: TREAD token routing
(job/speedups/tread.py) and group offload with a LoRA (job/speedups/offload.py), and the
config rules around them."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel

from helpers import tiny_job_config
from job.config import check_rules
from job.errors import ConfigError
from job.models.kandinsky5 import Kandinsky5Family
from job.models.tread_rules import resolve_routes
from job.speedups.offload import apply_group_offload
from job.speedups.tread import Routing, TokenRouter, _gather

CONFIG = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=16,
              time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
              num_visual_blocks=6, axes_dims=(4, 6, 6))


def transformer(checkpointing: bool = False) -> Kandinsky5Transformer3DModel:
    """Random weights; the modulations (zero in the real init) made non-zero, so every
    block changes its tokens."""
    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(**CONFIG)
    for name, param in model.named_parameters():
        if "modulation" in name:
            param.data.normal_(0, 0.3)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def inputs(h: int = 8, w: int = 6, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 1, h, w, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "timestep": torch.tensor([300.0, 700.0][:batch]),
            "visual_rope_pos": [torch.arange(1), torch.arange(h // 2), torch.arange(w // 2)],
            "text_rope_pos": torch.arange(5)}


def run(model, routing=None, **extra):
    return model(**inputs(), **extra, sparse_params=routing, return_dict=False)


def test_ratio_zero_routes_nothing_and_gives_the_unrouted_output() -> None:
    model = transformer()
    expected = run(model)
    router = TokenRouter(model.visual_transformer_blocks, resolve_routes([], 6) + [(1, 4, 0.0)])
    assert router.draw(torch.zeros(2, 16, 8, 6), torch.Generator()) is None
    assert torch.equal(run(model), expected)


def test_half_the_tokens_skip_the_routed_blocks_with_their_rope_and_come_back_in_order() -> None:
    model = transformer()
    blocks = model.visual_transformer_blocks
    seen = []
    for block in blocks:
        block.self_attention.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    router = TokenRouter(blocks, [(1, 4, 0.5)])
    routing = router.draw(torch.zeros(2, 16, 8, 6), torch.Generator().manual_seed(5))
    kept = routing.kept[0]
    assert kept.shape == (2, 6) and torch.equal(kept, kept.sort(dim=1).values)
    routed = run(model, Routing(routing.kept))
    # Block 0 and 5 see all 12 tokens, blocks 1-4 the 6 kept ones.
    assert seen == [12, 6, 6, 6, 6, 12]

    # The same computation by hand with the model's own pieces.
    router.remove()
    x = inputs()
    with torch.no_grad():
        text = model.text_embeddings(x["encoder_hidden_states"])
        time = model.time_embeddings(x["timestep"]) + \
            model.pooled_text_embeddings(x["pooled_projections"])
        text_rope = model.text_rope_embeddings(x["text_rope_pos"]).unsqueeze(0)
        for block in model.text_transformer_blocks:
            text = block(text, time, text_rope)
        visual = model.visual_embeddings(x["hidden_states"])
        shape = visual.shape[:-1]
        rope = model.visual_rope_embeddings(shape, x["visual_rope_pos"])
        visual, rope = visual.flatten(1, 3), rope.flatten(1, 3)
        visual = blocks[0](visual, text, time, rope, None)
        part, part_rope = _gather(visual, kept), _gather(rope, kept)
        for block in blocks[1:5]:
            part = block(part, text, time, part_rope, None)
        visual = visual.scatter(1, kept[..., None].expand(-1, -1, visual.shape[-1]), part)
        visual = blocks[5](visual, text, time, rope, None)
        expected = model.out_layer(visual.reshape(*shape, -1), text, time)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(routed, run(model))  # routing changed the result


def test_gradients_reach_every_token_with_checkpointing_recomputing_the_same_route() -> None:
    grads = []
    for checkpointing in (False, True):
        model = transformer(checkpointing).train()
        router = TokenRouter(model.visual_transformer_blocks, [(1, 4, 0.5)])
        routing = router.draw(torch.zeros(2, 16, 8, 6), torch.Generator().manual_seed(5))
        x = inputs()
        x["hidden_states"].requires_grad_(True)
        out = model(**x, sparse_params=Routing(routing.kept), return_dict=False)
        out.square().mean().backward()
        grad = x["hidden_states"].grad
        per_token = grad.abs().sum(dim=-1).flatten(1)
        assert (per_token > 0).all(), checkpointing
        grads.append(grad)
    # The recompute in the backward pass routed the same tokens as the forward pass.
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def family(cfg, model) -> Kandinsky5Family:
    return Kandinsky5Family.around(cfg, model, FlowMatchEulerDiscreteScheduler(),
                                   torch.device("cpu"), torch.float32)


def batch(lengths=(5, 5)) -> dict:
    g = torch.Generator().manual_seed(3)
    longest = max(lengths)
    text = torch.randn(len(lengths), longest, 32, generator=g)
    for i, n in enumerate(lengths):
        text[i, n:] = 0
    return {"latents": torch.randn(len(lengths), 16, 8, 8, generator=g),
            "text.prompt_embeds": text, "text.prompt_length": torch.tensor(lengths),
            "text.pooled_prompt_embeds": torch.randn(len(lengths), 16, generator=g)}


def test_captions_of_different_lengths_in_one_batch_match_one_at_a_time(tmp_path) -> None:
    cfg = tiny_job_config(tmp_path, model={"family": "kandinsky5-image"})
    fam = family(cfg, transformer())
    b = batch((3, 5))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        together = fam.denoise(noisy, t, b)
        for i, n in enumerate((3, 5)):
            alone = {"latents": b["latents"][i:i + 1],
                     "text.prompt_embeds": b["text.prompt_embeds"][i:i + 1, :n],
                     "text.prompt_length": b["text.prompt_length"][i:i + 1],
                     "text.pooled_prompt_embeds": b["text.pooled_prompt_embeds"][i:i + 1]}
            torch.testing.assert_close(together[i:i + 1], fam.denoise(noisy[i:i + 1], t[i:i + 1],
                                                                       alone))
        # Padding is what the grouping keeps out: fed padded, the short caption changes.
        padded = fam._forward(noisy[:1], t[:1], b["text.prompt_embeds"][:1],
                              b["text.pooled_prompt_embeds"][:1], None, None)
    assert not torch.allclose(padded, together[:1])


def lora_steps(tmp_path, offload: bool, steps: int = 3) -> tuple[dict, dict]:
    """The LoRA's gradients after the first step and its weights after `steps` AdamW steps."""
    cfg = tiny_job_config(tmp_path, model={"family": "kandinsky5-image"},
                          lora={"rank": 4, "alpha": 4.0},
                          train={"gradient_checkpointing": True},
                          speedups={"enable_group_offload": offload})
    model = transformer(checkpointing=True)
    fam = family(cfg, model)
    torch.manual_seed(0)
    fam.add_lora()
    if offload:
        groups = apply_group_offload(model, cfg.speedups, torch.device("cpu"))
        assert groups == 1 + 6 + 1  # text block, visual blocks, the rest
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    first_gradients = None
    for _ in range(steps):
        fam.training_loss(batch(), generator).mean().backward()
        if first_gradients is None:
            first_gradients = {name: p.grad.clone() for name, p in model.named_parameters()
                               if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
    return first_gradients, {k: v.detach().clone() for k, v in fam.trainable_state_dict().items()}


def test_group_offload_keeps_the_lora_out_of_the_groups_and_trains_the_same(tmp_path) -> None:
    plain_gradients, plain = lora_steps(tmp_path / "a", offload=False)
    gradients, offloaded = lora_steps(tmp_path / "b", offload=True)
    assert plain.keys() == offloaded.keys() and plain
    assert plain_gradients.keys() == gradients.keys()
    for name in plain_gradients:
        # The same gradients up to float summation order: offload passes the text embedding
        # to each block as its own alias, which regroups the sum of its gradients.
        torch.testing.assert_close(gradients[name], plain_gradients[name], rtol=1e-5, atol=1e-7)
    for key in plain:
        # Adam divides by the gradients' root mean square, which amplifies those last-bit
        # differences where a gradient is near zero.
        torch.testing.assert_close(offloaded[key], plain[key], rtol=1e-3, atol=1e-3)


class Residency:
    """Which offload groups are loaded, tracked through their onload_/offload_ calls (on the
    CPU both devices are the same, so _offloaded reads this instead), and the most loaded
    at once during backward passes."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        from diffusers.hooks.group_offloading import ModuleGroup

        from job.speedups import offload as offload_module

        self.loaded: dict[int, bool] = {}
        self.most_in_backward = 0
        onload, offload = ModuleGroup.onload_, ModuleGroup.offload_

        def tracked_onload(group):
            self.loaded[id(group)] = True
            if offload_module.in_backward_pass():
                self.most_in_backward = max(self.most_in_backward, sum(self.loaded.values()))
            return onload(group)

        def tracked_offload(group):
            self.loaded[id(group)] = False
            return offload(group)

        patch.setattr(ModuleGroup, "onload_", tracked_onload)
        patch.setattr(ModuleGroup, "offload_", tracked_offload)
        patch.setattr(offload_module, "_offloaded", lambda group: not self.loaded.get(id(group)))


def offloaded_step(tmp_path, residency: Residency, fixed: bool, lengths=(5, 5),
                   **speedups) -> tuple[list[bool], dict[int, bool]]:
    """One LoRA training step with group offload (ours, or diffusers' hooks alone); returns
    whether each block ran with its group loaded, and each group's state afterwards."""
    from job.speedups.offload import _hooks

    cfg = tiny_job_config(tmp_path, model={"family": "kandinsky5-image"},
                          lora={"rank": 4, "alpha": 4.0},
                          train={"gradient_checkpointing": True},
                          speedups={"enable_group_offload": True, **speedups})
    model = transformer(checkpointing=True)
    fam = family(cfg, model)
    fam.add_lora()
    if fixed:
        apply_group_offload(model, cfg.speedups, torch.device("cpu"))
    else:
        model.enable_group_offload(torch.device("cpu"), torch.device("cpu"),
                                   offload_type="block_level",
                                   num_blocks_per_group=cfg.speedups.group_offload_blocks_per_group)
    hooks = _hooks(model)
    ran_loaded = []
    for hook in hooks:
        for layer in {hook.group.onload_leader, hook.group.offload_leader} - {model}:
            if hasattr(layer, "self_attention"):  # a block
                layer.self_attention.register_forward_pre_hook(
                    lambda *_, group=hook.group: ran_loaded.append(residency.loaded[id(group)]))
    residency.loaded.clear()
    residency.most_in_backward = 0
    fam.training_loss(batch(lengths), torch.Generator().manual_seed(0)).mean().backward()
    return ran_loaded, {id(h.group): residency.loaded.get(id(h.group), False) for h in hooks}


@pytest.mark.parametrize("per_group", [1, 2])
def test_group_offload_in_the_backward_pass(tmp_path, per_group: int) -> None:
    """Each block runs (forward and backward rerun) with its group loaded, every group is
    back in CPU memory after the backward pass, and the backward pass holds few at once.

    diffusers' hooks alone leave every block loaded after the backward pass (torch stops a
    checkpoint rerun before the post-forward hook) and, with two blocks per group, rerun a
    group's second block before anything loads the group."""
    with pytest.MonkeyPatch.context() as patch:
        residency = Residency(patch)
        ran_loaded, after = offloaded_step(tmp_path, residency, True,
                                           group_offload_blocks_per_group=per_group)
        assert ran_loaded and all(ran_loaded)
        assert not any(after.values())
        assert residency.most_in_backward <= 2
        ran_loaded, after = offloaded_step(tmp_path, residency, False,
                                           group_offload_blocks_per_group=per_group)
        assert sum(after.values()) == 6 // per_group + 1  # visual groups, the text block
        assert all(ran_loaded) == (per_group == 1)


def test_captions_of_different_lengths_keep_few_groups_loaded(tmp_path) -> None:
    """One forward pass per caption length: each group is offloaded after each pass's
    share of the backward pass, not after both (which would load them all at once)."""
    with pytest.MonkeyPatch.context() as patch:
        residency = Residency(patch)
        ran_loaded, after = offloaded_step(tmp_path, residency, True, lengths=(3, 5, 7))
        assert all(ran_loaded) and not any(after.values())
        assert residency.most_in_backward <= 2


def test_leaf_level_offload_leaves_nothing_loaded_after_the_backward_pass(tmp_path) -> None:
    """Layers that a block's rerun runs but no gradient flows through (the modulations read
    the timestep only) are offloaded at the end of their rerun."""
    with pytest.MonkeyPatch.context() as patch:
        residency = Residency(patch)
        _, after = offloaded_step(tmp_path, residency, True, group_offload_type="leaf_level")
        assert len(after) > 50 and not any(after.values())


def test_offload_and_routing_rules(tmp_path) -> None:
    def rules(model=None, **overrides):
        return check_rules(tiny_job_config(tmp_path, model={
            "family": "kandinsky5-image", "flavour": "tiny", **(model or {})}, **overrides))

    with pytest.raises(ConfigError) as caught:
        rules(speedups={"enable_group_offload": True, "enable_model_cpu_offload": True})
    assert caught.value.exit_code == 2 and "enable_model_cpu_offload = false" in caught.value.hint
    with pytest.raises(ConfigError) as caught:
        rules(speedups={"enable_group_offload": True, "group_offload_use_stream": True,
                        "base_model_precision": "int8-torchao"}, job={"device": "cuda"})
    assert "pinned" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        rules(tread={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2,
                                 "end_layer_idx": 9}]})
    assert "4 visual blocks" in caught.value.message
    with pytest.raises(ConfigError):
        rules(model={"model_type": "full"}, speedups={"enable_group_offload": True},
              train={"gradient_checkpointing": True})
    with pytest.raises(ConfigError) as caught:
        rules(speedups={"enable_group_offload": True}, train={"gradient_checkpointing": False})
    assert "gradient_checkpointing = true" in caught.value.hint
    with pytest.raises(ConfigError) as caught:
        check_rules(tiny_job_config(tmp_path, tread={"routes": [
            {"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1}]}))
    assert "kandinsky5-image" in caught.value.hint
    assert resolve_routes([], 50) == []


def test_an_i2i_flavour_without_conditioning_images_is_exit_2(tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_rules(tiny_job_config(tmp_path, model={"family": "kandinsky5_image",
                                                     "flavour": "tiny-i2i"}))
    assert caught.value.exit_code == 2 and "conditioning_data_dir" in caught.value.hint
