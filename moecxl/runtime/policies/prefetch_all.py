"""Prefetch-all (SE-MoE style, arXiv 2205.10034; Pre-gated MoE's "prefetch all" baseline): every expert of
the next MoE layer is copied while the current layer computes, routed or not; the GPU holds this layer's
and the next one's experts."""

from __future__ import annotations

from moecxl.runtime.policies.sources import PrefetchSource
from moecxl.runtime.policies.streaming import TwoLayerWindow


class NextLayerAll(PrefetchSource):
    """All E experts of the next layer, certain."""

    name = "next_layer_all"

    def candidates(self, core, v, layers, features):
        return [((layers[0], e), 1.0) for e in range(core.E)]


POLICY = TwoLayerWindow(
    "prefetch_all",
    evict="lru",
    prefetch=NextLayerAll(),
    horizon=1,
    description="SE-MoE-style prefetch-all: every expert of the next layer copied while this layer computes",
)
