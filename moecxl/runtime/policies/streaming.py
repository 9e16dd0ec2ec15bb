"""Systems that free a layer's experts once its forward is done (ZeRO-3's parameter release, Accelerate's
offload hook, Pre-gated MoE's memory-minimal buffers): what they keep is a set of layers, not a cache."""

from __future__ import annotations


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
