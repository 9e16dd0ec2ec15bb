"""One metrics schema for the engine and the simulator: the core's counters and the keys they report."""

from __future__ import annotations

from collections import defaultdict
from typing import TypedDict

import jax
import numpy as np

MAX_SAMPLES = 100_000  # control-plane samples kept per run (medians), enough for any benchmark


class Counters:
    """What the decision core counts while it decides (per layer where a report breaks it down)."""

    def __init__(self, L: int):
        self.hits, self.inflight_hits, self.misses = [0] * L, [0] * L, [0] * L
        self.stall_by_layer = [0.0] * L
        self.stall_s = self.control_s = 0.0
        self.bytes_by_tier: dict = defaultdict(int)
        self.prefetch_issued = self.prefetch_used = self.late_prefetch = self.gated = 0
        self.wasted_prefetch_bytes = self.evictions = self.max_queue = 0
        self.control_samples_us: list[float] = []
        self.control_after_samples_us: list[float] = []  # prefetch decisions after the step's dispatch
        self.migrations = self.rehomed = self.refetches = 0
        self.migration_bytes: dict = defaultdict(int)
        self.fault_events: list[dict] = []
        self.miss_choices = {"fetch": 0, "host": 0, "lowp": 0, "inflight": 0}
        self.host_tokens = 0
        self.host_s = 0.0  # host compute booked (its reads' queueing included)
        self.host_read_bytes_by_tier: dict = defaultdict(int)
        self.striped_fetches = 0
        self.inflight_host = 0  # needed experts in flight computed on the host instead of waited for
        self.copied_for_later = 0  # host-computed misses also copied in the background for later tokens
        self.not_striped: dict = defaultdict(int)  # why a fetch read one whole copy (striping.REASONS)
        self.transfers = self.transfer_experts = self.max_transfer_experts = 0  # copies as sent

    def count_transfer(self, n_experts: int) -> None:
        """One transfer sent, moving `n_experts` experts (a batch; 1 for a copy on its own)."""
        self.transfers += 1
        self.transfer_experts += n_experts
        self.max_transfer_experts = max(self.max_transfer_experts, n_experts)

    @property
    def lookups(self) -> tuple[int, int]:
        """(hits, misses) so far, in-flight hits counted as hits."""
        return sum(self.hits) + sum(self.inflight_hits), sum(self.misses)


class StripingMetrics(TypedDict):
    stripe_sets: int
    striped_fetches: int
    not_striped: dict  # reason -> fetches that read one whole copy (striping.REASONS)
    sets_skipped: dict


class CoreMetrics(TypedDict):
    """The keys engine and simulator both report (the simulator adds latency and energy, the engine
    measured overheads and control-plane time; `tests/test_lockstep.py` compares these)."""

    policy: str
    exact: bool
    predictor: str | None
    hit_rate: float
    hit_rate_by_layer: list
    hits: int
    inflight_hits: int
    misses: int
    misses_by_layer: list
    stall_s: float
    stall_s_by_layer: list
    bytes_by_tier: dict
    prefetch_issued: int
    prefetch_used: int
    prefetch_precision: float | None
    late_prefetches: int
    wasted_prefetch_bytes: int
    gated_prefetches: int
    evictions: int
    migrations: int
    migration_bytes: dict
    rehomed: int
    rehomed_fetches: int
    refetches: int
    miss_choices: dict
    host_computed_tokens: int
    host_compute_s: float
    host_read_bytes_by_tier: dict
    inflight_host_computed: int
    copied_for_later: int
    striping: StripingMetrics
    batch_copies: bool  # copies issued together from one tier go as one transfer
    transfers: int  # transfers sent (a batch counts once, a striped read once)
    experts_per_transfer: float | None
    max_experts_per_transfer: int
    faults: list
    max_inflight: int
    device_budget_bytes: int
    device_slots: int
    distribution: dict
    hardware: str


def core_metrics(core) -> CoreMetrics:
    """The keys engine and simulator report alike, from the decision core's counters and state."""
    c = core.c
    hits, misses = c.lookups
    return CoreMetrics(
        policy=core.policy.name,
        exact=core.policy.exact,
        predictor=core.predictor_name,
        hit_rate=hits / max(1, hits + misses),
        hit_rate_by_layer=[
            (h + i) / max(1, h + i + mi) for h, i, mi in zip(c.hits, c.inflight_hits, c.misses)
        ],
        hits=sum(c.hits),
        inflight_hits=sum(c.inflight_hits),
        misses=misses,
        misses_by_layer=list(c.misses),
        stall_s=c.stall_s,
        stall_s_by_layer=list(c.stall_by_layer),
        bytes_by_tier=dict(c.bytes_by_tier),
        prefetch_issued=c.prefetch_issued,
        prefetch_used=c.prefetch_used,
        prefetch_precision=c.prefetch_used / c.prefetch_issued if c.prefetch_issued else None,
        late_prefetches=c.late_prefetch,
        wasted_prefetch_bytes=c.wasted_prefetch_bytes,
        gated_prefetches=c.gated,
        evictions=c.evictions,
        migrations=c.migrations,
        migration_bytes=dict(c.migration_bytes),
        rehomed=c.rehomed,
        rehomed_fetches=c.rehomed,
        refetches=c.refetches,
        miss_choices=dict(c.miss_choices),
        host_computed_tokens=c.host_tokens,
        host_compute_s=c.host_s,
        host_read_bytes_by_tier=dict(c.host_read_bytes_by_tier),
        inflight_host_computed=c.inflight_host,
        copied_for_later=c.copied_for_later,
        striping=StripingMetrics(
            stripe_sets=len(core.store.stripes),
            striped_fetches=c.striped_fetches,
            not_striped=dict(c.not_striped),
            sets_skipped=dict(core.stripe_report["skipped"]),
        ),
        batch_copies=core.batch_copies,
        transfers=c.transfers,
        experts_per_transfer=c.transfer_experts / c.transfers if c.transfers else None,
        max_experts_per_transfer=c.max_transfer_experts,
        faults=list(c.fault_events),
        max_inflight=c.max_queue,
        device_budget_bytes=core.budget_bytes,
        device_slots=core.n_slots,
        distribution=core.distribution(),
        hardware=core.hardware.name,
    )


def where(core) -> dict:
    """Where every expert is: its home tier, and whether it is on the device or in flight."""
    return {
        "device": [
            {"layer": k[0], "expert": k[1], "slot": core.slot_of[k], "low_precision": k in core.lowp}
            for k in sorted(core.slot_of)
        ],
        "in_flight": [
            {"layer": k[0], "expert": k[1], "tier": tr.tier} for k, (tr, _, _) in core.inflight.items()
        ],
        "home": {f"{k[0]}:{k[1]}": t for k, t in sorted(core.store.home_of.items())},
        "copies": {t: len(core.store.experts_on(t)) for t in core.hardware.tier_names},
        "stripes": {f"{k[0]}:{k[1]}": list(s.tiers) for k, s in sorted(core.store.stripes.items())},
        "tiers": {t: len(core.store.homed_on(t)) for t in core.hardware.tier_names},
        "distribution": core.distribution(),
        "offline": sorted(core.offline),
        "numa": core.store.node_report,
    }


def engine_metrics(eng) -> dict:
    """`core_metrics` plus what only a run on this machine has: measured overheads, control-plane time."""
    c = eng.core.c
    out = core_metrics(eng.core)
    out.update(
        {
            "install_wait_s": eng._install_wait_s,
            "local_overhead_us": {  # measured here per expert (EMAs), added to the miss decision's times
                "fetch_issue": eng.fetch_overhead_s * 1e6,
                "install": eng.install_overhead_s * 1e6,
                "host_beyond_emulated": eng.host_overhead_s * 1e6,
            },
            "utilisation_by_tier": eng.utilisation(),
            "control_us_per_layer": c.control_s / max(1, eng.core.tick) * 1e6,
            "control_us_median_decode": float(np.median(c.control_samples_us))
            if c.control_samples_us
            else None,
            "control_after_us_median_decode": float(np.median(c.control_after_samples_us))
            if c.control_after_samples_us
            else None,
            "timing": "virtual"
            if eng.virtual
            else "emulated"
            if eng.emulate
            else ("measured-gpu" if jax.default_backend() == "gpu" else "measured-cpu"),
            "time_scale": eng.time_scale,
            "target_model": getattr(eng.target_model, "name", "") or "self",
            # the host kernel whose own time floors the host's (None: the profile's figures alone)
            "host_kernel": getattr(getattr(eng.hardware.host, "kernel", None), "source", None),
        }
    )
    return out
