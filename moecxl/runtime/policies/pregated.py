"""Pre-gated MoE (Hwang et al., ISCA 2024, arXiv 2308.12066): a pre-gate at block l computes block l+1's
expert selection, so those experts' copies start a block early and overlap block l's compute; the GPU
holds only the current layer's experts and the next layer's selected ones (memory-minimal by design).
The pre-gate is not a guess beside the router: the model is fine-tuned so that the pre-gate *is* block
l+1's routing. Replaying a trace, that routing is the next visit's experts, known one layer ahead (never
across a forward pass: the next token's first layer has no pre-gate until its embedding exists)."""

from __future__ import annotations

from moecxl.runtime.policies.sources import Oracle
from moecxl.runtime.policies.streaming import TwoLayerWindow


class NextBlockSelection(Oracle):
    """The next MoE layer's experts of this forward pass, from the routing (the pre-gate's output)."""

    name = "pregate_selection"

    def candidates(self, core, v, layers, features):
        nxt = core.future[core.pos : core.pos + 1]
        if not nxt or nxt[0][0] != v.layer + 1:
            return None
        return [((nxt[0][0], int(e)), 1.0) for e in nxt[0][1]]


POLICY = TwoLayerWindow(
    "pregated",
    evict="lru",
    prefetch=NextBlockSelection(),
    horizon=1,
    description="Pre-gated MoE: the next layer's experts, selected by its pre-gate a block early, copied while "
    "this layer computes; only this layer's and the next one's on the GPU",
)
