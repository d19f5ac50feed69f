"""TREAD token routing for SD3 (job/speedups/tread.py JointTokenRouter): a random share of
the image tokens bypasses a run of the transformer's blocks and rejoins after them, the text
tokens running every block. Checked against the same computation written out with the
model's own pieces, with gradient checkpointing, compiled blocks and a LoRA, through the
family (training routed, eval not) and a whole job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from helpers import tiny_job_config
from job.config import check_rules
from job.errors import ConfigError
from job.models.sd3 import SD3Family
from job.speedups.tread import JointTokenRouter, Routing, _gather

# Six blocks (a route 1..4 has unrouted blocks on both sides), dual attention in the first
# two as in SD3.5, the last block context_pre_only as in every SD3.
CONFIG = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
              attention_head_dim=8, num_attention_heads=4, joint_attention_dim=48,
              caption_projection_dim=32, pooled_projection_dim=40, pos_embed_max_size=32,
              dual_attention_layers=(0, 1), qk_norm="rms_norm")


def transformer(checkpointing: bool = False) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIG)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def inputs(h: int = 8, w: int = 12, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 16, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 48, generator=g),
            "pooled_projections": torch.randn(batch, 40, generator=g),
            "timestep": torch.tensor([100.0, 800.0][:batch])}


def run(model, routing=None, x=None):
    return model(**(x or inputs()), joint_attention_kwargs=routing, return_dict=False)[0]


def draw(router, seed: int = 5) -> Routing:
    return router.draw(torch.zeros(2, 16, 8, 12), torch.Generator().manual_seed(seed))


def by_hand(model, x, routes, kept):
    """The routed forward written out with the model's own pieces: at a route's first block
    its kept image tokens are gathered, after its last block they are scattered back."""
    blocks = model.transformer_blocks
    image = model.pos_embed(x["hidden_states"])
    temb = model.time_text_embed(x["timestep"], x["pooled_projections"])
    text = model.context_embedder(x["encoder_hidden_states"])
    full = None
    for i, block in enumerate(blocks):
        route = next((r for r, (first, last, _) in enumerate(routes) if first <= i <= last), None)
        if route is not None and i == routes[route][0]:
            full, image = image, _gather(image, kept[route])
        text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
        if route is not None and i == routes[route][1]:
            index = kept[route][..., None].expand(-1, -1, full.shape[-1])
            image = full.scatter(1, index, image)
    out = model.proj_out(model.norm_out(image, temb))
    return out.reshape(2, 4, 6, 2, 2, 16).permute(0, 5, 1, 3, 2, 4).reshape(2, 16, 8, 12)


@pytest.mark.parametrize("routes", [[(1, 4, 0.5)], [(0, 5, 0.5)], [(5, 5, 0.75)], [(3, 3, 0.5)],
                                    [(0, 0, 0.25), (2, 5, 0.5)]],
                         ids=["middle", "all", "last", "one", "two"])
def test_routed_forward_is_the_gathered_blocks_scattered_back(routes) -> None:
    """Routes of several blocks, every block, the last block alone (its text output is
    None), one middle block, and two routes, each against the computation by hand."""
    model = transformer()
    blocks = model.transformer_blocks
    router = JointTokenRouter(blocks, routes)
    seen = []  # what each block runs on (hooks after the router's gather)
    for block in blocks:
        block.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]),
            with_kwargs=True)
    routing = draw(router)
    kept = routing.kept
    assert all(torch.equal(k, k.sort(dim=1).values) for k in kept)
    with torch.no_grad():
        routed = run(model, routing)
    # 24 image tokens (8x12 latents, 2x2 patches); a route's blocks see its kept ones.
    expected_tokens = [24] * 6
    for r, (first, last, ratio) in enumerate(routes):
        assert kept[r].shape == (2, 24 - int(24 * ratio))
        expected_tokens[first:last + 1] = [kept[r].shape[1]] * (last - first + 1)
    assert seen == expected_tokens
    router.remove()
    with torch.no_grad():
        expected = by_hand(model, inputs(), routes, kept)
        plain = run(model)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(routed, plain)  # routing changed the result


def test_checkpointing_recomputes_the_same_route_and_gradients_reach_every_token() -> None:
    grads = []
    for checkpointing in (False, True):
        model = transformer(checkpointing).train()
        # Every block routed: a bypassing token's only way to the output is the bypass.
        router = JointTokenRouter(model.transformer_blocks, [(0, 5, 0.5)])
        x = inputs()
        x["hidden_states"].requires_grad_(True)
        run(model, draw(router), x).square().mean().backward()
        grad = x["hidden_states"].grad
        # Every latent pixel (so every token) gets a gradient, routed or not.
        assert (grad.abs().sum(dim=1) > 0).all(), checkpointing
        grads.append((grad, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_params), (ckpt, ckpt_params) = grads
    torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)
    for mine, theirs in zip(ckpt_params, plain_params):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_compiled_blocks_route_like_eager_blocks() -> None:
    from job.speedups.compile import apply_regional_compile

    results = []
    for compiled in (False, True):
        model = transformer(checkpointing=True).train()
        router = JointTokenRouter(model.transformer_blocks, [(1, 4, 0.5)])
        if compiled:
            torch._dynamo.reset()
            apply_regional_compile(model, backend="aot_eager", recompute_inside=1.0)
        losses = []
        for seed in (5, 6):  # a new choice per step: no recompile needed to get it right
            loss = run(model, draw(router, seed)).square().mean()
            loss.backward()
            losses.append(loss.detach())
        results.append((torch.stack(losses), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    for mine, theirs in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_the_family_routes_training_with_a_lora_and_never_eval(tmp_path: Path) -> None:
    """Through SD3Family with a LoRA (diffusers copies joint_attention_kwargs to read a LoRA
    scale: the copy keeps the routing): training_loss routes, eval_loss does not."""
    from job.speedups.tread import apply_tread

    cfg = tiny_job_config(tmp_path, model={"family": "sd3", "flavour": "tiny",
                                           "hub_cache_dir": str(tmp_path / "models")},
                          tread={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1,
                                             "end_layer_idx": -2}]})
    family = SD3Family.around(cfg, transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0),
                              torch.device("cpu"), torch.float32)
    assert family.routes == [(1, 4, 0.5)]
    family.add_lora()
    apply_tread(family)
    seen = []
    family.transformer.transformer_blocks[2].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]),
        with_kwargs=True)
    batch = {"latents": torch.randn(2, 16, 8, 12),
             "text.prompt_embeds": torch.randn(2, 7, 48),
             "text.pooled_prompt_embeds": torch.randn(2, 40)}
    loss = family.training_loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert seen == [12]
    assert all(p.grad is not None for p in family.transformer.parameters() if p.requires_grad)
    with torch.no_grad():
        family.eval_loss(batch, torch.tensor([200, 700]), torch.randn(2, 16, 8, 12))
    assert seen == [12, 24]


def test_routes_are_checked_against_the_depth(tmp_path: Path) -> None:
    def cfg(first: int, last: int):
        return tiny_job_config(tmp_path, model={"family": "sd3", "flavour": "medium"},
                               tread={"routes": [{"selection_ratio": 0.5,
                                                  "start_layer_idx": first,
                                                  "end_layer_idx": last}]})

    check_rules(cfg(2, -2))  # SD3.5 Medium: 24 blocks
    with pytest.raises(ConfigError, match="blocks 2..30 of a transformer with 24 transformer "
                                          "blocks"):
        check_rules(cfg(2, 30))


def test_an_sd3_job_trains_with_a_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import job.speedups.tread as tread
    from job.run import run_job
    from test_sd3_run import sd3_job

    routers = []
    real = tread.apply_tread
    monkeypatch.setattr(tread, "apply_tread", lambda family: routers.append(real(family)))

    route = ('tread.routes=[{selection_ratio = 0.5, start_layer_idx = 1, '
             'end_layer_idx = 2}]')
    cfg = sd3_job(tmp_path, route, "train.max_train_steps=2", "validation.enabled=false")
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2]
    # The job routed: the router of its resolved route was installed on the transformer.
    assert len(routers) == 1 and routers[0].routes == [(1, 2, 0.5)]
    assert isinstance(routers[0], JointTokenRouter) and routers[0].handles
