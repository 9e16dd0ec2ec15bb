"""Every expert resident on the GPU: the upper bound where the model fits. Each layer's experts are
loaded whole on its first visit (the warm-up) and never leave."""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy


@dataclass(frozen=True)
class GpuOnly(Policy):
    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        return min(L * E, budget_slots)  # all of them where the budget holds them (it should)

    def demand(self, core, v):
        return tuple(range(core.E))


POLICY = GpuOnly("gpu_only", evict="lru", description="every expert resident on the GPU (where it fits)")
