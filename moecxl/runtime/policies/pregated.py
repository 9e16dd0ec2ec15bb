"""Pre-gated MoE (Hwang et al., ISCA 2024, arXiv 2308.12066): a pre-gate at block l selects block l+1's
experts, whose copies start a block early and overlap block l's compute; the GPU holds only the current
layer's experts and the next layer's selected ones (memory-minimal by design). Here the pre-gate is the
trace model's next router applied to the current layer's input (moecxl.sim.predict), one layer ahead;
a wrong guess is fetched on demand."""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy
from moecxl.runtime.policies.streaming import lru_outside, release


@dataclass(frozen=True)
class Pregated(Policy):
    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        return min(budget_slots, 2 * E)  # this layer's and the next one's, at most

    def on_visit(self, core, v) -> None:
        super().on_visit(core, v)
        release(core, {v.layer, v.layer + 1})

    def victim(self, core, skip, incoming=None, next_use=None):
        keep = {incoming[0], incoming[0] - 1} if incoming is not None else set()
        return lru_outside(core, skip, keep)


POLICY = Pregated(
    "pregated",
    evict="lru",
    prefetch="pregate",
    horizon=1,
    description="Pre-gated MoE: the next layer's experts chosen by a pre-gate and copied while this layer "
    "computes; only this layer's and the next one's on the GPU",
)
