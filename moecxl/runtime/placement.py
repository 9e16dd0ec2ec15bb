"""Expert placement across the host tiers (the seed paper's Algorithm 1), as pure functions.

Hot experts belong on the device (the engine's cache starts from them), warm ones on CXL devices
chosen by profile and load (`select_cxl_device`), cold ones in DRAM, then NVMe. Capacities are
respected at every step; a profile that cannot hold the model is an error naming the shortfall.

That order serves a GPU that fetches every miss. A policy that may compute a miss where the expert
lives (`reader="cpu"`, near-data placement) wants the tier the host CPU streams fastest: DRAM at the
host's memory rate (~200 GB/s) against a CXL card's own (18-52 GB/s), while the GPU's copy rate is
capped by its link either way (CXL-D 52 GB/s, DRAM 53.5 GB/s over PCIe 5).
"""

from __future__ import annotations

import numpy as np

from moecxl.memory.tiers import Hardware, Tier, path_gbps

HOME_KIND_ORDER = ("cxl", "dram", "nvme")
READERS = ("gpu", "cpu")  # who reads a missed expert: the GPU's copy engine, or the host computing it there


class PlacementError(ValueError):
    """The tiers cannot hold the experts; the message gives the shortfall in bytes."""


def select_cxl_device(
    devices: list[Tier],
    used_bytes: dict[str, int],
    hw: Hardware,
    expert_bytes: int,
    load: dict[str, float],
    cost_bytes: int | None = None,
) -> Tier | None:
    """The CXL device with the earliest expected completion for one more expert: its path rate,
    latency and the load (expected bytes/s already placed there) decide; full devices are skipped."""
    best, best_t = None, float("inf")
    for d in devices:
        if used_bytes.get(d.name, 0) + expert_bytes > d.capacity_bytes:
            continue
        gbps = path_gbps(d, hw) * 1e9
        moved = expert_bytes if cost_bytes is None else cost_bytes
        t = d.latency_ns * 1e-9 + (load.get(d.name, 0.0) + 1.0) * moved / gbps
        if t < best_t:
            best, best_t = d, t
    return best


def cpu_read_gbps(tier: Tier | str, hw: Hardware) -> float:
    """GB/s at which the host CPU streams an expert from `tier`: the device's read rate, capped by the
    host's memory rate (the rate `gate.host_compute_s` charges); a profile without a host reads at the
    device's rate."""
    t = hw.tier(tier) if isinstance(tier, str) else tier
    return min(t.read_gbps, hw.host.mem_gbps) if hw.host is not None else t.read_gbps


def _check_reader(reader: str):
    if reader not in READERS:
        raise PlacementError(f"unknown placement reader {reader!r}; known: {READERS}")


def initial_placement(
    hw: Hardware,
    L: int,
    E: int,
    expert_bytes: int,
    freq_LE=None,
    cost_bytes: int | None = None,
    reader: str = "gpu",
) -> dict:
    """Home tier of every (moe_layer, expert): hottest first into CXL (by device choice), DRAM, NVMe.

    `freq_LE`: activation frequencies (e.g. an EMA over past requests); uniform when unknown.
    `expert_bytes` is what a copy occupies; `cost_bytes` what a fetch moves when choosing a device
    (the emulated target's expert, default the same). `reader="cpu"` (near-data placement): hottest
    first into the memory tier the host reads fastest (`cpu_read_gbps`; DRAM before CXL before NVMe at
    equal rate) that has room. The host computes a visit's experts one after another, so each expert's
    own read rate counts, not the devices' sum: the fastest tier fills first, with no load spreading.
    """
    _check_reader(reader)
    cost_bytes = expert_bytes if cost_bytes is None else cost_bytes
    freq = np.ones((L, E)) if freq_LE is None else np.asarray(freq_LE, float)
    if freq.shape != (L, E):
        raise PlacementError(f"frequencies have shape {freq.shape}, expected (L, E) = ({L}, {E})")
    order = np.argsort(-freq.reshape(-1), kind="stable")
    homes = [t for kind in HOME_KIND_ORDER for t in hw.tiers_of_kind(kind)]
    capacity = sum(t.capacity_bytes for t in homes)
    need = L * E * expert_bytes
    if need > capacity:
        raise PlacementError(
            f"hardware {hw.name!r}: host tiers hold {capacity} bytes but the {L * E} experts need {need}; "
            f"shortfall {need - capacity} bytes"
        )
    used: dict[str, int] = {}
    if reader == "cpu":
        kind_rank = {"dram": 0, "cxl": 1, "nvme": 2}
        by_rate = sorted(homes, key=lambda t: (-cpu_read_gbps(t, hw), kind_rank.get(t.kind, 3), t.name))
        placement = {}
        for flat in order:
            m, e = divmod(int(flat), E)
            tier = next((t for t in by_rate if used.get(t.name, 0) + expert_bytes <= t.capacity_bytes), None)
            if tier is None:
                raise PlacementError(f"hardware {hw.name!r}: no tier has room for expert ({m}, {e})")
            placement[(m, e)] = tier.name
            used[tier.name] = used.get(tier.name, 0) + expert_bytes
        return placement
    load: dict[str, float] = {}
    cxl = list(hw.tiers_of_kind("cxl"))
    rest = [t for kind in ("dram", "nvme") for t in hw.tiers_of_kind(kind)]
    placement = {}
    total_f = float(freq.sum()) or 1.0
    for flat in order:
        m, e = divmod(int(flat), E)
        tier = select_cxl_device(cxl, used, hw, expert_bytes, load, cost_bytes) if cxl else None
        if tier is None:
            tier = next((t for t in rest if used.get(t.name, 0) + expert_bytes <= t.capacity_bytes), None)
        if tier is None:
            raise PlacementError(f"hardware {hw.name!r}: no tier has room for expert ({m}, {e})")
        placement[(m, e)] = tier.name
        used[tier.name] = used.get(tier.name, 0) + expert_bytes
        load[tier.name] = load.get(tier.name, 0.0) + freq[m, e] / total_f * L * E
    return placement


def use_s(tier: Tier | str, hw: Hardware, nbytes: int, reader: str = "gpu") -> float:
    """Seconds one use of an expert homed on `tier` costs its reader when it is not cached: the GPU's
    copy at the tier's path rate plus its latency, or the host streaming it (`cpu_read_gbps`)."""
    _check_reader(reader)
    t = hw.tier(tier) if isinstance(tier, str) else tier
    gbps = cpu_read_gbps(t, hw) if reader == "cpu" else path_gbps(t, hw)
    return nbytes / (gbps * 1e9) + t.latency_ns * 1e-9


def migration_s(src: Tier | str, dst: Tier | str, hw: Hardware, nbytes: int) -> float:
    """Device seconds a migration costs: the bytes read from `src` and written to `dst`, time that
    fetches from either device queue behind (`LinkClock.reserve_device` books the same)."""
    s = hw.tier(src) if isinstance(src, str) else src
    d = hw.tier(dst) if isinstance(dst, str) else dst
    return nbytes / (min(s.read_gbps, s.write_gbps) * 1e9) + nbytes / (min(d.read_gbps, d.write_gbps) * 1e9)


def migration_pays(
    uses_per_step: float, miss_rate: float, saved_per_use_s: float, horizon_steps: float, cost_s: float
) -> bool:
    """Move an expert's home only when the time it saves its misses over `horizon_steps` (uses per step
    x miss rate x the saving per uncached use) beats the device time the move costs: re-placement by
    rank alone moved experts whose few later misses never paid for the copy (emulated on four CXL
    devices it made decoding 1.8x slower than no rebalancing)."""
    gain = max(0.0, uses_per_step) * min(max(miss_rate, 0.0), 1.0) * saved_per_use_s * max(0.0, horizon_steps)
    return gain > cost_s


def tier_rank(hw: Hardware, reader: str = "gpu") -> dict[str, float]:
    """How good a home each tier is for a hot expert; larger is better. For the GPU: its path rate,
    with CXL ahead of DRAM ahead of NVMe at equal rate (the paper's order). For the CPU (near-data):
    the rate the host streams it (`cpu_read_gbps`), DRAM ahead at equal rate."""
    _check_reader(reader)
    if reader == "cpu":
        bonus = {"dram": 1.02, "cxl": 1.0, "nvme": 0.5, "hbm": 2.0}
        return {t.name: cpu_read_gbps(t, hw) * bonus.get(t.kind, 1.0) for t in hw.tiers}
    bonus = {"cxl": 1.02, "dram": 1.0, "nvme": 0.5, "hbm": 2.0}
    return {t.name: path_gbps(t, hw) * bonus.get(t.kind, 1.0) for t in hw.tiers}
