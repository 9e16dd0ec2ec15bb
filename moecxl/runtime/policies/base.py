"""The policy protocol: what the decision core asks of an offloading policy, and the `Policy` record
that answers it from an eviction rule, a prefetch source and a few traits.

The core calls only these methods: `cache_slots` (how many slots a budget buys), `demand` (which
experts of a visited layer must be resident), `candidates` (prefetch guesses for the layers ahead),
`admit` (the gate on one prefetch), `victim` (eviction) and `miss` (fetch, host or low-precision). A new
policy is a `Policy` with its own rule or source, or a subclass overriding a method; see
`moecxl/runtime/policies/__init__.py` for registering it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from moecxl.runtime import prefetch as prefetch_mod
from moecxl.runtime.policies.errors import PolicyError
from moecxl.runtime.policies.eviction import EvictionRule, rule_of
from moecxl.runtime.policies.sources import PrefetchSource, source_of


@runtime_checkable
class PolicyProtocol(Protocol):
    """What the decision core reads of a policy (traits) and calls on it (decisions)."""

    name: str
    horizon: int  # MoE layers ahead that prefetch looks
    exact: bool  # outputs bit-identical to resident
    gate: bool
    host_compute: bool  # a miss may be computed on the host where the expert lives
    host_only: bool
    low_precision_on_miss: bool

    @property
    def needs_reuse(self) -> bool: ...

    @property
    def needs_future(self) -> bool: ...

    @property
    def victim_per_layer(self) -> bool:
        """The victim depends on the incoming expert's layer (a per-layer cache)."""
        return self.evict.per_layer

    @property
    def needs_pregate(self) -> bool: ...

    def cache_slots(self, L: int, E: int, budget_slots: int) -> int: ...

    def demand(self, core, v): ...

    def on_visit(self, core, v) -> None: ...

    def candidates(self, core, v, features) -> list | None: ...

    def admit(self, core, key, p: float, m: int) -> bool: ...

    def victim(self, core, skip, incoming=None, next_use=None): ...

    def miss(self, core, key, n_tokens: int, host_queue_s: float, protect) -> tuple[str, float] | None: ...

    def with_predictor(self): ...


PROTOCOL_METHODS = (
    "cache_slots",
    "demand",
    "on_visit",
    "candidates",
    "admit",
    "victim",
    "miss",
    "with_predictor",
)
PROTOCOL_TRAITS = (
    "name",
    "horizon",
    "exact",
    "gate",
    "host_compute",
    "host_only",
    "low_precision_on_miss",
    "needs_reuse",
    "needs_future",
    "needs_pregate",
)


def check_policy(policy) -> None:
    """Refuse an object that does not implement the protocol, naming what it lacks."""
    name = getattr(policy, "name", type(policy).__name__)
    for attr in PROTOCOL_METHODS:
        if not callable(getattr(policy, attr, None)):
            raise PolicyError(f"policy {name!r} ({type(policy).__name__}) lacks the protocol method {attr}()")
    for attr in PROTOCOL_TRAITS:
        if not hasattr(policy, attr):
            raise PolicyError(f"policy {name!r} ({type(policy).__name__}) lacks the protocol trait {attr!r}")


@dataclass(frozen=True)
class Policy:
    """An offloading policy from parts: an eviction rule, a prefetch source (None: no prefetch) looking
    `horizon` MoE layers ahead, and traits. Rules and sources may be given by name."""

    name: str
    evict: EvictionRule | str = "lru"
    prefetch: PrefetchSource | str | None = None
    horizon: int = 0
    exact: bool = True
    low_precision_on_miss: bool = False  # HOBBIT: an int8 copy of a low-weight expert on a miss
    gate: bool = False  # the cost-benefit gate on prefetches (moecxl)
    host_compute: bool = False  # a miss may be computed on the host where the expert lives
    host_only: bool = False  # every miss computed on the host, none fetched
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "evict", rule_of(self.evict))
        object.__setattr__(self, "prefetch", source_of(self.prefetch))
        if self.horizon < 0:
            raise PolicyError(f"policy {self.name!r}: horizon must be >= 0, got {self.horizon}")
        if self.host_only and not self.host_compute:
            raise PolicyError(f"policy {self.name!r}: host_only needs host_compute")

    # ---- traits the core reads --------------------------------------------------------------------------
    @property
    def needs_reuse(self) -> bool:
        return self.evict.needs_reuse

    @property
    def needs_future(self) -> bool:
        return self.evict.needs_future or (self.prefetch is not None and self.prefetch.needs_future)

    @property
    def victim_per_layer(self) -> bool:
        """The victim depends on the incoming expert's layer (a per-layer cache)."""
        return self.evict.per_layer

    @property
    def needs_pregate(self) -> bool:
        return self.prefetch is not None and self.prefetch.needs_pregate and self.horizon > 0

    # ---- decisions --------------------------------------------------------------------------------------
    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        """Cache slots for a budget that buys `budget_slots` (a system with a fixed cache says its own)."""
        return budget_slots

    def demand(self, core, v):
        """Experts of the visited layer to make resident (the routed ones; a whole-layer system: all)."""
        return v.experts

    def on_visit(self, core, v) -> None:
        if self.prefetch is not None:
            self.prefetch.on_visit(core, v)

    def candidates(self, core, v, features) -> list | None:
        """((layer, expert), p) for the layers the policy looks ahead to, best first (None: nothing)."""
        src = self.prefetch
        if src is None:
            return None
        src.observe(core, v, features)
        layers = [v.layer + h for h in range(1, self.horizon + 1) if v.layer + h < core.L]
        if src.needs_future:
            return src.candidates(core, v, layers, features)
        if v.phase == "prefill" and layers and v.n_tokens * core.K >= core.E:
            # Prefill streams whole layers ahead: with at least E token-slots every expert is likely.
            return [((layers[0], e), 1.0) for e in range(core.E)]
        if not layers:
            return None
        return src.candidates(core, v, layers, features)

    def admit(self, core, key, p: float, m: int) -> bool:
        """Issue this prefetch? The cost-benefit gate where the policy has one (`prefetch.gate`)."""
        return not self.gate or prefetch_mod.gate(core, key, p, m)

    def victim(self, core, skip, incoming=None, next_use=None):
        """The cached expert to evict for `incoming`, never one in `skip` (None: nothing evictable)."""
        return self.evict.victim(core, skip, incoming, next_use)

    def miss(self, core, key, n_tokens: int, host_queue_s: float, protect):
        """(fetch | host | lowp, host seconds) for a miss, or None: fetched, no decision taken."""
        if not self.host_compute:
            return None
        return core.miss_choice(key, n_tokens, host_queue_s, protect)

    def with_predictor(self):
        """This policy with a learned predictor as its prefetch source (where it prefetches by guessing)."""
        if self.prefetch is None or self.prefetch.needs_future:
            return self
        return replace(self, prefetch="predictor")
