"""The cost-benefit transfer gate: is a prefetch worth its bytes? (pure; engine and simulator share it)."""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.memory.kerneltable import kernel_dtype, kernel_expert_s


@dataclass(frozen=True)
class GateInputs:
    """Seconds and probabilities for one candidate prefetch (expert, layers ahead)."""

    p_use: float  # probability the expert is needed when its layer runs
    lead_s: float  # time until its layer runs
    wait_s: float  # when this prefetch would complete if issued now (queue included)
    miss_s: float  # stall if it is instead fetched on demand at need time
    link_busy_s: float  # how long this copy occupies its link
    demand_pressure: float  # chance a demand fetch queues behind it (recent miss rate on the link)
    victim_p: float = 0.0  # probability the expert it evicts is needed soon
    victim_miss_s: float = 0.0  # stall if that victim is then missed


def expected_saving_s(g: GateInputs) -> float:
    """p × the stall this prefetch removes: all of it if it lands in time, less the lateness if not."""
    late_s = max(0.0, g.wait_s - g.lead_s)
    return g.p_use * max(0.0, g.miss_s - late_s)


def expected_cost_s(g: GateInputs) -> float:
    """Link occupancy that demand fetches may queue behind, plus the expected stall of the victim."""
    return g.demand_pressure * g.link_busy_s + g.victim_p * g.victim_miss_s


def should_prefetch(g: GateInputs) -> bool:
    return expected_saving_s(g) > expected_cost_s(g)


# ---- the three-way miss decision (issue: beyond fetching) -------------------------------------------

MISS_OPTIONS = ("inflight", "fetch", "host", "lowp")


@dataclass(frozen=True)
class MissCosts:
    """Expected seconds until a needed expert's output is available, for each way to serve a miss.

    None means the option is not available (no copy in flight, host compute off, quality budget 0).
    """

    fetch_s: float
    inflight_s: float | None = None
    host_s: float | None = None
    lowp_s: float | None = None
    reuse_credit_s: float = 0.0  # what caching saves later: P(used again) x the cheapest way to serve it then


DEFAULT_DECAY = 0.8  # per-round fall of the reuse chance towards popularity when no `Reuse` estimate says
# (1 - the recency memory's EMA rate, `policies.reuse.REUSE_ALPHAS`[1] = 0.2)


def expected_reuses(
    p_reuse: float,
    rounds: float = 1.0,
    rounds_until: float = 1.0,
    p_far: float | None = None,
    decay: float = DEFAULT_DECAY,
) -> float:
    """Uses a copy is expected to serve while cached for `rounds` layer rounds: the sum over those rounds
    of the chance its layer routes to it. A cached copy serves every use during its stay, not only an
    unbroken run of them (the run, p + p^2 + ... + p^R, under-promised Switch's copies ~9x).

    `p_reuse` is the chance at the next visit (recency included); with `p_far` (the long-run
    popularity), the chance falls from `p_reuse` towards `p_far` by `decay` per round, as the short
    memory that gave `p_reuse` would if the expert went unused: a top-1-of-128 expert just used is
    likely soon, not for ever. Without `p_far` the chance stays at `p_reuse`.

    `rounds_until`: layer rounds until its layer is next visited (`Reuse.layers_until` / L; at most 1
    for a layer of the current pass). Rounds spent waiting beyond the first are rounds of the copy's
    life it cannot be used in: a layer the pass skips (a Switch encoder's, during decode) is promised
    nothing, so its copies neither earn a credit nor skew the calibration."""
    p = min(max(p_reuse, 0.0), 1.0)
    R = max(1.0, rounds) - max(0.0, rounds_until - 1.0)
    if R <= 0.0:
        return 0.0
    if p_far is None:
        return p * R
    far = min(max(p_far, 0.0), 1.0)
    d = min(max(decay, 0.0), 0.999)
    return max(0.0, far * R + (p - far) * (1.0 - d**R) / (1.0 - d))


def reuse_credit_s(
    p_reuse: float,
    host_s: float | None,
    copy_s: float,
    rounds: float = 1.0,
    calibration: float = 1.0,
    rounds_until: float = 1.0,
    p_far: float | None = None,
    decay: float = DEFAULT_DECAY,
) -> float:
    """A copy stays cached; host compute leaves nothing behind. Each expected reuse (`expected_reuses`,
    times the `calibration` the run has measured) saves serving a miss the cheapest way."""
    reuses = expected_reuses(p_reuse, rounds, rounds_until, p_far, decay)
    return credit_of_reuses(reuses, calibration, host_s, copy_s)


def credit_of_reuses(reuses: float, calibration: float, host_s: float | None, copy_s: float) -> float:
    """Seconds `reuses` expected reuses save (times the run's `calibration`), each serving a miss the
    cheapest way (`reuse_credit_s` once the reuses are known; the engine keeps them per victim)."""
    return reuses * calibration * (copy_s if host_s is None else min(host_s, copy_s))


class ReuseCalibration:
    """What copies really did in the cache, measured on evicted copies, to correct the reuse credit.

    Two corrections. `rounds`: how many layer rounds a copy stays cached, averaged over evicted copies
    (the slot-count estimate `Reuse.rounds_cached` misses the turnover a new request's prefill causes and
    how long the eviction rule keeps a copy; on Switch it promised ~48 rounds where copies stayed a few).
    `factor`: reuses that copies fetched on a miss really served, against what `expected_reuses` promised
    when they were fetched; their ratio scales the credit. The engine and the simulator record each
    evicted copy, so the credit corrects itself within a run. One pseudo-copy that met its promise is the
    prior; the ratio is kept within [1/8, 8]."""

    RESIDENCE_ALPHA = 0.05  # EMA rate of the residence (~20 evictions)

    def __init__(self):
        self.promised, self.served = 1.0, 1.0
        self.pending: dict = {}  # key -> reuses promised when it was fetched
        self.residence_rounds: float | None = None  # EMA of layer rounds evicted copies stayed cached

    def fetched(self, key, promised: float) -> None:
        self.pending[key] = promised

    def evicted(self, key, reuses: int, rounds_resident: float | None = None) -> None:
        """A copy left the cache after serving `reuses` reuses and staying `rounds_resident` rounds."""
        if rounds_resident is not None:
            r = self.residence_rounds
            a = self.RESIDENCE_ALPHA
            self.residence_rounds = rounds_resident if r is None else (1 - a) * r + a * rounds_resident
        promised = self.pending.pop(key, None)
        if promised is not None:
            self.promised += promised
            self.served += max(0, reuses)

    def rounds(self, estimate: float, decode_steps: int | None = None) -> float:
        """Rounds a new copy is expected to stay useful: the measured residence once copies have been
        evicted, else `estimate`; never below one round. With `decode_steps` (decode steps of the request
        so far), at most that many: a cache with room evicts nothing, yet a copy cannot serve rounds the
        request does not have, and a request is expected to last about as long again as it has
        (Gott's estimate; nothing else about its length is known)."""
        r = self.residence_rounds if self.residence_rounds is not None else estimate
        if decode_steps is not None:
            r = min(r, float(decode_steps))
        return max(1.0, r)

    @property
    def factor(self) -> float:
        return min(8.0, max(0.125, self.served / max(self.promised, 1e-9)))


def miss_decision(c: MissCosts) -> str:
    """The option with the least expected time, copies credited with the later miss they save; ties go
    to the exact ones (in flight, then fetch, then host, then lowp)."""
    credit = c.reuse_credit_s
    fetch = c.fetch_s - credit
    lowp = None if c.lowp_s is None else c.lowp_s - credit
    options = {"inflight": c.inflight_s, "fetch": fetch, "host": c.host_s, "lowp": lowp}
    best, best_s = "fetch", float("inf")
    for name in MISS_OPTIONS:
        s = options[name]
        if s is not None and s < best_s:
            best, best_s = name, s
    return best


def host_compute_s(
    n_tokens: int,
    expert_params: int,
    expert_bytes: int,
    tier_read_gbps: float,
    host_gflops: float,
    host_mem_gbps: float,
    d_model: int,
    link_gbps: float,
    act_bytes: int = 2,
    copy_overhead_s: float = 5e-6,
    kernel_s: float = 0.0,
) -> float:
    """Seconds to compute one expert for `n_tokens` tokens on the host where the expert lives.

    The CPU streams the expert from its tier (capped by the tier and by the host's memory rate) while
    doing 2·params FLOPs per token, and takes no less than `kernel_s` (the host kernel's own measured
    time for this expert, when known); the activations cross the GPU link both ways (two small copies).
    Grows with tokens (compute) where fetching does not: batch-awareness comes from here.
    """
    read_s = expert_bytes / (min(tier_read_gbps, host_mem_gbps) * 1e9)
    flops_s = 2.0 * expert_params * n_tokens / (host_gflops * 1e9)
    act_s = 2 * (n_tokens * d_model * act_bytes / (link_gbps * 1e9) + copy_overhead_s)
    return max(read_s, flops_s, kernel_s) + act_s


def host_compute_on_tier_s(
    hw, tier_name: str, n_tokens: int, expert_params: int, expert_bytes: int, d_model: int
) -> float:
    """`host_compute_s` for an expert living on `tier_name` of hardware `hw` (its read rate, the host's
    compute and memory figures, the GPU link the activations cross). Where the host carries its kernel's
    measured rates (`Host.kernel`), the kernel's own time for an expert of `expert_bytes` at this token
    count and the expert's dtype is a floor: a profile faster than the kernel cannot hide it."""
    tier = hw.tier(tier_name)
    link = hw.link(tier.link) if tier.link else None
    table = hw.host.kernel
    kernel_s = 0.0
    if table is not None:
        kernel_s = kernel_expert_s(kernel_dtype(expert_bytes, expert_params), n_tokens, expert_bytes, table)
    return host_compute_s(
        n_tokens,
        expert_params,
        expert_bytes,
        tier.read_gbps,
        hw.host.gflops,
        hw.host.mem_gbps,
        d_model,
        link.gbps if link else tier.read_gbps,
        kernel_s=kernel_s,
    )


def demand_pressure(
    misses: int, hits: int, window_s: float, layer_s: float, uses_per_visit: float = 1.0
) -> float:
    """Chance that a demand fetch is issued while a copy holds the link for `window_s`: each visit
    (one every `layer_s` of compute, stalls only adding demand) looks up `uses_per_visit` experts, each
    a miss with the run's miss rate (smoothed by one of each). One lookup when the copy is shorter
    than a layer; on a link-bound run (a copy spans many layers) close to 1."""
    miss_rate = (misses + 1) / (misses + 1 + hits + 1)
    lookups = max(1.0, uses_per_visit * window_s / max(layer_s, 1e-12))
    return 1.0 - (1.0 - miss_rate) ** lookups


def copy_for_later(credit_s: float, pressure: float, copy_s: float, host_s: float) -> bool:
    """A miss computed on the host now: copy it in the background too, for its later uses? Yes when what
    the cached copy is expected to save (`credit_s`, net of the victim's) beats what it may cost the
    demand fetches queued behind it on the link (`pressure`, `demand_pressure` of the run, times the
    most each loses: the host's time, where it then goes instead). Host compute gives this layer its
    low latency (a prefill stays short), the copy gives the later tokens their hits."""
    return credit_s > pressure * min(copy_s, host_s)


def copy_alone_s(clock, tiers, chunk_bytes) -> float:
    """Seconds a copy takes on idle devices and links: one whole copy (`tiers` of one), or a striped
    read's chunks (`striping.FetchPlan.tiers` with their bytes). The gate's stall and link occupancy:
    the same path its expected completion (`wait_s`) is planned on, without the queues."""
    idle = type(clock)(clock.hardware, clock.time_scale)
    return idle.reserve_stripe(tuple(tiers), tuple(chunk_bytes), 0.0)[0]


def prefetch_gate(
    p_use: float,
    layers_ahead: int,
    layer_s: float,
    wait_s: float,
    copy_s: float,
    misses: int,
    hits: int,
    victim_p: float,
    uses_per_visit: float = 1.0,
    host_s: float | None = None,
    host_served: int = 0,
    reuse_credit_s: float = 0.0,
    can_fetch: bool = False,
) -> bool:
    """The gate as the engine and the simulator both apply it: a candidate `layers_ahead` layers away,
    a copy of `copy_s` (`copy_alone_s` of the planned path) that would land in `wait_s`, `layer_s` of
    compute per layer visit, demand pressure (`demand_pressure`) from the run's misses and hits over
    the layers the copy spans.

    Where a copy spans many layers of compute (a link-bound run: Mixtral experts over PCIe 5 take ~30
    decode layers' time), a prefetch can only gain the compute it overlaps and any demand fetch queues
    behind it, so the gate declines; where copies are short against compute it prefetches.

    With host compute (`host_s`: the host's time for the expert; `host_served`: misses so far served
    on the host, counted in `misses`), a miss costs at most the host's time, and so does a late copy (the
    engine computes a needed expert on the host when that beats waiting for its copy): the saving is
    p × (min(copy, host) − min(lateness, host)), and only the misses still fetched queue behind it.

    With the three-way decision (`can_fetch` too), a miss not prefetched is served by a fetch or on the
    host, whichever `miss_decision` picks: a prefetch that is used saves the fetch's stall, or the host's
    time plus the cached copy's later uses (`reuse_credit_s`, as the miss decision credits a fetch),
    whichever is less; and a demand fetch that would queue behind it is served on the host instead when
    that is sooner, so it costs a demand miss at most the host's time."""
    miss_s = copy_s if host_s is None else min(copy_s, host_s)
    busy_s = copy_s
    if host_s is not None and can_fetch:
        miss_s = min(copy_s, host_s + max(0.0, reuse_credit_s))
        busy_s = min(copy_s, host_s)
    fetched = max(0, misses - host_served)
    g = GateInputs(
        p_use=p_use,
        lead_s=layers_ahead * layer_s,
        wait_s=wait_s,
        miss_s=miss_s,
        link_busy_s=busy_s,
        demand_pressure=demand_pressure(fetched, hits + misses - fetched, copy_s, layer_s, uses_per_visit),
        victim_p=victim_p,
        victim_miss_s=miss_s,
    )
    return should_prefetch(g)
