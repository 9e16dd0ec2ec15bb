"""Prefetch-all (SE-MoE style, arXiv 2205.10034; Pre-gated MoE's "prefetch all" baseline): every expert of
the next MoE layer is copied while the current layer computes, routed or not; the GPU holds this layer's
and the next one's experts."""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy
from moecxl.runtime.policies.sources import PrefetchSource
from moecxl.runtime.policies.streaming import lru_outside, release


class NextLayerAll(PrefetchSource):
    """All E experts of the next layer, certain."""

    name = "next_layer_all"

    def candidates(self, core, v, layers, features):
        return [((layers[0], e), 1.0) for e in range(core.E)]


@dataclass(frozen=True)
class PrefetchAll(Policy):
    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        return min(budget_slots, 2 * E)

    def on_visit(self, core, v) -> None:
        super().on_visit(core, v)
        release(core, {v.layer, v.layer + 1})

    def victim(self, core, skip, incoming=None, next_use=None):
        keep = {incoming[0], incoming[0] - 1} if incoming is not None else set()
        return lru_outside(core, skip, keep)


POLICY = PrefetchAll(
    "prefetch_all",
    evict="lru",
    prefetch=NextLayerAll(),
    horizon=1,
    description="SE-MoE-style prefetch-all: every expert of the next layer copied while this layer computes",
)
