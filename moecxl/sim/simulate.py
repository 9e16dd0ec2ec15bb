"""Discrete-event replay of router traces through the runtime's policy code, with a cost model.

`simulate` walks the visits of each request in engine order and makes, at each, the decisions
`OffloadEngine.experts` makes (poll finished copies, hits, in-flight hits, misses with the staging
limit, waits, prefetch candidates, the cost-benefit gate, eviction), calling the same pure functions
(`policies.choose_victims`, `topk_candidates`, `pregate_vote_probs`, `eam_probs`, `gate.prefetch_gate`,
`placement.initial_placement`) and booking every copy on the engine's `LinkClock`. Time is simulated:
compute per visit from the roofline cost model (or a fixed time, to validate against an emulated run),
copies from the clock. tests/test_sim.py checks that engine and simulator make the same decisions.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from moecxl.memory.tiers import Hardware, copy_time_s
from moecxl.memory.transfer import LinkClock
from moecxl.runtime import placement as placement_mod
from moecxl.runtime import striping
from moecxl.runtime.gate import (
    MissCosts,
    ReuseCalibration,
    copy_alone_s,
    copy_for_later,
    demand_pressure,
    expected_reuses,
    host_compute_on_tier_s,
    miss_decision,
    prefetch_gate,
    reuse_credit_s,
)
from moecxl.runtime.policies import (
    EntryStats,
    NextUse,
    PolicySpec,
    Reuse,
    choose_victims,
    eam_probs,
    get_policy,
    pregate_vote_probs,
    topk_candidates,
)
from moecxl.runtime.striping import MAX_WIDTH, MIN_GAIN
from moecxl.sim.costmodel import ModelShape, head_s, visit_s
from moecxl.sim.energy import EnergyModel, run_energy
from moecxl.sim.workload import Request, Visit, oracle_future

PLACEMENTS = ("frequency", "uniform", "first_fit", "near_data")


class SimError(ValueError):
    """A simulation cannot run as asked (budget, policy, placement, faults); the message names the value."""


@dataclass(frozen=True)
class SimConfig:
    """One simulated deployment: policy, device budget and the knobs the engine has.

    `compute_s`: a fixed compute time per visit instead of the roofline (validation against an
    emulated engine run uses the measured layer time); `time_scale` scales copy times as the engine's
    emulation does. `placement`: "frequency" (Algorithm 1 with activation frequencies), "uniform"
    (Algorithm 1 without them), "first_fit" (no balancing: fill CXL devices in profile order),
    "near_data" (the tier the host CPU reads fastest first, by frequency when given), or None: the
    engine's default, "near_data" for a policy that computes misses on the host, else "uniform". `faults`: (tier, offline_at_decode_step, online_at_decode_step or None), counted over
    the whole workload; the profile's own faults are added. While a tier is offline its experts are
    fetched from `fallback_tier` (the host master copy).
    """

    policy: PolicySpec | str = "lru"
    device_budget: float = 0.25
    max_inflight: int | None = None
    lowp_threshold: float = 0.3
    lowp_bytes_ratio: float = 0.5  # int8 copy of a bf16 expert (scales ignored)
    compute_s: float | None = None
    head_s: float | None = None
    time_scale: float = 1.0
    placement: str | None = None
    warmup_requests: int = 0
    faults: tuple = ()
    fallback_tier: str = "dram"
    quality_budget: float = 0.0  # fraction of misses a policy with host_compute may serve in int8
    record_events: bool = False
    striping: bool = False  # stripe experts across CXL devices where that lands sooner (runtime.striping)
    stripe_max_width: int = MAX_WIDTH
    stripe_min_gain: float = MIN_GAIN


@dataclass
class SimResult:
    """Metrics (the engine's names, `timing: simulated`), per-step times and, optionally, events."""

    metrics: dict
    step_times_s: list = field(default_factory=list)
    events: list = field(default_factory=list)


@dataclass
class _Copy:
    tier: str
    done_s: float
    prefetched: bool
    low_precision: bool


class _Counters:
    def __init__(self, L: int):
        self.hits, self.inflight_hits, self.misses = [0] * L, [0] * L, [0] * L
        self.stall_s = 0.0
        self.bytes_by_tier: dict = defaultdict(int)
        self.prefetch_issued = self.prefetch_used = self.late_prefetch = self.gated = 0
        self.wasted_prefetch_bytes = self.evictions = self.max_queue = self.rehomed = 0
        self.miss_choices = {"fetch": 0, "host": 0, "lowp": 0, "inflight": 0}
        self.host_tokens = 0
        self.host_s = 0.0
        self.busy_s = 0.0  # GPU compute (roofline) time
        self.host_read_bytes_by_tier: dict = defaultdict(int)
        self.striped_fetches = 0
        self.inflight_host = 0  # needed experts in flight computed on the host instead of waited for
        self.copied_for_later = 0  # host-computed misses also copied in the background for later tokens
        self.visits = 0  # MoE layer visits (the gate's lookups per visit)
        self.not_striped: dict = defaultdict(int)


class _Replay:
    """The engine's decision sequence on simulated time (mirrors `OffloadEngine.experts`)."""

    def __init__(self, shape: ModelShape, hw: Hardware, cfg: SimConfig, requests, placement, library):
        self.shape, self.hw, self.cfg = shape, hw, cfg
        self.policy = get_policy(cfg.policy) if isinstance(cfg.policy, str) else cfg.policy
        self.L, self.E, self.K = shape.L, shape.E, shape.K
        self.expert_bytes = shape.expert_bytes
        total = self.L * self.E * self.expert_bytes
        b = cfg.device_budget
        if b is None or b <= 0:
            raise SimError(f"device_budget must be a positive fraction or byte count, got {b!r}")
        self.budget_bytes = int(b * total) if b <= 1 else int(b)
        self.max_inflight = int(cfg.max_inflight if cfg.max_inflight is not None else max(2, self.K))
        self.n_slots = self.budget_bytes // self.expert_bytes - self.max_inflight
        if self.n_slots < self.K:
            raise SimError(
                f"device_budget {b!r} = {self.budget_bytes} bytes holds {self.budget_bytes // self.expert_bytes} "
                f"experts of {self.expert_bytes} bytes; top-{self.K} plus {self.max_inflight} copies in flight "
                f"need more"
            )
        if self.policy.host_compute and hw.host is None:
            raise SimError(
                f"policy {self.policy.name!r} computes misses on the host but hardware {hw.name!r} has no "
                "'host:' block (gflops, mem_gbps) in its profile"
            )
        self.placement = placement
        self.stripes: dict = {}  # key -> striping.StripeSet (simulate() fills it when cfg.striping)
        self.library = library
        # Belady eviction needs the future as much as oracle prefetch does.
        knows_future = self.policy.prefetch == "oracle" or self.policy.evict == "belady"
        self.future = oracle_future(requests) if knows_future else []
        self.belady = NextUse(self.future, 4 * self.L)
        self.reuse = Reuse(self.L, self.E) if self.policy.evict == "predicted" else None
        self.calibration = ReuseCalibration()
        self.clock = LinkClock(hw, cfg.time_scale)
        self.now_s = 0.0
        self.layer_s = 0.0  # compute of the visit being replayed: the gate's time per layer
        self.tick = 0
        self.pos = 0
        self.free = self.n_slots
        self.slot_of: dict = {}  # insertion (completion) order, as the engine's slot map
        self.lowp: set = set()
        self.inflight: dict = {}
        self.stats: dict = {}
        self.probs: dict = {}
        self.eam_current = np.zeros((self.L, self.E))
        self.offline: set = set()
        self.c = _Counters(self.L)
        self.events: list = []
        self.phase, self.step = "prefill", 0

    # ---- helpers mirroring the engine ------------------------------------------------------------
    def _event(self, kind: str, **kw):
        if self.cfg.record_events:
            self.events.append(
                {"t_s": self.now_s, "kind": kind, "phase": self.phase, "step": self.step, **kw}
            )

    def _copy_bytes(self, low_precision: bool) -> int:
        return int(self.expert_bytes * self.cfg.lowp_bytes_ratio) if low_precision else self.expert_bytes

    def _source(self, key) -> str:
        tier = self.placement[key]
        if tier in self.offline:
            if self.cfg.fallback_tier in self.offline or self.cfg.fallback_tier not in self.hw.tier_names:
                raise SimError(
                    f"expert {key} lives on offline tier {tier!r} and fallback "
                    f"{self.cfg.fallback_tier!r} is unavailable: no copy left to fetch"
                )
            self.c.rehomed += 1
            return self.cfg.fallback_tier
        return tier

    def _stats_cached(self):
        return self.stats  # kept for cached experts only (popped on eviction)

    def _next_use(self):
        return self.belady.at(self.pos)

    def _take_slot(self, protect):
        if self.free == 0:
            victims = choose_victims(
                self.policy.evict,
                self._stats_cached(),
                1,
                protect | set(self.inflight),
                next_use=self._next_use() if self.policy.evict == "belady" else None,
                prob=self.probs,
                reuse=self.reuse,
            )
            if not victims:
                raise SimError(f"device cache of {self.n_slots} slots has nothing evictable (all needed now)")
            self._evict(victims[0])
        self.free -= 1

    def _evict(self, key):
        self.slot_of.pop(key)
        st = self.stats.pop(key, None)
        if st is not None and st.prefetched and st.uses == 0:
            self.c.wasted_prefetch_bytes += self.expert_bytes
        if st is not None:
            # the miss that fetched it was its first use; residence in rounds of the pass's layers
            cycle = len(self.reuse.pos_in_cycle) if self.reuse is not None else self.L
            self.calibration.evicted(key, st.uses - 1, (self.tick - st.loaded_at) / max(1, cycle))
        self.lowp.discard(key)
        self.free += 1
        self.c.evictions += 1
        self._event("evict", layer=key[0], expert=key[1])

    def _plan(self, key, low_precision: bool = False, source: str | None = None) -> striping.FetchPlan:
        """The engine's scheduling (`striping.plan_fetch`): the home copy (or the fallback while its tier
        is offline; `source` when the caller has it) or the striped read, whichever lands sooner."""
        return striping.plan_fetch(
            (source or self._source(key),),
            self.stripes.get(key),
            self.clock,
            self._copy_bytes(low_precision),
            self.now_s,
            self.offline,
            low_precision,
            self.cfg.stripe_min_gain,
        )

    def _fetch(self, key, protect, prefetched: bool, low_precision: bool = False):
        self._take_slot(protect)
        plan = self._plan(key, low_precision)
        nbytes = self._copy_bytes(low_precision)
        if plan.striped:
            chunks = self.stripes[key].scaled_bytes(nbytes)
            done, _ = self.clock.reserve_stripe(plan.tiers, chunks, self.now_s)
            self.c.striped_fetches += 1
        else:
            chunks = (nbytes,)
            _, done = self.clock.reserve(plan.tiers[0], nbytes, self.now_s)
            self.c.not_striped[plan.reason] += 1
        tier = plan.label
        self.inflight[key] = _Copy(tier, done, prefetched, low_precision)
        for t, b in zip(plan.tiers, chunks):
            self.c.bytes_by_tier[t] += b
        self.c.max_queue = max(self.c.max_queue, len(self.inflight))
        if prefetched:
            self.c.prefetch_issued += 1
        self._event("prefetch" if prefetched else "fetch", layer=key[0], expert=key[1], tier=tier)

    def _complete(self, key):
        cp = self.inflight.pop(key)
        self.now_s = max(self.now_s, cp.done_s)
        if cp.low_precision:
            self.lowp.add(key)
        self.slot_of[key] = True
        self.stats[key] = EntryStats(
            last_use=self.tick, uses=0, loaded_at=self.tick, prefetched=cp.prefetched
        )

    def _poll(self):
        for key in [k for k, cp in self.inflight.items() if cp.done_s <= self.now_s]:
            self._complete(key)

    # ---- one MoE layer visit (OffloadEngine.experts) ------------------------------------------------
    def visit(self, v: Visit):
        m = v.layer
        self.tick += 1
        self.c.visits += 1
        if len(v.experts) > self.n_slots:
            raise SimError(
                f"layer {m} needs {len(v.experts)} distinct experts at once but the device cache holds "
                f"{self.n_slots}; raise device_budget or lower the batch or prompt"
            )
        keys = [(m, e) for e in v.experts]
        if self.reuse is not None:
            self.reuse.observe(m, v.experts)
        self.eam_current[m, list(v.experts)] += v.tokens_per_expert
        lowp_ok = set()
        if self.policy.low_precision_on_miss:
            lowp_ok = {(m, e) for e, w in zip(v.experts, v.max_weight) if w < self.cfg.lowp_threshold}
        self._poll()
        protect = set(keys)
        wait, host, later = [], [], []
        t_stall0 = self.now_s
        misses_before, host_before = self.c.misses[m], self.c.miss_choices["host"]
        for key in keys:
            if key in self.slot_of and (key not in self.lowp or key in lowp_ok):
                self.c.hits[m] += 1
                st = self.stats[key]
                if st.prefetched and st.uses == 0:
                    self.c.prefetch_used += 1
                self._event("hit", layer=m, expert=key[1])
            elif key in self.inflight:
                self.c.inflight_hits[m] += 1
                cp = self.inflight[key]
                if cp.prefetched:
                    self.c.prefetch_used += 1  # as the engine: used, if late
                    if cp.done_s > self.now_s:
                        self.c.late_prefetch += 1
                    cp.prefetched = False  # counted: not again when it lands unused
                if self.policy.host_compute:
                    n_tok = v.tokens_per_expert[v.experts.index(key[1])]
                    choice, host_s = self._inflight_choice(key, n_tok, sum(h[2] for h in host))
                    if choice == "host":  # as the engine: the copy still lands, for later uses
                        self.c.inflight_host += 1
                        host.append((key, n_tok, host_s))
                        protect.discard(key)
                        continue
                wait.append(key)
            else:
                self.c.misses[m] += 1
                if key in self.slot_of:
                    self._evict(key)
                if self.policy.host_compute:
                    n_tok = v.tokens_per_expert[v.experts.index(key[1])]
                    choice, host_s = self._miss_choice(key, n_tok, sum(h[2] for h in host), protect)
                    self.c.miss_choices[choice] += 1
                    if choice == "host":
                        host.append((key, n_tok, host_s))
                        protect.discard(key)
                        if self._copy_for_later(key, n_tok, protect):
                            later.append(key)
                        continue
                    if choice == "lowp":
                        lowp_ok.add(key)
                if len(self.inflight) >= self.max_inflight:
                    # As the engine: staging is full; the CPU first computes the host experts chosen so
                    # far, then a copy lands.
                    self.now_s = self._host_run(m, host)
                    host = []
                    done = next((k for k in wait if k in self.inflight), next(iter(self.inflight)))
                    self._complete(done)
                self._fetch(key, protect, prefetched=False, low_precision=key in lowp_ok)
                wait.append(key)
        host_done_s = self._host_run(m, host)  # the CPU computes while the copies are on the links
        if later:
            # As the engine: once the CPU is done, host-computed experts worth caching are copied for
            # later tokens, as prefetches, without waiting for them.
            self.now_s = max(self.now_s, host_done_s)
            for key in later:
                if len(self.inflight) >= self.max_inflight:
                    break
                self.c.copied_for_later += 1
                self._fetch(key, protect, prefetched=True)
        for key in wait:
            if key in self.inflight:
                self._complete(key)
        self.now_s = max(self.now_s, host_done_s)
        self.c.stall_s += self.now_s - t_stall0
        if self.reuse is not None:
            # cache turnover: copies installed, not misses (a host-computed miss replaces no slot)
            self.reuse.end_visit(
                self.c.misses[m] - misses_before - (self.c.miss_choices["host"] - host_before)
            )
        for key in keys:
            if key not in self.stats:  # computed on the host, never cached
                continue
            st = self.stats[key]
            self.stats[key] = replace(st, last_use=self.tick, uses=st.uses + 1)
        if self.future:
            self.pos += 1  # this visit is done: Belady's look-ahead starts at the next one
        self._prefetch(v, protect)

    def _prefetch(self, v: Visit, protect):
        pf, m = self.policy.prefetch, v.layer
        if pf is None or self.policy.horizon <= 0:
            return
        layers = [m + h for h in range(1, self.policy.horizon + 1) if m + h < self.L]
        if pf == "oracle":
            nxt = self.future[self.pos : self.pos + self.policy.horizon]
            cands = [((layer, int(e)), 1.0) for layer, experts in nxt for e in experts]
        elif v.phase == "prefill" and layers and v.n_tokens * self.K >= self.E:
            # As the engine: prefill streams whole layers ahead (E token-slots or more: every expert likely).
            cands = [((layers[0], e), 1.0) for e in range(self.E)]
        elif not layers:
            return
        elif pf == "pregate":
            if v.pregate_top_HNK is None or v.pregate_top_HNK.shape[0] < len(layers):
                raise SimError(
                    f"policy {self.policy.name!r} pre-gates {self.policy.horizon} layers ahead but the workload "
                    f"carries no (or too short) pregate predictions; build it with pregate_NLHK "
                    f"(moecxl.sim.predict) of horizon >= {self.policy.horizon}"
                )
            top_HNK = v.pregate_top_HNK[: len(layers)].astype(np.int64)
            # -1: no pre-gate for layer m+h (past a Switch stack, or a tiled trace's last layer): no votes.
            have = (top_HNK >= 0).all(axis=(1, 2))
            if not have.any():
                return
            layers = [layer for layer, ok in zip(layers, have) if ok]
            probs = pregate_vote_probs(top_HNK[have], self.E)
            cands = topk_candidates(probs, layers, min(self.E, max(self.K, int((probs > 0).sum(1).max()))))
            cands = [c for c in cands if c[1] > 0]
        elif pf == "eam":
            cands = topk_candidates(eam_probs(self.eam_current, self.library, layers), layers, self.K)
        else:
            raise SimError(
                f"policy {self.policy.name!r}: prefetch source {pf!r} has no replay in the simulator"
            )
        self.probs = {k: p for k, p in cands}
        for key, p in cands:
            if key in self.slot_of or key in self.inflight:
                continue
            if len(self.inflight) >= self.max_inflight:
                break
            if self.policy.gate and not self._gate(key, p, m):
                self.c.gated += 1
                continue
            try:
                self._fetch(key, protect | {c[0] for c in cands if c[1] >= p}, prefetched=True)
            except SimError:
                break

    def _copy_for_later(self, key, n_tokens: int, protect) -> bool:
        """The engine's `_copy_for_later`: copy a host-computed miss in the background for its later
        uses (`gate.copy_for_later`)?"""
        if self.policy.host_only or self.policy.prefetch is None:
            return False
        one = copy_time_s(self._source(key), self.expert_bytes, self.hw) * self.cfg.time_scale
        host_s = self._host_compute_s(key, n_tokens)
        credit = self._reuse_credit(key, host_s)[0]
        if self.free == 0:
            credit -= self._victim_credit(n_tokens, protect)
        hits = sum(self.c.hits) + sum(self.c.inflight_hits)
        misses = sum(self.c.misses)
        fetched = max(0, misses - self.c.miss_choices["host"])
        upv = (hits + misses) / max(1, self.c.visits)
        pressure = demand_pressure(fetched, hits + misses - fetched, one, self.layer_s, upv)
        return copy_for_later(credit, pressure, one, host_s)

    def _host_run(self, m: int, host) -> float:
        """The CPU computes `host` ((key, tokens, estimate) in order) from now; returns when it is done.
        Each read books the expert's device after the traffic there (copies in flight, earlier reads):
        the decision's queue estimate is replaced by the booking's."""
        host_done_s = self.now_s
        for key, n_tok, _ in host:
            tier = self._source(key)
            start = self.clock.reserve_host_read(tier, self.expert_bytes, host_done_s)
            host_s = start - host_done_s + self._host_compute_s(key, n_tok)
            host_done_s += host_s
            self.c.host_s += host_s
            self.c.host_tokens += n_tok
            self.c.host_read_bytes_by_tier[tier] += self.expert_bytes
            self._event("host_compute", layer=m, expert=key[1], tokens=n_tok)
        return host_done_s

    def _host_compute_s(self, key, n_tokens: int) -> float:
        """Simulated seconds of the host computing one expert where it lives, its device idle."""
        return (
            host_compute_on_tier_s(
                self.hw,
                self._source(key),
                n_tokens,
                self.shape.expert_params,
                self.expert_bytes,
                self.shape.D,
            )
            * self.cfg.time_scale
        )

    def _host_time_s(self, key, n_tokens: int, host_queue_s: float) -> float:
        """The engine's `_host_time_s` on simulated time: the host's read of the expert after the traffic
        booked on its device, then the compute."""
        queue_s = self.clock.device_queue_s(self._source(key), self.now_s + host_queue_s)
        return self._host_compute_s(key, n_tokens) + queue_s

    def _inflight_choice(self, key, n_tokens: int, host_queue_s: float = 0.0) -> tuple[str, float]:
        """The engine's `_inflight_choice`: wait for the copy in flight or compute on the host now."""
        wait_s = max(0.0, self.inflight[key].done_s - self.now_s)
        host_s = self._host_time_s(key, n_tokens, host_queue_s)
        choice = miss_decision(
            MissCosts(fetch_s=float("inf"), inflight_s=wait_s, host_s=host_queue_s + host_s)
        )
        return choice, host_s

    def _miss_choice(
        self, key, n_tokens: int, host_queue_s: float = 0.0, protect: frozenset = frozenset()
    ) -> tuple[str, float]:
        """The engine's three-way decision (`gate.miss_decision`) on simulated time: (choice, host s).
        `host_queue_s`: host compute already chosen in this visit, which the CPU does first (as the link
        queue is in the fetch's expected time)."""
        tier_name = self._source(key)
        fetch_s = self._plan(key, source=tier_name).expected_s
        # The CPU starts on it after this visit's earlier host experts and the device's booked traffic.
        host_s = self._host_time_s(key, n_tokens, host_queue_s)
        lowp_s = None
        served = sum(self.c.miss_choices.values())
        if self.cfg.quality_budget > 0 and self.c.miss_choices["lowp"] < self.cfg.quality_budget * max(
            1, served
        ):
            lowp_s = self.clock.expected_wait_s(tier_name, self._copy_bytes(True), self.now_s)
        if self.policy.host_only:
            return "host", host_s
        credit, promised = self._reuse_credit(key, host_s)
        costs = MissCosts(fetch_s=fetch_s, host_s=host_queue_s + host_s, lowp_s=lowp_s, reuse_credit_s=credit)
        choice = miss_decision(costs)
        if choice in ("fetch", "lowp") and self.free == 0:
            # A copy takes a slot: the credit is what it saves later less what the victim would have
            # (only a copy's option can lose by it, so only then is the victim looked up).
            lost = self._victim_credit(n_tokens, protect)
            choice = miss_decision(replace(costs, reuse_credit_s=credit - lost))
        if choice in ("fetch", "lowp") and self.phase == "decode":
            # calibrated on decode copies: a prefill's pass pattern (a Switch encoder's layers) ends with it
            self.calibration.fetched(key, promised)
        return choice, host_s

    def _victim_credit(self, n_tokens: int, protect) -> float:
        """What the copy a new one would evict is expected to save later (0 if nothing is evictable)."""
        victims = choose_victims(
            self.policy.evict,
            self._stats_cached(),
            1,
            set(protect) | set(self.inflight),
            prob=self.probs,
            reuse=self.reuse,
        )
        if not victims:
            return 0.0
        return self._reuse_credit(victims[0], self._host_compute_s(victims[0], n_tokens))[0]

    def _reuse_credit(self, key, host_s: float) -> tuple[float, float]:
        """The engine's `_reuse_credit`: (seconds a cached copy of `key` is expected to save later, the
        reuses promised for it)."""
        p_reuse, p_far, decay = self.reuse.far_near(key) if self.reuse is not None else (0.0, None, 0.8)
        one = copy_time_s(self._source(key), self.expert_bytes, self.hw) * self.cfg.time_scale
        rounds = self.calibration.rounds(
            self.reuse.rounds_cached(self.n_slots) if self.reuse is not None else 1.0,
            self.step if self.phase == "decode" else None,
        )
        until = self.reuse.layers_until(key[0]) / self.L if self.reuse is not None else 1.0
        credit = reuse_credit_s(p_reuse, host_s, one, rounds, self.calibration.factor, until, p_far, decay)
        return credit, expected_reuses(p_reuse, rounds, until, p_far, decay)

    def _gate(self, key, p, m) -> bool:
        tier = self._source(key)
        plan = self._plan(key, source=tier)
        nbytes = self.expert_bytes
        chunks = self.stripes[key].scaled_bytes(nbytes) if plan.striped else (nbytes,)
        one = copy_alone_s(self.clock, plan.tiers, chunks)  # the planned path, as wait_s
        victim_p = 0.0
        if self.free == 0:
            victims = choose_victims(
                self.policy.evict,
                self._stats_cached(),
                1,
                set(self.inflight),
                prob=self.probs,
                reuse=self.reuse,
            )
            victim_p = self.probs.get(victims[0], 0.0) if victims else 0.0
        hits = sum(self.c.hits) + sum(self.c.inflight_hits)
        misses = sum(self.c.misses)
        host_s, credit = None, 0.0
        if self.policy.host_compute:
            host_s = self._host_time_s(key, 1, 0.0)
            if not self.policy.host_only:
                credit = self._reuse_credit(key, host_s)[0]
        return prefetch_gate(
            p,
            key[0] - m,
            self.layer_s,
            plan.expected_s,
            one,
            misses,
            hits,
            victim_p,
            uses_per_visit=(hits + misses) / max(1, self.c.visits),
            host_s=host_s,
            host_served=self.c.miss_choices["host"],
            reuse_credit_s=credit,
            can_fetch=not self.policy.host_only,
        )


def first_fit_placement(hw: Hardware, L: int, E: int, expert_bytes: int) -> dict:
    """No balancing: experts fill CXL devices in profile order, then DRAM, then NVMe."""
    homes = [t for kind in placement_mod.HOME_KIND_ORDER for t in hw.tiers_of_kind(kind)]
    used: dict = defaultdict(int)
    out = {}
    for m in range(L):
        for e in range(E):
            tier = next((t for t in homes if used[t.name] + expert_bytes <= t.capacity_bytes), None)
            if tier is None:
                raise SimError(f"hardware {hw.name!r}: no tier has room for expert ({m}, {e})")
            out[(m, e)] = tier.name
            used[tier.name] += expert_bytes
    return out


def default_placement(policy) -> str:
    """The engine's default home placement for a policy: near-data where misses may be computed on
    the host, else Algorithm 1 without frequencies."""
    return "near_data" if policy.host_compute else "uniform"


def make_placement(hw: Hardware, shape: ModelShape, how: str, freq_LE=None) -> dict:
    """Home tier of every expert: Algorithm 1 with or without frequencies, first-fit, or near-data
    (the tier the host CPU reads fastest first: for policies that compute misses where they live)."""
    if how == "frequency":
        if freq_LE is None:
            raise SimError("placement 'frequency' needs activation frequencies (freq_LE)")
        return placement_mod.initial_placement(hw, shape.L, shape.E, shape.expert_bytes, freq_LE)
    if how == "uniform":
        return placement_mod.initial_placement(hw, shape.L, shape.E, shape.expert_bytes, None)
    if how == "first_fit":
        return first_fit_placement(hw, shape.L, shape.E, shape.expert_bytes)
    if how == "near_data":
        return placement_mod.initial_placement(
            hw, shape.L, shape.E, shape.expert_bytes, freq_LE, reader="cpu"
        )
    raise SimError(f"unknown placement {how!r}; known: {PLACEMENTS}")


def simulate(
    requests: list[Request],
    shape: ModelShape,
    hw: Hardware,
    cfg: SimConfig = SimConfig(),
    *,
    freq_LE: np.ndarray | None = None,
    eam_library=(),
    placement: dict | None = None,
    energy: EnergyModel | None = None,
) -> SimResult:
    """Replay `requests` (in order, one cache across them) on `hw` for target `shape` under `cfg`;
    with an `energy` model, metrics["energy"] gives joules per token beside the latency."""
    if len(requests) <= cfg.warmup_requests:
        raise SimError(
            f"simulate: {len(requests)} request(s) and {cfg.warmup_requests} warm-up request(s): nothing to "
            "measure (is the trace empty, or the batch larger than it?)"
        )
    known = set(hw.tier_names)
    faults = list(cfg.faults) + [(f.tier, f.offline_at_step, f.online_at_step) for f in hw.faults]
    for tier, *_ in faults:
        if tier not in known:
            raise SimError(f"fault names unknown tier {tier!r}; tiers of {hw.name!r}: {sorted(known)}")
    how = cfg.placement or default_placement(
        get_policy(cfg.policy) if isinstance(cfg.policy, str) else cfg.policy
    )
    homes = placement or make_placement(hw, shape, how, freq_LE)
    r = _Replay(shape, hw, cfg, requests, homes, list(eam_library))
    stripe_skipped: dict = {}
    if cfg.striping:
        r.stripes, skipped = striping.stripe_placement(
            hw,
            homes,
            shape.expert_bytes,
            freq_LE if how == "frequency" else None,
            max_width=cfg.stripe_max_width,
            min_gain=cfg.stripe_min_gain,
        )
        for reason in skipped.values():
            stripe_skipped[reason] = stripe_skipped.get(reason, 0) + 1
    step_times, ttfts, tpots, tokens = [], [], [], 0
    decode_step = 0
    t_begin = None
    for i, req in enumerate(requests):
        if i == cfg.warmup_requests:
            r.c = _Counters(r.L)
            r.clock.bytes_by_tier.clear()
            r.clock.busy_s_by_tier.clear()
            t_begin = r.now_s
        measured = i >= cfg.warmup_requests
        t0 = r.now_s
        r.eam_current[:] = 0
        steps: dict = defaultdict(list)
        for v in req.visits:
            steps[v.step].append(v)
        out_s = []
        for step in sorted(steps):
            r.phase, r.step = ("prefill", 0) if step == 0 else ("decode", step)
            if step > 0:
                for tier, off, on in faults:
                    if decode_step == off:
                        r.offline.add(tier)
                        r._event("offline", tier=tier)
                    if on is not None and decode_step == on:
                        r.offline.discard(tier)
                        r._event("online", tier=tier)
                decode_step += 1
            for v in steps[step]:
                dt = cfg.compute_s if cfg.compute_s is not None else _visit_compute_s(shape, hw, v)
                r.layer_s = dt  # the engine measures its layer time; the replay knows it beforehand
                r.visit(v)
                r.now_s += dt
                r.c.busy_s += dt
            dt = cfg.head_s if cfg.head_s is not None else head_s(shape, hw.gpu, req.batch)
            r.now_s += dt
            r.c.busy_s += dt
            out_s.append(r.now_s - t0)
        if measured:
            ttfts.append(out_s[0])
            diffs = np.diff(out_s)
            tpots.extend(diffs.tolist())
            step_times.extend(diffs.tolist())
            tokens += req.batch * len(out_s)
    wall_s = r.now_s - (t_begin if t_begin is not None else 0.0)
    metrics = _metrics(r, ttfts, tpots, tokens, wall_s, requests, cfg)
    metrics["striping"] = {
        "stripe_sets": len(r.stripes),
        "sets_skipped": stripe_skipped,
        "striped_fetches": r.c.striped_fetches,
        "not_striped": dict(r.c.not_striped),
    }
    if energy is not None and tokens:
        metrics["energy"] = run_energy(metrics, hw, energy, tokens)
    return SimResult(metrics, step_times, r.events)


def _visit_compute_s(shape: ModelShape, hw: Hardware, v: Visit) -> float:
    return visit_s(shape, hw.gpu, v.n_tokens, len(v.experts), v.context, v.batch, v.phase == "prefill")


def _metrics(r: _Replay, ttfts, tpots, tokens, wall_s, requests, cfg: SimConfig) -> dict:
    c = r.c
    hits, misses = sum(c.hits) + sum(c.inflight_hits), sum(c.misses)
    homes: dict = defaultdict(int)
    for t in r.placement.values():
        homes[t] += 1
    n = r.L * r.E
    return {
        "policy": r.policy.name,
        "exact": r.policy.exact,
        "hit_rate": hits / max(1, hits + misses),
        "hit_rate_by_layer": [
            (h + i) / max(1, h + i + mi) for h, i, mi in zip(c.hits, c.inflight_hits, c.misses)
        ],
        "hits": sum(c.hits),
        "inflight_hits": sum(c.inflight_hits),
        "misses": misses,
        "misses_by_layer": list(c.misses),
        "ttft_s": float(np.mean(ttfts)) if ttfts else float("nan"),
        "tpot_s": float(np.mean(tpots)) if tpots else float("nan"),
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "tokens": tokens,
        "wall_s": wall_s,
        "gpu_busy_s": c.busy_s,
        "stall_s": c.stall_s,
        "bytes_by_tier": dict(c.bytes_by_tier),
        "busy_s_by_tier": dict(r.clock.busy_s_by_tier),
        "utilisation_by_tier": {t: s / wall_s for t, s in r.clock.busy_s_by_tier.items()} if wall_s else {},
        "prefetch_issued": c.prefetch_issued,
        "prefetch_used": c.prefetch_used,
        "prefetch_precision": c.prefetch_used / c.prefetch_issued if c.prefetch_issued else None,
        "late_prefetches": c.late_prefetch,
        "wasted_prefetch_bytes": c.wasted_prefetch_bytes,
        "gated_prefetches": c.gated,
        "evictions": c.evictions,
        "rehomed_fetches": c.rehomed,
        "miss_choices": dict(c.miss_choices),
        "host_computed_tokens": c.host_tokens,
        "inflight_host_computed": c.inflight_host,
        "copied_for_later": c.copied_for_later,
        "host_compute_s": c.host_s,
        "host_read_bytes_by_tier": dict(c.host_read_bytes_by_tier),
        "max_inflight": c.max_queue,
        "device_budget_bytes": r.budget_bytes,
        "device_slots": r.n_slots,
        "placement": {
            "hbm_cache_fraction": r.n_slots / n,
            "home_fraction_by_tier": {t: k / n for t, k in sorted(homes.items())},
        },
        "requests": len(requests) - cfg.warmup_requests,
        "batch_size": requests[0].batch,
        "prompt_len": requests[0].prompt_len,
        "timing": "simulated",
        "hardware": r.hw.name,
        "target_model": r.shape.name,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "policy"},
    }
