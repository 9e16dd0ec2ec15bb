"""Discrete-event replay of router traces through the runtime's decision core, with a cost model.

`simulate` walks the visits of each request in engine order and hands each to the same
`runtime.core.DecisionCore` the engine runs; its actions (copies, host reads, waits) are booked on the
engine's `LinkClock` instead of carried out. Time is simulated: compute per visit from the roofline
cost model (or a fixed time, to validate against an emulated run), copies from the clock.
tests/test_lockstep.py checks that the engine on a virtual clock and the simulator take the same
actions for every policy.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from moecxl.memory.tiers import Hardware
from moecxl.memory.transfer import LinkClock, OpenBatches
from moecxl.model.family import family_of
from moecxl.runtime import homes
from moecxl.runtime import placement as placement_mod
from moecxl.runtime.core import DecisionCore
from moecxl.runtime.locations import VirtualStore
from moecxl.runtime.mechanism import CoreError
from moecxl.runtime.metrics import Counters, core_metrics
from moecxl.runtime.policies import PolicyProtocol, get_policy
from moecxl.runtime.striping import MAX_WIDTH, MIN_GAIN
from moecxl.sim.control import ControlCosts
from moecxl.sim.costmodel import ModelShape, group_s, head_s, visit_s
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
    engine's default, "near_data" for a policy that computes misses on the host, else "uniform".
    `faults`: (tier, offline_at_decode_step, online_at_decode_step or None), decode steps counted over
    the whole workload from 1 (as the engine counts them); the profile's own faults are added. While a
    tier is offline its experts are re-homed as the engine re-homes them (a replica, else a copy made
    on an online tier with room). `control`: the engine's measured control-plane time per visit, by
    policy, batch and hit/miss (`moecxl.sim.control`; None charges nothing: the idealisation, reported
    as such); `control_s` adds a flat number of seconds per visit on top. `batch_copies`: copies issued
    together from one tier go as one transfer (as the engine's option); `serial_copy_overhead`: a
    sensitivity, not a measured figure: the per-copy overhead holds the device and the link
    (`LinkClock.serial_overhead`), as a copy engine that cannot overlap it with the previous copy.
    """

    policy: PolicyProtocol | str = "lru"
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
    control_s: float = 0.0  # flat control-plane seconds per visit, added to `control`'s
    control: ControlCosts | None = None
    quality_budget: float = 0.0  # fraction of misses a policy with host_compute may serve in int8
    record_events: bool = False
    striping: bool = False  # stripe experts across CXL devices where that lands sooner (runtime.striping)
    stripe_max_width: int = MAX_WIDTH
    stripe_min_gain: float = MIN_GAIN
    replicate_hot: int = 0  # replicate this many experts onto a second CXL device before the run
    batch_copies: bool = False
    serial_copy_overhead: bool = False


@dataclass
class SimResult:
    """Metrics (the engine's names, `timing: simulated`), per-step times and, optionally, events."""

    metrics: dict
    step_times_s: list = field(default_factory=list)
    events: list = field(default_factory=list)


@dataclass
class _Copy:
    """A copy booked on the simulated links (`runtime.mechanism.Copy`)."""

    key: tuple
    tiers: tuple
    low_precision: bool
    expected_done_s: float
    nbytes_by_tier: dict
    mech: _SimMechanism

    def bytes_by_tier(self) -> dict:
        return self.nbytes_by_tier

    def done(self) -> bool:
        return self.expected_done_s <= self.mech.now

    @property
    def tier(self) -> str:
        return "+".join(self.tiers)


class _SimMechanism:
    """The decision core's actions on simulated time: copies and host reads booked on a `LinkClock`,
    the clock moved on by landings, host compute and the caller's compute per visit."""

    books_host_reads = True
    fetch_overhead_s = install_overhead_s = host_overhead_s = 0.0  # nothing measured: all in the model

    def __init__(
        self,
        hw: Hardware,
        time_scale: float,
        expert_bytes: int,
        lowp_bytes: int,
        serial_overhead: bool = False,
    ):
        self.clock = LinkClock(hw, time_scale, serial_overhead=serial_overhead)
        self.expert_bytes, self.lowp_bytes = expert_bytes, lowp_bytes
        self.open = OpenBatches()  # batched copies booked, not yet sent
        self.now = 0.0
        self.blocked = 0.0
        self.visit_layer_s = 0.0  # compute of the visit being replayed: the gate's time per layer

    def now_s(self) -> float:
        return self.now

    def blocked_s(self) -> float:
        return self.blocked

    def _advance(self, t_s: float) -> None:
        if t_s > self.now:
            self.blocked += t_s - self.now
            self.now = t_s

    def layer_s(self, phase: str) -> float:
        return self.visit_layer_s

    def staged(self) -> int:
        return 0

    def before_issue(self, n_inflight: int) -> None:
        pass

    def set_offline(self, tier: str, offline: bool = True) -> None:
        pass

    def submit(self, key, plan, low_precision: bool, stripe, batched: bool = False) -> _Copy:
        nbytes = self.lowp_bytes if low_precision else self.expert_bytes
        tier = plan.tiers[0]
        if stripe is not None:
            chunks = stripe.scaled_bytes(nbytes)
            done, _ = self.clock.reserve_stripe(plan.tiers, chunks, self.now)
        else:
            chunks = (nbytes,)
            joins = batched and self.open.joins(tier)
            _, done = self.clock.reserve(tier, nbytes, self.now, joins=joins)
        cp = _Copy(key, tuple(plan.tiers), low_precision, done, dict(zip(plan.tiers, chunks)), self)
        if batched:
            self.open.add(tier, cp)
        return cp

    def flush_batches(self) -> None:
        self.open.close()  # booked already: nothing moves in a simulation

    def land(self, key, copy: _Copy, slot: int) -> None:
        self._advance(copy.expected_done_s)

    def host_compute(self, layer: int, jobs, until_s: float) -> None:
        self._advance(until_s)

    def reserve_host_read(self, tier: str, at_s: float) -> float:
        return self.clock.reserve_host_read(tier, self.expert_bytes, at_s)

    def hold_device(self, tier: str, now_s: float) -> float:
        return self.clock.reserve_device(tier, self.expert_bytes, now_s)


@dataclass(frozen=True)
class _Fault:
    tier: str
    offline_at_step: int
    online_at_step: int | None


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
    predictor=None,
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
    policy = get_policy(cfg.policy)
    how = cfg.placement or default_placement(policy)
    homes_of = placement or make_placement(hw, shape, how, freq_LE)
    total = shape.L * shape.E * shape.expert_bytes
    b = cfg.device_budget
    if b is None or b <= 0:
        raise SimError(f"device_budget must be a positive fraction or byte count, got {b!r}")
    budget_bytes = int(b * total) if b <= 1 else int(b)
    max_inflight = int(cfg.max_inflight if cfg.max_inflight is not None else max(2, shape.K))
    n_slots = policy.cache_slots(shape.L, shape.E, budget_bytes // shape.expert_bytes - max_inflight)
    if n_slots < shape.K:
        raise SimError(
            f"device_budget {b!r} = {budget_bytes} bytes holds {budget_bytes // shape.expert_bytes} experts of "
            f"{shape.expert_bytes} bytes; top-{shape.K} plus {max_inflight} copies in flight need more"
        )
    if policy.host_compute and not shape.host_kernel:
        raise SimError(
            f"policy {policy.name!r} computes misses on the host, but the host kernel cannot compute "
            f"{shape.name}'s experts (it reads SwiGLU / ReLU experts without biases or clamps; the engine "
            "refuses it too): simulate a policy that copies them (moecxl, lru, pregate)"
        )
    if policy.host_compute and hw.host is None:
        raise SimError(
            f"policy {policy.name!r} computes misses on the host but hardware {hw.name!r} has no "
            "'host:' block (gflops, mem_gbps) in its profile"
        )
    if getattr(policy, "prefetch", None) == "predictor":
        if predictor is None:
            raise SimError(
                f"policy {policy.name!r} prefetches from a learned predictor but none was given: pass "
                "predictor=moecxl.sim.stored.StoredPredictions.load(<traces>/predictions/learned.safetensors, "
                "ts, shape) (`python train_predictor.py predict` writes them)"
            )
        if hasattr(predictor, "check_shape"):
            predictor.check_shape(shape, policy.horizon)
    if cfg.control is not None:
        cfg.control.check(policy.name)
    mech = _SimMechanism(
        hw,
        cfg.time_scale,
        shape.expert_bytes,
        int(shape.expert_bytes * cfg.lowp_bytes_ratio),
        serial_overhead=cfg.serial_copy_overhead,
    )
    knows_future = policy.needs_future
    try:
        core = DecisionCore(
            policy=policy,
            hardware=hw,
            store=VirtualStore(hw, homes_of, shape.expert_bytes),
            mech=mech,
            L=shape.L,
            E=shape.E,
            K=shape.K,
            n_slots=n_slots,
            max_inflight=max_inflight,
            budget_bytes=budget_bytes,
            slot_bytes=shape.expert_bytes,
            clock_bytes=shape.expert_bytes,
            expert_params=shape.expert_params,
            hidden_size=shape.D,
            time_scale=cfg.time_scale,
            future=oracle_future(requests) if knows_future else None,
            predictor=predictor,
            eam_library=eam_library,
            quality_budget=cfg.quality_budget,
            lowp_threshold=cfg.lowp_threshold,
            lowp_bytes_ratio=cfg.lowp_bytes_ratio,
            faults=tuple(_Fault(*f) for f in faults),
            record_events=cfg.record_events,
            reader="cpu" if policy.host_compute else "gpu",
            batch_copies=cfg.batch_copies,
        )
        core.stripe_min_gain = cfg.stripe_min_gain
        if cfg.striping:
            homes.stripe(core, None, cfg.stripe_max_width, freq=freq_LE if how == "frequency" else None)
        if cfg.replicate_hot:
            homes.replicate(core, cfg.replicate_hot)
        return _replay(core, mech, requests, shape, hw, cfg, energy, homes_of)
    except CoreError as e:
        raise SimError(str(e)) from e


def _replay(core, mech, requests, shape, hw, cfg, energy, homes_of) -> SimResult:
    step_times, ttfts, tpots, tokens = [], [], [], 0
    t_begin = None
    busy_s = control_s = decode_control_s = 0.0
    control, policy_name = cfg.control, core.policy.name
    # An encoder-decoder's prefill (its encoder) emits no token: its first token comes from decode step 1
    # (the start token's), as `moecxl.seq2seq.generate` times it.
    first_token_step = 1 if family_of(shape.family).encoder_decoder else 0
    for i, req in enumerate(requests):
        if i == cfg.warmup_requests:
            core.c = Counters(core.L)
            # prefetches issued while warming up are not the measured window's: their use is not counted
            for st in core.stats.values():
                st[3] = False
            core.inflight = {k: (cp, slot, False) for k, (cp, slot, _) in core.inflight.items()}
            mech.clock.bytes_by_tier.clear()
            mech.clock.busy_s_by_tier.clear()
            t_begin = mech.now
            busy_s = control_s = decode_control_s = 0.0
        measured = i >= cfg.warmup_requests
        t0 = mech.now
        steps: dict = defaultdict(list)
        for j, v in enumerate(req.visits):  # with its trace rows: a stored predictor's features
            steps[v.step].append((v, req.rows[j] if req.rows else None))
        out_s = []
        for step in sorted(steps):
            phase = "prefill" if step == 0 else "decode"
            core.begin(phase, step)
            for v, rows in steps[step]:
                groups = core.groups(v)  # more experts than the cache holds: processed in groups
                if cfg.compute_s is not None:
                    dts = [0.0] * (len(groups) - 1) + [cfg.compute_s]  # per visit, as the engine's
                elif len(groups) == 1:
                    dts = [_visit_compute_s(shape, hw, v)]
                else:
                    dts = group_s(shape, hw.gpu, v, groups)
                misses0 = core.c.misses[v.layer]
                for k, (g, dt_g) in enumerate(zip(groups, dts)):
                    mech.visit_layer_s = dt_g  # the engine measures its layer time; the replay knows it
                    last = k == len(groups) - 1
                    core.visit(g, rows, last=last, whole=v)
                    if not last:
                        mech.now += dt_g  # this group's experts computed before the next group's copies
                        busy_s += dt_g
                core.after()
                dt = dts[-1]
                ctl_s = cfg.control_s
                if control is not None:  # the engine's decisions for this visit, as its bench measured them
                    missed = core.c.misses[v.layer] > misses0
                    ctl_s += control.visit_s(policy_name, v.n_tokens, missed, dt)
                mech.now += dt + ctl_s
                busy_s += dt
                control_s += ctl_s
                if phase == "decode":
                    decode_control_s += ctl_s
            dt = cfg.head_s if cfg.head_s is not None else head_s(shape, hw.gpu, req.batch)
            mech.now += dt  # (after an encoder: its final norm and the decoder's cross-attention keys)
            busy_s += dt
            core.end(phase, step)
            if step >= first_token_step:
                out_s.append(mech.now - t0)
        if measured:
            ttfts.append(out_s[0])
            diffs = np.diff(out_s)
            tpots.extend(diffs.tolist())
            step_times.extend(diffs.tolist())
            tokens += req.batch * len(out_s)
    wall_s = mech.now - (t_begin if t_begin is not None else 0.0)
    control_tpot_s = decode_control_s / len(tpots) if tpots else float("nan")
    metrics = _metrics(
        core, mech, ttfts, tpots, tokens, wall_s, requests, cfg, homes_of, busy_s, control_s, shape.name
    )
    metrics["control_tpot_s"] = control_tpot_s  # control-plane seconds in a decode step (TPOT's share)
    metrics["control_share_of_tpot"] = control_tpot_s / metrics["tpot_s"] if tpots else float("nan")
    if energy is not None and tokens:
        metrics["energy"] = run_energy(metrics, hw, energy, tokens)
    return SimResult(metrics, step_times, core.events)


def _visit_compute_s(shape: ModelShape, hw: Hardware, v: Visit) -> float:
    return visit_s(shape, hw.gpu, v.n_tokens, len(v.experts), v.context, v.batch, v.phase == "prefill")


def _metrics(
    core,
    mech,
    ttfts,
    tpots,
    tokens,
    wall_s,
    requests,
    cfg: SimConfig,
    homes_of,
    busy_s,
    control_s,
    shape_name,
):
    homes_n: dict = defaultdict(int)
    for t in homes_of.values():
        homes_n[t] += 1
    n = core.L * core.E
    clock = mech.clock
    out = core_metrics(core)
    out.update(
        {
            "ttft_s": float(np.mean(ttfts)) if ttfts else float("nan"),
            "tpot_s": float(np.mean(tpots)) if tpots else float("nan"),
            "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
            "tokens": tokens,
            "wall_s": wall_s,
            "gpu_busy_s": busy_s,
            "control_s": control_s,  # charged over the measured window (SimConfig.control / control_s)
            "control": cfg.control.describe()
            if cfg.control is not None
            else {"idealised": True, "file": None, "source": {"note": "SimConfig.control is None"}},
            "busy_s_by_tier": dict(clock.busy_s_by_tier),
            "utilisation_by_tier": {t: s / wall_s for t, s in clock.busy_s_by_tier.items()} if wall_s else {},
            "placement": {
                "hbm_cache_fraction": core.n_slots / n,
                "home_fraction_by_tier": {t: k / n for t, k in sorted(homes_n.items())},
            },
            "requests": len(requests) - cfg.warmup_requests,
            "batch_size": requests[0].batch,
            "prompt_len": requests[0].prompt_len,
            "timing": "simulated",
            "target_model": shape_name,
            "config": {
                k: v
                for k, v in dataclasses.asdict(dataclasses.replace(cfg, control=None)).items()
                if k != "policy"
            },
        }
    )
    return out
