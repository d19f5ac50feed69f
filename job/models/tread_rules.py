"""[tread] routes resolved against a transformer's depth (torch-free: `tunejob validate`
runs it), for the families with token routing (kandinsky5-image, sd3)."""

from __future__ import annotations

from job.config import TreadRoute
from job.errors import ConfigError


def resolve_routes(routes: list[TreadRoute], depth: int,
                   blocks: str = "visual blocks") -> list[tuple[int, int, float]]:
    """(first, last, ratio) per route with negative indices counted from the end; routes
    must lie inside the `depth` blocks, in order, and not overlap."""
    resolved = []
    for i, route in enumerate(routes):
        first = route.start_layer_idx + depth if route.start_layer_idx < 0 else route.start_layer_idx
        last = route.end_layer_idx + depth if route.end_layer_idx < 0 else route.end_layer_idx
        where = f"tread.routes[{i}]"
        if not 0 <= first <= last < depth:
            raise ConfigError(
                f"{where} covers blocks {route.start_layer_idx}..{route.end_layer_idx}, which "
                f"is blocks {first}..{last} of a transformer with {depth} {blocks}",
                f"use indices in 0..{depth - 1} (or -{depth}..-1 from the end) with "
                "start_layer_idx <= end_layer_idx, e.g. 2 and -2")
        if resolved and first <= resolved[-1][1]:
            raise ConfigError(f"{where} starts at block {first}, inside the previous route "
                              f"(which ends at block {resolved[-1][1]})",
                              "list routes in block order without overlaps")
        resolved.append((first, last, route.selection_ratio))
    return resolved
