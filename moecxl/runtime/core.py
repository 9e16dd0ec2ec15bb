"""The decision core: one MoE-layer visit in, the actions out, for the engine and the simulator alike.

`DecisionCore.visit` takes a `Visit` (which experts layer m needs now) and decides, for each: a hit, a
wait on a copy in flight, a demand fetch (its source plan and its victim), a host computation, a
low-precision copy, or a copy for later; `after` then issues the policy's prefetches (`prefetch.py`).
What it decides, a `Mechanism` carries out: the engine with real copies and slot arrays, the simulator
with bookings on a `LinkClock`. Neither has decision logic of its own, so their action sequences are
the same on the same clock (tests/test_lockstep.py). Memos the hot path needs live here, once.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

import numpy as np

from moecxl.memory.tiers import copy_time_s
from moecxl.runtime import homes, striping
from moecxl.runtime import prefetch as prefetch_mod
from moecxl.runtime.gate import (
    MissCosts,
    ReuseCalibration,
    copy_for_later,
    credit_of_reuses,
    demand_pressure,
    expected_reuses,
    host_compute_on_tier_s,
    miss_decision,
)
from moecxl.runtime.mechanism import CopyFailed, CoreError, check_mechanism
from moecxl.runtime.metrics import MAX_SAMPLES, Counters
from moecxl.runtime.policies import (
    EntryStats,
    NextUse,
    Reuse,
    choose_victims,
    eviction_score,
    expected_reuse_distance,
    reuse_distance_S,
)

BELADY_WINDOW_PASSES = 4  # Belady's look-ahead: this many passes over the MoE layers
FREQ_EMA_ALPHA = 0.2  # per decode step: activation frequencies for placement and rebalancing


class DecisionCore:
    """The runtime state as the policies see it (cache slots, copies in flight, per-expert statistics,
    homes) and every decision over it. `store`: where copies live (`HostStore` or `VirtualStore`);
    `mech`: who carries the actions out (`Mechanism`)."""

    def __init__(
        self,
        *,
        policy,
        hardware,
        store,
        mech,
        L: int,
        E: int,
        K: int,
        n_slots: int,
        max_inflight: int,
        budget_bytes: int,
        slot_bytes: int,
        clock_bytes: int,
        expert_params: int,
        hidden_size: int,
        time_scale: float = 1.0,
        future=None,
        predictor=None,
        eam_library=(),
        quality_budget: float = 0.0,
        lowp_threshold: float = 0.3,
        lowp_bytes_ratio: float = 0.5,
        freq=None,
        ema_alpha: float = FREQ_EMA_ALPHA,
        rebalance_every: int = 0,
        faults=(),
        record_events: bool = False,
        reader: str = "gpu",
    ):
        check_mechanism(mech)
        self.policy, self.hardware, self.store, self.mech = policy, hardware, store, mech
        self.clock = mech.clock
        self.L, self.E, self.K = L, E, K
        self.n_slots, self.max_inflight, self.budget_bytes = n_slots, max_inflight, budget_bytes
        self.slot_bytes, self.clock_bytes = slot_bytes, clock_bytes
        self.expert_params, self.hidden_size, self.time_scale = expert_params, hidden_size, time_scale
        self.quality_budget, self.lowp_threshold = quality_budget, lowp_threshold
        self.lowp_bytes = int(clock_bytes * lowp_bytes_ratio)
        self.reader = reader
        self.record_events = record_events
        self.events: list[dict] = []
        # Oracle and Belady know the future: (layer, experts) visits in order.
        self.future = list(future) if future is not None else None
        self.belady = NextUse(self.future, BELADY_WINDOW_PASSES * L) if self.future is not None else None
        self.pos = 0  # visits done: Belady's look-ahead starts at the next one
        self.reuse = Reuse(L, E) if policy.evict == "predicted" else None
        self.calibration = ReuseCalibration()  # promised vs served reuses of copies fetched on a miss
        self.predictor = predictor
        self.predictor_name = prefetch_mod.predictor_name(policy, predictor)
        self.eam_library = list(eam_library or [])
        self.eam_current = np.zeros((L, E))
        # Cache: slot -> key, key -> slot, per-layer expert -> slot maps (what the expert step reads).
        self.slot_key: list = [None] * n_slots
        self.slot_of: dict = {}
        self.slot_E = [np.full(E, -1, np.int32) for _ in range(L)]
        # The same map as arrays, for the vectorised victim scan: layer and expert per slot (-1: free)
        # and when it was cached (the order `slot_of` iterates in, which breaks ties).
        self.slot_layer_S = np.full(n_slots, -1, np.int64)
        self.slot_expert_S = np.full(n_slots, -1, np.int64)
        self.slot_seq_S = np.zeros(n_slots, np.int64)
        self.seq = 0
        self.free_slots = list(range(n_slots))[::-1]
        # Mutable on the hot path: [last_use, uses, loaded_at, prefetched] (the EntryStats fields).
        self.stats: dict = {}
        self.lowp: set = set()
        self.inflight: dict = {}  # key -> (Copy, slot, prefetched)
        self.probs: dict = {}  # the latest predictions {(layer, expert): p}, which eviction reads
        self.probs_version = 0
        self.tick = 0
        self.phase, self.step, self.decode_steps = "prefill", 0, 0
        self.offline: set[str] = set()
        self.faults = tuple(faults)
        self.c = Counters(L)
        self.original_home = dict(store.home_of)
        self.freq_ema = (
            np.zeros((L, E)) if freq is None else np.asarray(freq, float) / max(1e-12, np.sum(freq)) * L
        )
        self.step_counts = [[0] * E for _ in range(L)]  # this step's visits per (layer, expert)
        self.ema_alpha, self.rebalance_every = float(ema_alpha), int(rebalance_every)
        self.stripe_min_gain = striping.MIN_GAIN
        self.stripe_report: dict = {"striped": 0, "skipped": {}}
        self.host_jobs: list = []  # this visit's host-computed experts: (key, tier, tokens)
        self.pending = None  # (visit, protected keys, features): the prefetch `after` owes
        self._host_s_memo: dict = {}
        self._copy_s_memo: dict = {}
        self.epoch = 0  # bumped whenever the cache, the copies in flight or the predictions change
        self._gate_victim: tuple = (None, None)
        self._miss_victim: tuple = (None, None)
        self._victim_credit_memo: tuple = (None, 0.0)
        self._rank_tag = None
        self._rank: list = []

    # ---- events (the action log) ----------------------------------------------------------------------
    def event(self, kind: str, **kw) -> None:
        if self.record_events:
            self.events.append(
                {
                    "t_s": self.mech.now_s(),
                    "kind": kind,
                    "phase": self.phase,
                    "step": self.step,
                    **kw,
                    "device_expert_bytes": self.device_expert_bytes(),
                }
            )

    def device_expert_bytes(self) -> int:
        """Expert bytes held on the device: the slots plus copies in flight or landed, not installed."""
        return (self.n_slots + len(self.inflight) + self.mech.staged()) * self.slot_bytes

    # ---- steps and requests ---------------------------------------------------------------------------
    def begin(self, phase: str, step: int) -> None:
        """A forward pass starts: a prefill forgets the request's activations; scheduled faults fire by
        decode step, counted over the run (1 = the first decode step)."""
        self.phase, self.step = phase, step
        if phase == "prefill":
            self.eam_current[:] = 0
            if self.predictor is not None and hasattr(self.predictor, "reset"):
                self.predictor.reset()
        if phase == "decode":
            self.decode_steps += 1
            for f in self.faults:
                if f.offline_at_step == self.decode_steps and f.tier not in self.offline:
                    homes.set_offline(self, f.tier)
                back = f.online_at_step is not None and f.online_at_step == self.decode_steps
                if back and f.tier in self.offline:
                    homes.set_online(self, f.tier)

    def end(self, phase: str, step: int) -> None:
        """A forward pass ends: activation frequencies updated; rebalancing where asked."""
        a = self.ema_alpha
        self.freq_ema = (1 - a) * self.freq_ema + a * np.asarray(self.step_counts, float)
        self.step_counts = [[0] * self.E for _ in range(self.L)]
        if phase == "decode" and self.rebalance_every and step % self.rebalance_every == 0:
            homes.rebalance(self)

    # ---- one visit --------------------------------------------------------------------------------------
    def visit(self, v, features=None) -> np.ndarray:
        """Make layer `v.layer`'s experts resident or computed; returns its expert -> slot map (-1: not
        on the device: computed on the host). Its prefetch waits for `after` (the caller dispatches the
        layer's expert step first, so prefetch decisions overlap the device's compute). `features`: what a
        live predictor reads beyond the visit (the engine's layer output)."""
        if self.pending is not None:
            self.after()
        m = v.layer
        self.tick += 1
        needed = v.experts
        if len(needed) > self.n_slots:
            need = (len(needed) + self.max_inflight) * self.slot_bytes
            raise CoreError(
                f"layer {m} needs {len(needed)} distinct experts at once ({v.n_tokens} tokens, top-{self.K}) "
                f"but the device cache holds {self.n_slots}; use a device_budget of at least {need} bytes, "
                "or a smaller batch or prompt"
            )
        keys = [(m, e) for e in needed]
        if self.reuse is not None:
            self.reuse.observe(m, needed)
        counts_m = self.step_counts[m]
        for e in needed:
            counts_m[e] += 1
        if self.policy.prefetch == "eam":
            self.eam_current[m, list(needed)] += v.tokens_per_expert
        lowp_ok = set()
        if self.policy.low_precision_on_miss:
            lowp_ok = {(m, e) for e, w in zip(needed, v.max_weight) if w < self.lowp_threshold}
        if self.inflight:
            self.poll()
        protect = set(keys)
        wait, later = [], []
        c, slot_of, lowp, rec, pol = self.c, self.slot_of, self.lowp, self.record_events, self.policy
        blocked0 = self.mech.blocked_s()
        misses_before, host_before = c.misses[m], c.miss_choices["host"]
        host_queue_s = 0.0
        host_done = 0  # self.host_jobs[:host_done] are computed
        for key in keys:
            if key in slot_of and (not lowp or key not in lowp or key in lowp_ok):
                c.hits[m] += 1
                st = self.stats[key]
                if st[3] and st[1] == 0:
                    c.prefetch_used += 1
                if rec:
                    self.event("hit", layer=m, expert=key[1])
            elif key in self.inflight:
                c.inflight_hits[m] += 1
                cp, slot, pref = self.inflight[key]
                if pref:
                    c.prefetch_used += 1  # used, if late: it lands before a demand fetch would
                    if not cp.done():
                        c.late_prefetch += 1
                    self.inflight[key] = (cp, slot, False)  # counted: not again when it lands unused
                if pol.host_compute:
                    n_tok = v.tokens(key[1])
                    choice, host_s = self.inflight_choice(key, n_tok, host_queue_s)
                    if choice == "host":  # the copy still lands, for later uses
                        c.inflight_host += 1
                        host_queue_s += host_s
                        self.host_jobs.append((key, n_tok))
                        protect.discard(key)
                        continue
                wait.append(key)
            else:
                c.misses[m] += 1
                if key in slot_of:  # a low-precision copy where an exact one is wanted
                    self.evict(key)
                if pol.host_compute:
                    n_tok = v.tokens(key[1])
                    choice, host_s = self.miss_choice(key, n_tok, host_queue_s, protect)
                    c.miss_choices[choice] += 1
                    if choice == "host":
                        host_queue_s += host_s
                        self.host_jobs.append((key, n_tok))
                        protect.discard(key)
                        if self.copy_for_later(key, n_tok, protect):
                            later.append(key)
                        continue
                    if choice == "lowp":
                        lowp_ok.add(key)
                if len(self.inflight) >= self.max_inflight:
                    # Staging is full: the CPU first computes the host experts chosen so far (the copies
                    # keep landing meanwhile), then a copy lands.
                    if len(self.host_jobs) > host_done:
                        self.run_host(m, self.host_jobs[host_done:])
                        host_done, host_queue_s = len(self.host_jobs), 0.0
                    done = next((k for k in wait if k in self.inflight), next(iter(self.inflight)))
                    self.complete(done)
                self.fetch(key, protect, prefetched=False, low_precision=key in lowp_ok)
                wait.append(key)
        if len(self.host_jobs) > host_done:  # the CPU computes while the copies are on the links
            self.run_host(m, self.host_jobs[host_done:])
        for key in later:  # host-computed experts worth caching: copied for later tokens, not waited for
            if len(self.inflight) >= self.max_inflight:
                break
            c.copied_for_later += 1
            self.fetch(key, protect, prefetched=True)
        for key in wait:
            if key in self.inflight:
                self.complete(key)
        stall = self.mech.blocked_s() - blocked0
        c.stall_s += stall
        c.stall_by_layer[m] += stall
        if self.reuse is not None:
            # cache turnover: copies installed, not misses (a host-computed miss replaces no slot)
            self.reuse.end_visit(c.misses[m] - misses_before - (c.miss_choices["host"] - host_before))
        stats, tick = self.stats, self.tick
        for key in keys:
            st = stats.get(key)
            if st is not None:  # None: computed on the host, never cached
                st[0] = tick
                st[1] += 1
        if self.future is not None:
            self.pos += 1  # this visit is done: Belady's look-ahead starts at the next one
        if pol.prefetch is not None:
            self.pending = (v, protect, features)
        slot_E = self.slot_E[m]
        if self.pending is not None or self.host_jobs:
            slot_E = slot_E.copy()  # a snapshot: prefetch may evict other experts of this layer
            for key, _ in self.host_jobs:
                slot_E[key[1]] = -1
            self.host_jobs = []
        return slot_E

    def after(self) -> None:
        """The prefetch the last visit owes (once its expert step is dispatched)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            prefetch_mod.prefetch(self, *pending)

    # ---- the three-way miss decision --------------------------------------------------------------------
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
            lost = self.victim_credit(n_tokens, protect)
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
            credit -= self.victim_credit(n_tokens, protect)
        hits, misses = self.c.lookups
        fetched = max(0, misses - self.c.miss_choices["host"])
        layer_s = self.mech.layer_s(self.phase) or one * prefetch_mod.UNMEASURED_LAYER_FRACTION
        upv = (hits + misses) / max(1, self.tick)
        pressure = demand_pressure(fetched, hits + misses - fetched, one, layer_s, upv)
        return copy_for_later(credit, pressure, one, host_s)

    def victim_credit(self, n_tokens: int, protect) -> float:
        """What the copy a new one would evict is expected to save later (0 if nothing is evictable)."""
        victim = self.visit_victim(protect)
        if victim is None:
            return 0.0
        # The victim's promise holds until the cache, the copies in flight or the visit change; only the
        # host's time depends on the miss's tokens.
        tag = (self.epoch, self.tick, victim)
        if self._victim_credit_memo[0] != tag:
            self._victim_credit_memo = (tag, self.promise(victim))
        promised, one = self._victim_credit_memo[1]
        return credit_of_reuses(promised, self.calibration.factor, self.host_compute_s(victim, n_tokens), one)

    def visit_victim(self, protect):
        """The victim a copy issued now would evict, looked up once per cache change and visit."""
        tag = (self.epoch, self.tick, id(protect))
        if self._miss_victim[0] != tag:
            self._miss_victim = (tag, self.victim(protect | self.inflight.keys()))
        return self._miss_victim[1]

    def reuse_credit(self, key, host_s: float, tier: str | None = None) -> tuple[float, float]:
        """(Seconds a cached copy of `key` is expected to save later, the reuses promised for it)."""
        promised, one = self.promise(key, tier)
        return credit_of_reuses(promised, self.calibration.factor, host_s, one), promised

    def promise(self, key, tier: str | None = None) -> tuple[float, float]:
        """(`gate.expected_reuses` of a cached copy of `key`, the seconds of one copy of it): the parts of
        its reuse credit that do not depend on the host's time."""
        reuse = self.reuse
        p_reuse, p_far, decay = reuse.far_near(key) if reuse is not None else (0.0, None, 0.8)
        rounds = self.calibration.rounds(
            reuse.rounds_cached(self.n_slots) if reuse is not None else 1.0,
            self.step if self.phase == "decode" else None,
        )
        until = reuse.layers_until(key[0]) / self.L if reuse is not None else 1.0
        return expected_reuses(p_reuse, rounds, until, p_far, decay), self.copy_s(tier or self.source(key))

    def run_host(self, m: int, jobs) -> None:
        """The CPU computes `jobs` ((key, tokens), in order) from now: each read books the expert's device
        after the traffic there (copies in flight, earlier reads), then the compute."""
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

    # ---- copies -----------------------------------------------------------------------------------------
    def source(self, key) -> str:
        """CXL-aware scheduling: of the expert's online copies, the one that would land first."""
        tier = self.store.only_copy(key)  # the common case: one copy, its home
        if tier is not None and tier not in self.offline:
            return tier
        tiers = [t for t in self.store.tiers_of(key) if t not in self.offline]
        if not tiers:
            homes.rehome(self, key)
            tiers = [t for t in self.store.tiers_of(key) if t not in self.offline]
        if len(tiers) == 1:
            return tiers[0]
        now = self.mech.now_s()
        return min(tiers, key=lambda t: self.clock.expected_wait_s(t, self.clock_bytes, now))

    def plan(self, key, low_precision: bool = False) -> striping.FetchPlan:
        """`striping.plan_fetch`: of the expert's online whole copies the one that would land first, or
        its striped read where that lands sooner."""
        tier = self.store.only_copy(key)
        nbytes = self.lowp_bytes if low_precision else self.clock_bytes
        if tier is not None and tier not in self.offline and self.store.stripe_of(key) is None:
            # the common case, per miss: one whole copy, not striped (what plan_fetch would pick)
            wait_s = self.clock.expected_wait_s(tier, nbytes, self.mech.now_s())
            return striping.FetchPlan(
                (tier,), wait_s, False, "low-precision" if low_precision else "no-stripe"
            )
        if all(t in self.offline for t in self.store.tiers_of(key)):
            homes.rehome(self, key)
        return striping.plan_fetch(
            self.store.tiers_of(key),
            self.store.stripe_of(key),
            self.clock,
            nbytes,
            self.mech.now_s(),
            self.offline,
            low_precision,
            self.stripe_min_gain,
        )

    def fetch(self, key, protect, prefetched: bool, low_precision: bool = False) -> None:
        """Issue one copy: staging room, a slot (evicting the policy's victim), the source plan."""
        self.mech.before_issue(len(self.inflight))
        slot = self.take_slot(protect)
        plan = self.plan(key, low_precision)
        stripe = self.store.stripe_of(key) if plan.striped else None
        cp = self.mech.submit(key, plan, low_precision, stripe)
        if plan.striped:
            self.c.striped_fetches += 1
        else:
            self.c.not_striped[plan.reason] += 1
        self.inflight[key] = (cp, slot, prefetched)
        self.epoch += 1
        for t, nbytes in cp.bytes_by_tier().items():
            self.c.bytes_by_tier[t] += nbytes
        self.c.max_queue = max(self.c.max_queue, len(self.inflight))
        if prefetched:
            self.c.prefetch_issued += 1
        if self.record_events:
            kind = "prefetch" if prefetched else "fetch"
            self.event(kind, layer=key[0], expert=key[1], tier=plan.label, low_precision=low_precision)

    def complete(self, key) -> None:
        """Land a copy (the mechanism blocks until it is there: stall) and map its slot."""
        cp, slot, prefetched = self.inflight.pop(key)
        try:
            self.mech.land(key, cp, slot)
        except CopyFailed:
            if self.offline.isdisjoint(cp.tiers):
                raise
            # Its source went offline mid-copy: fetch again from another copy (or the master).
            self.c.refetches += 1
            self.free_slots.append(slot)
            self.fetch(key, {key}, prefetched=prefetched, low_precision=cp.low_precision)
            return self.complete(key)
        if cp.low_precision:
            self.lowp.add(key)
        self.epoch += 1
        self.slot_of[key] = slot
        self.slot_key[slot] = key
        self.slot_layer_S[slot], self.slot_expert_S[slot] = key
        self.seq += 1
        self.slot_seq_S[slot] = self.seq
        if self.reuse is not None:
            self.ranked_landing(key, slot)
        self.slot_E[key[0]][key[1]] = slot
        self.stats[key] = [self.tick, 0, self.tick, prefetched]

    def poll(self) -> None:
        for key in [k for k, (cp, _, _) in self.inflight.items() if cp.done()]:
            self.complete(key)

    # ---- eviction ---------------------------------------------------------------------------------------
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

    # ---- visibility -------------------------------------------------------------------------------------
    def distribution(self) -> dict:
        """Share of experts by tier kind: the device cache counts as hbm, the rest by home tier."""
        total = self.L * self.E
        kinds: dict[str, float] = {"hbm": len(self.slot_of) / total}
        for key, tier in self.store.home_of.items():
            if key in self.slot_of:
                continue
            k = self.hardware.tier(tier).kind
            kinds[k] = kinds.get(k, 0.0) + 1 / total
        return kinds

    def sample_control(self, control_s: float, after: bool = False) -> None:
        """A decode visit's control-plane seconds (the engine measures them; the simulator charges them)."""
        self.c.control_s += 0.0 if after else control_s
        samples = self.c.control_after_samples_us if after else self.c.control_samples_us
        if self.phase == "decode" and len(samples) < MAX_SAMPLES:
            samples.append(control_s * 1e6)
