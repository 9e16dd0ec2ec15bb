"""The three-way miss decision: fetch, compute on the host where the expert lives, or a low-precision
copy; a copy in flight waited for or overtaken by the host; a host-computed miss copied for later.

A part of `DecisionCore` (its state and clock), kept in its own module: the arithmetic is `gate.py`'s,
this is where the run's estimates (queues, reuse, calibration, victims) are gathered for it.
"""

from __future__ import annotations

from dataclasses import replace

from moecxl.memory.tiers import copy_time_s
from moecxl.runtime import prefetch as prefetch_mod
from moecxl.runtime.gate import (
    DEFAULT_DECAY,
    MissCosts,
    copy_for_later,
    credit_of_reuses,
    demand_pressure,
    expected_reuses,
    host_compute_on_tier_s,
    miss_decision,
)


class MissDecisions:
    """`DecisionCore`'s miss decisions (a mixin: the state is the core's)."""

    def host_compute_s(self, key, n_tokens: int) -> float:
        """Seconds of the host computing one expert where it lives (`gate.host_compute_on_tier_s`), on
        the run's time scale; a function of the tier and the token count only, so remembered."""
        tier = self.source(key)
        memo = self._host_s_memo.get((tier, n_tokens))
        if memo is None:
            memo = self.time_scale * host_compute_on_tier_s(
                self.hardware, tier, n_tokens, self.expert_params, self.clock_bytes, self.hidden_size
            )
            self._host_s_memo[(tier, n_tokens)] = memo
        return memo

    def copy_s(self, tier: str) -> float:
        """Seconds of one whole-expert copy from `tier` on idle links (`copy_time_s`), remembered."""
        memo = self._copy_s_memo.get(tier)
        if memo is None:
            memo = self._copy_s_memo[tier] = (
                copy_time_s(tier, self.clock_bytes, self.hardware) * self.time_scale
            )
        return memo

    def host_time_s(self, key, n_tokens: int, now: float, host_queue_s: float) -> float:
        """The host's time for one expert once its earlier host work is done: its read after the traffic
        booked on the expert's device, then the compute."""
        queue_s = self.clock.device_queue_s(self.source(key), now + host_queue_s)
        return self.host_compute_s(key, n_tokens) + queue_s

    def inflight_choice(self, key, n_tokens: int, host_queue_s: float = 0.0) -> tuple[str, float]:
        """A needed expert in flight: wait for its copy, or compute it on the host now when that is
        sooner (`gate.miss_decision` between the two). Returns (choice, host seconds)."""
        cp = self.inflight[key][0]
        now = self.mech.now_s()
        wait_s = max(0.0, cp.expected_done_s - now) + self.mech.install_overhead_s
        host_s = self.host_time_s(key, n_tokens, now, host_queue_s) + self.mech.host_overhead_s
        costs = MissCosts(fetch_s=float("inf"), inflight_s=wait_s, host_s=host_queue_s + host_s)
        return miss_decision(costs), host_s

    def miss_choice(self, key, n_tokens: int, host_queue_s: float = 0.0, protect=frozenset()):
        """`gate.miss_decision` for one miss; `host_queue_s` is the host compute already chosen in this
        visit, which the CPU does first. Returns (choice, this expert's host seconds)."""
        now = self.mech.now_s()
        tier_name = self.source(key)
        host_s = self.host_time_s(key, n_tokens, now, host_queue_s)
        if self.policy.host_only:
            return "host", host_s
        mech = self.mech
        fetch_s = self.plan(key).expected_s + mech.fetch_overhead_s + mech.install_overhead_s
        lowp_s = None
        served = sum(self.c.miss_choices.values())
        if self.quality_budget > 0 and self.c.miss_choices["lowp"] < self.quality_budget * max(1, served):
            lowp_s = self.clock.expected_wait_s(tier_name, self.lowp_bytes, now)
            lowp_s += mech.fetch_overhead_s + mech.install_overhead_s
        credit, promised = self.reuse_credit(key, host_s, tier_name)
        host_s += mech.host_overhead_s
        costs = MissCosts(fetch_s=fetch_s, host_s=host_queue_s + host_s, lowp_s=lowp_s, reuse_credit_s=credit)
        choice = miss_decision(costs)
        if choice in ("fetch", "lowp") and not self.free_slots:
            # A copy takes a slot: the credit is what it saves later less what the victim would have
            # (only a copy's option can lose by it, so only then is the victim looked up).
            lost = self.victim_credit(n_tokens, protect, key)
            choice = miss_decision(replace(costs, reuse_credit_s=credit - lost))
        if choice in ("fetch", "lowp") and self.phase == "decode":
            # calibrated on decode copies: a prefill's pass pattern (a Switch encoder's layers) ends with it
            self.calibration.fetched(key, promised)
        return choice, host_s

    def copy_for_later(self, key, n_tokens: int, protect) -> bool:
        """A miss computed on the host now: also copy it in the background for its later uses
        (`gate.copy_for_later`, with the victim's credit and the run's demand pressure)?"""
        if self.policy.host_only or self.policy.prefetch is None:
            return False
        one = self.copy_s(self.source(key))
        host_s = self.host_compute_s(key, n_tokens)
        credit = self.reuse_credit(key, host_s)[0]
        if not self.free_slots:
            credit -= self.victim_credit(n_tokens, protect, key)
        hits, misses = self.c.lookups
        fetched = max(0, misses - self.c.miss_choices["host"])
        layer_s = self.mech.layer_s(self.phase) or one * prefetch_mod.UNMEASURED_LAYER_FRACTION
        upv = (hits + misses) / max(1, self.tick)
        pressure = demand_pressure(fetched, hits + misses - fetched, one, layer_s, upv)
        return copy_for_later(credit, pressure, one, host_s)

    def victim_credit(self, n_tokens: int, protect, incoming=None) -> float:
        """What the copy a new one (`incoming`) would evict is expected to save later (0: none evictable)."""
        victim = self.visit_victim(protect, incoming)
        if victim is None:
            return 0.0
        # The victim's promise holds until the cache, the copies in flight or the visit change; only the
        # host's time depends on the miss's tokens.
        tag = (self.epoch, self.tick, victim)
        if self._victim_credit_memo[0] != tag:
            self._victim_credit_memo = (tag, self.promise(victim))
        promised, one = self._victim_credit_memo[1]
        return credit_of_reuses(promised, self.calibration.factor, self.host_compute_s(victim, n_tokens), one)

    def visit_victim(self, protect, incoming=None):
        """The victim a copy issued now would evict, looked up once per cache change and visit."""
        tag = (self.epoch, self.tick, id(protect), self.victim_scope(incoming))
        if self._miss_victim[0] != tag:
            self._miss_victim = (tag, self.victim(protect | self.inflight.keys(), incoming=incoming))
        return self._miss_victim[1]

    def reuse_credit(self, key, host_s: float, tier: str | None = None) -> tuple[float, float]:
        """(Seconds a cached copy of `key` is expected to save later, the reuses promised for it)."""
        promised, one = self.promise(key, tier)
        return credit_of_reuses(promised, self.calibration.factor, host_s, one), promised

    def promise(self, key, tier: str | None = None) -> tuple[float, float]:
        """(`gate.expected_reuses` of a cached copy of `key`, the seconds of one copy of it): the parts of
        its reuse credit that do not depend on the host's time."""
        reuse = self.reuse
        p_reuse, p_far, decay = reuse.far_near(key) if reuse is not None else (0.0, None, DEFAULT_DECAY)
        rounds = self.calibration.rounds(
            reuse.rounds_cached(self.n_slots) if reuse is not None else 1.0,
            self.step if self.phase == "decode" else None,
        )
        until = reuse.layers_until(key[0]) / self.L if reuse is not None else 1.0
        return expected_reuses(p_reuse, rounds, until, p_far, decay), self.copy_s(tier or self.source(key))

    def run_host(self, m: int, jobs) -> None:
        """The CPU computes `jobs` ((key, tokens), in order) from now: each read books the expert's device
        after the traffic there (copies in flight, earlier reads), then the compute."""
        self.flush_copies()  # the copies chosen before these experts are on the links first
        now = cursor = self.mech.now_s()
        out = []
        c = self.c
        for key, n_tok in jobs:
            tier = self.source(key)
            if self.mech.books_host_reads:
                begin = self.mech.reserve_host_read(tier, cursor)
                dt = begin - cursor + self.host_compute_s(key, n_tok)
                cursor += dt
                c.host_s += dt
            c.host_tokens += n_tok
            c.host_read_bytes_by_tier[tier] += self.clock_bytes
            out.append((key, tier, n_tok))
            self.event("host_compute", layer=m, expert=key[1], tier=tier, tokens=n_tok)
        self.mech.host_compute(m, out, max(now, cursor))
