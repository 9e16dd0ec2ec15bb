"""Eviction rules: which cached expert makes room. Each rule is an object with a pure score (lowest goes
first, `choose_victims`) and a `victim` over the decision core's live state (its fast path: the same
victim, checked in tests/test_engine.py). Keys are (moe_layer, expert)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moecxl.runtime.policies.errors import PolicyError
from moecxl.runtime.policies.reuse import Reuse, expected_reuse_distance

FAR_FUTURE = 1 << 60  # Belady: an expert not used again within the look-ahead


@dataclass(frozen=True)
class EntryStats:
    """What eviction may look at for one cached expert."""

    last_use: int = -1
    uses: int = 0
    loaded_at: int = 0
    prefetched: bool = False


class EvictionRule:
    """Base of the eviction rules: `score` orders cached experts (smallest evicted first); `victim` picks
    the core's victim, by default by scoring every evictable entry. Subclass and override `score` for a
    new rule (tests/test_policy_plugin.py does, outside the package)."""

    name = "rule"
    needs_reuse = False  # the core keeps a `Reuse` estimate for it
    needs_future = False  # it reads the trace's future (Belady)
    per_layer = False  # the victim depends on the incoming expert's layer (a per-layer cache)

    def score(self, key, stats: EntryStats, *, next_use=None, prob=None, reuse=None) -> tuple:
        raise NotImplementedError(f"eviction rule {self.name!r} defines no score")

    def victim(self, core, skip, incoming=None, next_use=None):
        """The cached expert to evict, never one in `skip` (None: nothing evictable)."""
        if next_use is None and self.needs_future:
            next_use = core.next_use()
        cached = {k: EntryStats(*core.stats[k]) for k in core.slot_of}
        victims = choose_victims(self, cached, 1, skip, next_use=next_use, prob=core.probs, reuse=core.reuse)
        return victims[0] if victims else None

    def __eq__(self, other) -> bool:  # a rule equals its name (configs name rules by string)
        if isinstance(other, str):
            return other == self.name
        return type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _StatsField(EvictionRule):
    """Rules that compare the mutable stats directly (no frozen views per miss: the control budget)."""

    def key_of(self, stats):  # stats: [last_use, uses, loaded_at, prefetched]
        raise NotImplementedError

    def victim(self, core, skip, incoming=None, next_use=None):
        stats, key_of = core.stats, self.key_of
        return min((k for k in core.slot_of if k not in skip), key=lambda k: key_of(stats[k]), default=None)


class Fifo(_StatsField):
    name = "fifo"

    def score(self, key, stats, **_):
        return (stats.loaded_at,)

    def key_of(self, st):
        return st[2]


class Lru(_StatsField):
    name = "lru"

    def score(self, key, stats, **_):
        return (stats.last_use,)

    def key_of(self, st):
        return st[0]


class Lfu(_StatsField):
    name = "lfu"

    def score(self, key, stats, **_):
        return (stats.uses, stats.last_use)

    def key_of(self, st):
        return (st[1], st[0])


class Belady(EvictionRule):
    """The expert used farthest in the future goes first (the future from a trace: the limit)."""

    name = "belady"
    needs_future = True

    def score(self, key, stats, *, next_use=None, **_):
        nu = (next_use or {}).get(key)
        return (-(nu if nu is not None else FAR_FUTURE),)

    def victim(self, core, skip, incoming=None, next_use=None):
        nu = next_use if next_use is not None else core.next_use()
        return min(
            (k for k in core.slot_of if k not in skip),
            key=lambda k: (-(v if (v := nu.get(k)) is not None else FAR_FUTURE),),
            default=None,
        )


class Activation(EvictionRule):
    """MoE-Infinity's: the lowest predicted activation first, then the least recently used."""

    name = "activation"

    def score(self, key, stats, *, prob=None, **_):
        return ((prob or {}).get(key, 0.0), stats.last_use)


class Predicted(EvictionRule):
    """moecxl's: the largest expected reuse distance first (Belady in expectation, `reuse.py`)."""

    name = "predicted"
    needs_reuse = True

    def score(self, key, stats, *, prob=None, reuse: Reuse | None = None, **_):
        if reuse is None:  # no estimate: as "activation"
            return ((prob or {}).get(key, 0.0), stats.last_use)
        return (-expected_reuse_distance(key, prob, reuse),)

    def victim(self, core, skip, incoming=None, next_use=None):
        if core.reuse is None:
            return super().victim(core, skip, incoming, next_use)
        slot_key, seq_S = core.slot_key, core.slot_seq_S
        for _, seq, s, key in core.ranking():  # kept across a visit's evictions (cache.py)
            if slot_key[s] == key and seq_S[s] == seq and key not in skip:
                return key
        return None


RULES: dict[str, EvictionRule] = {
    r.name: r for r in (Fifo(), Lru(), Lfu(), Belady(), Activation(), Predicted())
}


def rule_of(evict) -> EvictionRule:
    """The rule object of a name (or the object itself)."""
    if isinstance(evict, EvictionRule):
        return evict
    if evict not in RULES:
        raise PolicyError(f"unknown eviction rule {evict!r}; known: {', '.join(RULES)}")
    return RULES[evict]


def eviction_score(
    evict,
    key: tuple[int, int],
    stats: EntryStats,
    *,
    next_use: Mapping[tuple[int, int], int] | None = None,
    prob: Mapping[tuple[int, int], float] | None = None,
    reuse: Reuse | None = None,
) -> tuple:
    """Sort key of a cached expert for eviction (smallest evicted first)."""
    return rule_of(evict).score(key, stats, next_use=next_use, prob=prob, reuse=reuse)


def choose_victims(
    evict,
    cached: Mapping[tuple[int, int], EntryStats],
    n: int,
    protect: set,
    **ctx,
) -> list[tuple[int, int]]:
    """The n cached experts to evict, never one in `protect` (needed now or in flight)."""
    rule = rule_of(evict)
    score = lambda k: rule.score(k, cached[k], **ctx)  # noqa: E731
    cands = (k for k in cached if k not in protect)
    if n == 1:  # the common case, once per miss: a scan, not a sort (same victim: min keeps the first)
        best = min(cands, key=score, default=None)
        return [] if best is None else [best]
    return sorted(cands, key=score)[:n]


class NextUse:
    """Belady's look-ahead over a known future of (layer, experts) visits: at position `pos`, how many
    visits until each expert is needed next, within `window` visits (None beyond). Built once; each
    lookup is a bisection (the engine's and the simulator's oracle share it)."""

    def __init__(self, future: Sequence[tuple[int, Sequence[int]]], window: int):
        self.window = window
        self._at: dict = {}
        for i, (layer, experts) in enumerate(future):
            for e in experts:
                pos = self._at.setdefault((layer, int(e)), [])
                if not pos or pos[-1] != i:
                    pos.append(i)

    def at(self, pos: int) -> _NextUseView:
        return _NextUseView(self, pos)


@dataclass(frozen=True)
class _NextUseView:
    nu: NextUse
    pos: int

    def get(self, key, default=None):
        pos = self.nu._at.get(key)
        if not pos:
            return default
        j = bisect.bisect_left(pos, self.pos)
        if j < len(pos) and pos[j] - self.pos < self.nu.window:
            return pos[j] - self.pos
        return default
