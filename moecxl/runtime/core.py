"""The decision core: one MoE-layer visit in, the actions out, for the engine and the simulator alike.

`DecisionCore.visit` takes a `Visit` (which experts layer m needs now) and decides, for each: a hit, a
wait on a copy in flight, a demand fetch (its source plan and its victim), a host computation, a
low-precision copy, or a copy for later; `after` then issues the policy's prefetches (`prefetch.py`).
What it decides, a `Mechanism` carries out: the engine with real copies and slot arrays, the simulator
with bookings on a `LinkClock`. Neither has decision logic of its own, so their action sequences are
the same on the same clock (tests/test_lockstep.py). Memos the hot path needs live here, once.
"""

from __future__ import annotations

import numpy as np

from moecxl.runtime import homes, striping
from moecxl.runtime import prefetch as prefetch_mod
from moecxl.runtime.cache import SlotCache
from moecxl.runtime.gate import (
    ReuseCalibration,
)
from moecxl.runtime.mechanism import CopyFailed, CoreError, check_mechanism
from moecxl.runtime.metrics import MAX_SAMPLES, Counters
from moecxl.runtime.misses import MissDecisions
from moecxl.runtime.policies import check_policy
from moecxl.runtime.policies.eviction import NextUse
from moecxl.runtime.policies.reuse import Reuse
from moecxl.runtime.visit import restrict

BELADY_WINDOW_PASSES = 4  # Belady's look-ahead: this many passes over the MoE layers
FREQ_EMA_ALPHA = 0.2  # per decode step: activation frequencies for placement and rebalancing


class DecisionCore(MissDecisions, SlotCache):
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
        batch_copies: bool = False,
    ):
        check_mechanism(mech)
        check_policy(policy)
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
        # Copies issued together from one tier go as one transfer (`fetch`, `flush_copies`): per tier, the
        # number submitted since the last flush.
        self.batch_copies = bool(batch_copies)
        self.open_batches: dict[str, int] = {}
        self.events: list[dict] = []
        # Oracle and Belady know the future: (layer, experts) visits in order.
        self.future = list(future) if future is not None else None
        self.belady = NextUse(self.future, BELADY_WINDOW_PASSES * L) if self.future is not None else None
        self.pos = 0  # visits done: Belady's look-ahead starts at the next one
        self.reuse = Reuse(L, E) if policy.needs_reuse else None
        self.victim_per_layer = bool(getattr(policy, "victim_per_layer", False))
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
    def groups(self, v) -> list:
        """The visit as the groups it is processed in: itself where its experts fit the cache (or none
        takes a slot: host-only), else sub-visits of at most `n_slots` experts each, the resident ones
        first, then those in flight, then the rest (mixtral-offloading and MoE-Infinity process a long
        prompt's layer so: compute what is resident, evict, fetch the rest)."""
        if self.pending is not None:  # what `visit` would do first: the prefetch the last visit owes
            self.after()
        pol, m = self.policy, v.layer
        demand = tuple(pol.demand(self, v))
        # slots held by copies in flight for other layers are not this layer's until they land
        n = self.n_slots - sum(1 for key in self.inflight if key[0] != m or key[1] not in demand)
        if len(demand) <= max(1, n) or pol.host_only:
            return [v]
        whole_layer = demand != tuple(v.experts)  # Accelerate, GPU-only: the layer at once
        if whole_layer and len(demand) <= self.n_slots:
            return [v]
        if whole_layer:
            need = (len(demand) + self.max_inflight) * self.slot_bytes
            raise CoreError(
                f"layer {m} needs {len(demand)} distinct experts at once ({v.n_tokens} tokens, top-{self.K}) "
                f"but the device cache holds {self.n_slots}, and policy {pol.name!r} moves whole layers; "
                f"use a device_budget of at least {need} bytes"
            )
        rank = {e: (0 if (m, e) in self.slot_of else 1 if (m, e) in self.inflight else 2, e) for e in demand}
        order = sorted(demand, key=rank.__getitem__)
        n = max(1, n)
        return [restrict(v, order[i : i + n]) for i in range(0, len(order), n)]

    def visit(self, v, features=None, last: bool = True, whole=None) -> np.ndarray:
        """Make layer `v.layer`'s experts resident or computed; returns its expert -> slot map (-1: not
        on the device: computed on the host). Its prefetch waits for `after` (the caller dispatches the
        layer's expert step first, so prefetch decisions overlap the device's compute). `features`: what a
        live predictor reads beyond the visit (the engine's layer output). A visit processed in `groups`
        is visited group by group; only the `last` prefetches (for the `whole` visit) and moves Belady's
        look-ahead on."""
        if self.pending is not None:
            self.after()
        m, pol = v.layer, self.policy
        self.tick += 1
        needed = v.experts
        keys = [(m, e) for e in pol.demand(self, v)]
        if len(keys) > self.n_slots and not pol.host_only:  # host-only: a miss takes no slot
            self.groups(v)  # a whole-layer system's error
            raise CoreError(f"layer {m}: {len(keys)} experts at once, {self.n_slots} slots: visit its groups")
        if self.reuse is not None:
            self.reuse.observe(m, needed)
        counts_m = self.step_counts[m]
        for e in needed:
            counts_m[e] += 1
        pol.on_visit(self, v)
        lowp_ok = set()
        if pol.low_precision_on_miss:
            lowp_ok = {(m, e) for e, w in zip(needed, v.max_weight) if w < self.lowp_threshold}
        if self.inflight:
            self.poll()
        protect = set(keys)
        wait, later = [], []
        c, slot_of, lowp, rec = self.c, self.slot_of, self.lowp, self.record_events
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
                n_tok = v.tokens(key[1])
                decided = pol.miss(self, key, n_tok, host_queue_s, protect)
                if decided is not None:
                    choice, host_s = decided
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
                    if self.batch_copies:  # its batch landed with it: free their staging too, so the
                        self.poll()  # next misses go together as well, not one transfer each
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
        self.flush_copies()  # copies for later, not waited for: sent before time moves on
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
        if self.future is not None and last:
            self.pos += 1  # this visit is done: Belady's look-ahead starts at the next one
        if pol.prefetch is not None and last:
            self.pending = (v if whole is None else whole, protect, features)
        slot_E = self.slot_E[m]
        if self.pending is not None or self.host_jobs:
            slot_E = slot_E.copy()  # a snapshot: prefetch may evict other experts of this layer
            for key, _ in self.host_jobs:
                slot_E[key[1]] = -1
            self.host_jobs = []
        return slot_E

    def after(self) -> None:
        """The prefetch the last visit owes (once its expert step is dispatched); the prefetches it starts
        together go as one transfer per tier where copies are batched."""
        pending, self.pending = self.pending, None
        if pending is not None:
            prefetch_mod.prefetch(self, *pending)
            self.flush_copies()

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
        """Issue one copy: staging room, a slot (evicting the policy's victim), the source plan. With
        `batch_copies`, a whole unstriped copy joins the open batch of its tier (`flush_copies` sends it);
        striped and int8 copies stay one transfer each (a stripe is already one copy per device, an
        int8 copy a pair of arrays dequantised as it lands)."""
        self.mech.before_issue(len(self.inflight))
        slot = self.take_slot(protect, key)
        plan = self.plan(key, low_precision)
        stripe = self.store.stripe_of(key) if plan.striped else None
        batched = self.batch_copies and not plan.striped and not low_precision
        if not batched:
            self.flush_copies()  # copies submitted before it are sent before it
        cp = self.mech.submit(key, plan, low_precision, stripe, batched=batched)
        if batched:
            self.open_batches[plan.label] = self.open_batches.get(plan.label, 0) + 1
        else:
            self.c.count_transfer(1)
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

    def flush_copies(self) -> None:
        """Send the open batches, one transfer per tier: before anything waits or time moves on."""
        if self.open_batches:
            for n in self.open_batches.values():
                self.c.count_transfer(n)
            self.open_batches = {}
            self.mech.flush_batches()

    def complete(self, key) -> None:
        """Land a copy (the mechanism blocks until it is there: stall) and map its slot."""
        self.flush_copies()
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
