"""The device cache's slot map and eviction: which cached expert makes room, by the policy's rule.

A part of `DecisionCore` (its state), kept in its own module: the pure rules are `policies.py`'s; here
are their fast paths (the same victims, checked in tests/test_engine.py) and the "predicted" rule's
ranking memo, once for the engine and the simulator.
"""

from __future__ import annotations

import bisect

import numpy as np

from moecxl.runtime.mechanism import CoreError
from moecxl.runtime.policies import (
    EntryStats,
    choose_victims,
    eviction_score,
    expected_reuse_distance,
    reuse_distance_S,
)


class SlotCache:
    """`DecisionCore`'s slots and victims (a mixin: the state is the core's)."""

    # Recency/frequency rules read the mutable stats directly: building frozen views of every cached
    # entry per miss costs more than the control-plane budget. Same order as `eviction_score`: fifo and
    # lru compare one stats field (loaded_at, last_use); lfu compares (uses, last_use).
    _FAST_EVICT = {"fifo": 2, "lru": 0, "lfu": None}

    def take_slot(self, protect) -> int:
        if not self.free_slots:
            next_use = self.next_use() if self.policy.evict == "belady" else None
            if next_use is None and self._miss_victim[0] == (self.epoch, self.tick, id(protect)):
                victim = self._miss_victim[1]  # the miss decision just looked it up: nothing changed since
            else:
                victim = self.victim(protect | self.inflight.keys(), next_use)
            if victim is None:
                raise CoreError(
                    f"device cache of {self.n_slots} slots has nothing evictable (all needed now)"
                )
            self.evict(victim)
        return self.free_slots.pop()

    def victim(self, skip, next_use=None):
        """The cached expert `choose_victims` would evict, never one in `skip` (None: nothing evictable).
        Rules whose score reads no frozen stats are scored here without building them (same choice)."""
        evict, cands = self.policy.evict, (k for k in self.slot_of if k not in skip)
        if evict in self._FAST_EVICT:
            field, stats = self._FAST_EVICT[evict], self.stats
            if field is None:
                return min(cands, key=lambda k: (stats[k][1], stats[k][0]), default=None)
            return min(cands, key=lambda k: stats[k][field], default=None)
        if evict == "predicted" and self.reuse is not None:
            slot_key, seq_S = self.slot_key, self.slot_seq_S
            for _, seq, s, key in self.ranking():
                if slot_key[s] == key and seq_S[s] == seq and key not in skip:
                    return key
            return None
        if evict == "belady":
            nu = next_use if next_use is not None else self.next_use()
            return min(cands, key=lambda k: eviction_score("belady", k, None, next_use=nu), default=None)
        cached = {k: EntryStats(*self.stats[k]) for k in self.slot_of}
        victims = choose_victims(evict, cached, 1, skip, next_use=next_use, prob=self.probs, reuse=self.reuse)
        return victims[0] if victims else None

    def set_probs(self, probs: dict) -> None:
        self.probs = probs
        self.probs_version += 1
        self.epoch += 1

    def ranking(self) -> list:
        """The "predicted" rule's victims in order, kept across a visit's evictions: scores change only with
        the reuse estimate (each visit) and the predictions (each prefetch round), so one vectorised scan
        ranks every cached expert, a landing copy is inserted, and an evicted one is skipped when met."""
        tag = (self.reuse.version, self.probs_version)
        if self._rank_tag != tag:
            occupied_S = self.slot_layer_S >= 0
            dist_S = reuse_distance_S(
                self.slot_layer_S, self.slot_expert_S, occupied_S, self.probs, self.slot_of, self.reuse
            )
            slots = np.flatnonzero(occupied_S)
            seq_S = self.slot_seq_S
            order = slots[np.lexsort((seq_S[slots], -dist_S[slots]))]
            order_l = order.tolist()
            self._rank = list(
                zip(
                    (-dist_S[order]).tolist(),
                    seq_S[order].tolist(),
                    order_l,
                    [self.slot_key[s] for s in order_l],
                )
            )
            self._rank_tag = tag
        return self._rank

    def ranked_landing(self, key, slot: int) -> None:
        """A copy landed in `slot`: rank it among the victims (if a ranking is current)."""
        if self._rank_tag is not None and self._rank_tag == (self.reuse.version, self.probs_version):
            d = expected_reuse_distance(key, self.probs, self.reuse)
            bisect.insort(self._rank, (-d, int(self.slot_seq_S[slot]), slot, key))

    def evict(self, key) -> None:
        self.epoch += 1
        slot = self.slot_of.pop(key)
        self.slot_key[slot] = None
        self.slot_layer_S[slot] = -1
        self.slot_E[key[0]][key[1]] = -1
        st = self.stats.pop(key, None)
        if st is not None and st[3] and st[1] == 0:
            self.c.wasted_prefetch_bytes += self.slot_bytes
        if st is not None and self.policy.host_compute:
            # the miss that fetched it was its first use; residence in rounds of the pass's layers
            cycle = len(self.reuse.pos_in_cycle) if self.reuse is not None else self.L
            self.calibration.evicted(key, st[1] - 1, (self.tick - st[2]) / max(1, cycle))
        self.lowp.discard(key)
        self.free_slots.append(slot)
        self.c.evictions += 1
        if self.record_events:
            self.event("evict", layer=key[0], expert=key[1])

    def next_use(self):
        return self.belady.at(self.pos) if self.belady is not None else {}
