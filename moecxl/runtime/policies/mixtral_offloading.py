"""mixtral-offloading (Eliseev & Mazur 2023, arXiv 2312.17238; dvmazur/mixtral-offloading): a per-layer
LRU cache of k experts per layer, with optional speculative loading of the next layer's experts.

From its code (src/expert_cache.py): `ExpertCache` keeps `main_size = L x (E - offload_per_layer)`
experts on the GPU in one eviction group per layer; a needed expert not in its layer's group is swapped
in for the group's least recently used one (`choose_expert_to_evict`). Speculative loading (the paper's
section on it; not in the public code): the next layer's gate on the current hidden state guesses its
experts, which are loaded while the current layer computes (here: pre-gating, one layer ahead).
k = 0: nothing stays cached; each routed expert is copied into a staging buffer and dropped.

The swap also copies the evicted expert back to pinned host memory on the same CUDA stream; that is a
cost of the copy, not a decision, and the simulator's deployment carries it (moecxl.sim.systems).
"""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy, PolicyError
from moecxl.runtime.policies.eviction import EvictionRule
from moecxl.runtime.policies.streaming import release


class PerLayerLru(EvictionRule):
    """LRU within the incoming expert's layer, each layer holding `k` slots. Until every layer holds its
    k (warm-up, or a prefill needing more than k of one layer at once), a layer short of its k takes the
    least recently used expert of a layer over its k: the layers settle at k each."""

    name = "per_layer_lru"
    per_layer = True

    def __init__(self, k: int):
        self.k = int(k)

    def score(self, key, stats, **_):
        return (stats.last_use,)

    def victim(self, core, skip, incoming=None, next_use=None):
        stats = core.stats
        count: dict[int, int] = {}
        for key in core.slot_of:
            count[key[0]] = count.get(key[0], 0) + 1
        free = [key for key in core.slot_of if key not in skip]
        if not free:
            return None
        lru = lambda keys: min(keys, key=lambda x: stats[x][0])  # noqa: E731
        layer = incoming[0] if incoming is not None else None
        own = [key for key in free if key[0] == layer]
        if own and count.get(layer, 0) >= self.k:
            return lru(own)
        over = [key for key in free if count[key[0]] > self.k]
        if over:
            return lru(over)
        return lru(own) if own else lru(free)

    def __eq__(self, other) -> bool:
        return isinstance(other, PerLayerLru) and other.k == self.k

    def __hash__(self) -> int:
        return hash((self.name, self.k))

    def __repr__(self) -> str:
        return f"PerLayerLru(k={self.k})"


@dataclass(frozen=True)
class MixtralOffloading(Policy):
    """k experts per layer (`experts_per_layer`), LRU within the layer; `speculative`: pre-gate the next
    layer and load its guessed experts while this one computes."""

    experts_per_layer: int = 2
    speculative: bool = False

    def __post_init__(self):
        k = self.experts_per_layer
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise PolicyError(f"policy {self.name!r}: experts_per_layer must be an integer >= 0, got {k!r}")
        object.__setattr__(self, "evict", PerLayerLru(k))
        object.__setattr__(self, "prefetch", "pregate" if self.speculative else None)
        object.__setattr__(self, "horizon", 1 if self.speculative else 0)
        super().__post_init__()

    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        """k per layer (within the budget); with k = 0, only the staging slots the budget gives."""
        return min(self.experts_per_layer * L, budget_slots) if self.experts_per_layer else budget_slots

    def on_visit(self, core, v) -> None:
        super().on_visit(core, v)
        if not self.experts_per_layer:  # staging buffers only: the last layer's experts are gone
            release(core, {v.layer})


POLICY = MixtralOffloading(
    "mixtral_offloading",
    description="mixtral-offloading (Eliseev & Mazur 2023): per-layer LRU of k experts per layer "
    "(experts_per_layer), optional speculative loading of the next layer's pre-gated experts",
)
