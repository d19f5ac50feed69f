"""TREAD token routing in training (Krause et al. 2025, arXiv 2501.04765).

For each route (a run of visual blocks), a random subset of each sample's image tokens
bypasses the blocks: the kept tokens are gathered, with their rope entries, before the
first routed block and scattered back into the full sequence after the last one, where
the bypassing tokens rejoin unchanged. The loss still covers every token, and gradients
reach every token (the kept ones through the blocks, the others around them).

How it rides through the stock forward: the token choice travels as an argument that the
stock forward hands to every block and that gradient checkpointing saves with the block's
inputs, so the recompute in the backward pass routes the same tokens. Kandinsky 5
(TokenRouter): the transformer's `sparse_params`; forward pre-hooks on the visual blocks
read it, gather, and pass sparse_params = None to the block itself (None: dense attention,
as without routing); a forward hook on each route's last block scatters back. SD3
(JointTokenRouter): `joint_attention_kwargs`, an empty dict to the blocks' attention; the
gather moves the image tokens only (the text tokens run every block), and SD3's position
embedding is already added to each token before the blocks, so nothing else moves with
them. Sampling and eval pass None and run unrouted. The routes come from [tread] via
job.models.tread_rules.resolve_routes.
"""

from __future__ import annotations

import torch
from torch import nn

from job.log import get_logger
from job.train import distributed


def apply_tread(family) -> "TokenRouter":
    """TREAD's hooks on the family's blocks for its resolved [tread] routes
    (family.token_router()); the family draws each step's token choice from the router
    (family.router)."""
    family.router = family.token_router()
    get_logger().info("speedup_active", speedup="tread",
                      routes=[{"blocks": f"{first}..{last}", "selection_ratio": ratio}
                              for first, last, ratio in family.router.routes])
    return family.router


class Routing(dict):
    """One forward's token choice: kept[r] [B, K] sorted token indices per route r. A dict
    with to_fractal = False, so Kandinsky 5's stock forward reads it as sparse_params
    (`keys`); SD3's routing is an empty one, which its blocks pass on as no attention
    arguments."""

    def __init__(self, kept: list[torch.Tensor], keys: dict | None = None) -> None:
        super().__init__({"to_fractal": False} if keys is None else keys)
        self.kept = kept
        self.full: dict[int, torch.Tensor] = {}  # route -> the sequence before it

    def copy(self) -> "Routing":
        """The same choice and sequences: diffusers copies joint_attention_kwargs before
        reading a LoRA scale from it (a plain dict copy would lose the routing)."""
        routing = Routing(self.kept, dict(self))
        routing.full = self.full
        return routing

    def to(self, device, non_blocking: bool = False) -> "Routing":
        """Itself, its token indices on `device`. Hooks that move a module's inputs (group
        offload, via accelerate's send_to_device) call this instead of rebuilding the dict,
        which would lose the choice and the sequences kept for the scatter."""
        self.kept = [k.to(device, non_blocking=non_blocking) for k in self.kept]
        return self

    def rows(self, rows: list[int]) -> "Routing":
        """The choice for a subset of the batch's samples."""
        index = torch.tensor(rows, device=self.kept[0].device) if self.kept else None
        return Routing([k[index] for k in self.kept], dict(self))


class TokenRouter:
    """Hooks on the visual blocks of a Kandinsky5Transformer3DModel for `routes`
    [(first, last, ratio)]; draw() makes a Routing for a batch."""

    def __init__(self, blocks: nn.ModuleList, routes: list[tuple[int, int, float]]) -> None:
        self.routes = [r for r in routes if r[2] > 0]
        self.handles = []
        self._install(blocks)

    def _install(self, blocks: nn.ModuleList) -> None:
        for r, (first, last, _) in enumerate(self.routes):
            for i in range(first, last + 1):
                self.handles.append(blocks[i].register_forward_pre_hook(
                    _gather_hook(r, first=i == first)))
            self.handles.append(blocks[last].register_forward_hook(_scatter_hook(r)))
        for block in blocks:
            for attention in (block.self_attention, block.cross_attention):
                self.handles.append(attention.register_forward_pre_hook(
                    _dense_attention, with_kwargs=True))

    def draw(self, latents: torch.Tensor, generator: torch.Generator,
             patch: tuple[int, int] = (2, 2)) -> Routing | None:
        """Per route and sample, the image tokens kept (the others bypass the route), drawn
        on the CPU for the global batch (so several GPUs match one doing their batches)."""
        if not self.routes:
            return None
        b, _, h, w = latents.shape
        tokens = (h // patch[0]) * (w // patch[1])
        kept = []
        for _, _, ratio in self.routes:
            keep = max(1, tokens - int(tokens * ratio))
            scores = distributed.rand(b * tokens, generator).view(b, tokens)
            choice = scores.argsort(dim=1)[:, :keep].sort(dim=1).values
            kept.append(distributed.to_device(choice, latents.device))
        return Routing(kept, self.routing_keys)

    routing_keys = None  # Routing's default: {"to_fractal": False}, Kandinsky 5's

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class JointTokenRouter(TokenRouter):
    """Hooks on the JointTransformerBlocks of an SD3Transformer2DModel for `routes`; the
    choice travels as joint_attention_kwargs (the blocks are called with positional
    arguments under gradient checkpointing, by keyword otherwise)."""

    routing_keys: dict = {}

    def _install(self, blocks: nn.ModuleList) -> None:
        for r, (first, last, _) in enumerate(self.routes):
            self.handles.append(blocks[first].register_forward_pre_hook(
                _joint_gather_hook(r), with_kwargs=True))
            self.handles.append(blocks[last].register_forward_hook(
                _joint_scatter_hook(r), with_kwargs=True))


_JOINT_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")


def _joint_routing(args: tuple, kwargs: dict) -> "Routing | None":
    routing = args[3] if len(args) > 3 else kwargs.get("joint_attention_kwargs")
    return routing if isinstance(routing, Routing) else None


def _joint_gather_hook(route: int):
    """Before a route's first block: its image tokens narrowed to the kept ones."""
    def hook(module, args, kwargs):
        routing = _joint_routing(args, kwargs)
        if routing is None:
            return None
        named = {**dict(zip(_JOINT_ARGS, args)), **kwargs}
        x = named["hidden_states"]
        routing.full[route] = x
        named["hidden_states"] = _gather(x, routing.kept[route])
        return (), named
    return hook


def _joint_scatter_hook(route: int):
    """After a route's last block: its image tokens back in their places in the sequence
    (the block returns (text, image) tokens; the last block's text is None)."""
    def hook(module, args, kwargs, output):
        routing = _joint_routing(args, kwargs)
        if routing is None:
            return None
        text, image = output
        full, kept = routing.full[route], routing.kept[route]
        index = kept[..., None].expand(*kept.shape, full.shape[-1])
        return text, full.scatter(1, index, image.to(full.dtype))
    return hook


def _gather_hook(route: int, first: bool):
    """Before a routed block: the kept tokens (gathered at the route's first block) and
    their rope entries."""
    def hook(module, args):
        x, text, time, rope, routing = args
        if not isinstance(routing, Routing):
            return None
        kept = routing.kept[route]
        if first:
            routing.full[route] = x
            x = _gather(x, kept)
        return x, text, time, _gather(rope, kept), routing
    return hook


def _scatter_hook(route: int):
    """After a route's last block: the kept tokens back in their places in the sequence."""
    def hook(module, args, output):
        routing = args[4]
        if not isinstance(routing, Routing):
            return None
        full, kept = routing.full[route], routing.kept[route]
        index = kept[..., None].expand(*kept.shape, full.shape[-1])
        return full.scatter(1, index, output.to(full.dtype))
    return hook


def _dense_attention(module, args, kwargs):
    """The blocks hand sparse_params to their attention, which would take a Routing for
    NABLA sparse-attention settings: it gets None (dense attention, as without routing)."""
    if isinstance(kwargs.get("sparse_params"), Routing):
        return args, {**kwargs, "sparse_params": None}
    return None


def _gather(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """x[b, kept[b]] along dim 1, for any trailing shape."""
    index = kept.view(*kept.shape, *([1] * (x.ndim - 2))).expand(*kept.shape, *x.shape[2:])
    return x.gather(1, index)
