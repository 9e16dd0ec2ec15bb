"""ZeRO-3 parameter offload (ZeRO-Inference, DeepSpeed-MII), as it behaves (microsoft/DeepSpeed
runtime/zero/partitioned_param_coordinator.py, parameter_offload.py): each submodule's parameters are
gathered when it is called and released after; a Hugging Face MoE block calls only its routed experts,
so only those are fetched. The coordinator prefetches along the module order it recorded on the first
step, and invalidates that trace when the order changes, which dynamic routing does every token: no
useful prefetch. Nothing stays cached between uses. (`offload_param.pin_memory` defaults to False: the
deployment's pageable copies, moecxl.sim.systems.)"""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy
from moecxl.runtime.policies.streaming import lru_outside, release


@dataclass(frozen=True)
class DeepSpeedZero(Policy):
    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        return min(budget_slots, E)  # room for one layer's routed experts; released after use

    def on_visit(self, core, v) -> None:
        super().on_visit(core, v)
        release(core, {v.layer})

    def victim(self, core, skip, incoming=None, next_use=None):
        return lru_outside(core, skip, {incoming[0]} if incoming is not None else set())


POLICY = DeepSpeedZero(
    "deepspeed_zero",
    evict="lru",
    description="DeepSpeed ZeRO-3 parameter offload: routed experts fetched when called and released after; "
    "no cache, no useful prefetch under dynamic routing",
)
