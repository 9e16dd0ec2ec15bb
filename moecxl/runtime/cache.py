"""The device cache's slot map and eviction: which cached expert makes room, by the policy's rule.

A part of `DecisionCore` (its state), kept in its own module: the rules are the policy's
(`policies/eviction.py`); here are the slot map and the "predicted" rule's ranking memo, once for the
engine and the simulator.
"""

from __future__ import annotations

import bisect

import numpy as np

from moecxl.runtime.mechanism import CoreError
from moecxl.runtime.policies.reuse import expected_reuse_distance, reuse_distance_S


class SlotCache:
    """`DecisionCore`'s slots and victims (a mixin: the state is the core's)."""

    def victim_scope(self, incoming):
        """What a memoised victim depends on beyond the cache: the incoming expert's layer for a
        per-layer cache (the policy's optional `victim_per_layer` trait), else nothing."""
        return incoming[0] if incoming is not None and self.victim_per_layer else None

    def take_slot(self, protect, incoming=None) -> int:
        if not self.free_slots:
            tag = (self.epoch, self.tick, id(protect), self.victim_scope(incoming))
            if not self.policy.needs_future and self._miss_victim[0] == tag:
                victim = self._miss_victim[1]  # the miss decision just looked it up: nothing changed since
            else:
                victim = self.victim(protect | self.inflight.keys(), incoming=incoming)
            if victim is None:
                raise CoreError(
                    f"device cache of {self.n_slots} slots has nothing evictable (all needed now)"
                )
            self.evict(victim)
        return self.free_slots.pop()

    def victim(self, skip, next_use=None, incoming=None):
        """The cached expert the policy evicts for `incoming`, never one in `skip` (None: nothing)."""
        return self.policy.victim(self, skip, incoming, next_use)

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
