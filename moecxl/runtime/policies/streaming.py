"""Systems that free a layer's experts once its forward is done (ZeRO-3's parameter release, Accelerate's
offload hook, Pre-gated MoE's memory-minimal buffers): what they keep is a set of layers, not a cache."""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy


def release(core, keep_layers) -> None:
    """Drop every cached expert of a layer not in `keep_layers` (copies in flight land as usual)."""
    for key in [k for k in core.slot_of if k[0] not in keep_layers]:
        core.evict(key)


def lru_outside(core, skip, keep_layers):
    """The least recently used cached expert outside `keep_layers` and `skip`, else of any layer."""
    stats = core.stats
    free = [k for k in core.slot_of if k not in skip]
    if not free:
        return None
    outside = [k for k in free if k[0] not in keep_layers]
    return min(outside or free, key=lambda k: stats[k][0])


@dataclass(frozen=True)
class TwoLayerWindow(Policy):
    """Only this layer's experts and the next one's on the device (at most 2E slots): earlier layers are
    released as a visit starts, and a copy evicts outside the window first (Pre-gated MoE, prefetch-all)."""

    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        return min(budget_slots, 2 * E)

    def on_visit(self, core, v) -> None:
        super().on_visit(core, v)
        release(core, {v.layer, v.layer + 1})

    def victim(self, core, skip, incoming=None, next_use=None):
        keep = {incoming[0], incoming[0] - 1} if incoming is not None else set()
        return lru_outside(core, skip, keep)
