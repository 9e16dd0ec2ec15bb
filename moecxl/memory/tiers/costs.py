"""Copy costs, pure functions of a `Hardware`: time and rate of one copy to the GPU, sharing among copies.

A copy from a tier to the GPU pays latency + a fixed per-copy overhead + bytes at the slowest rate on its
path (device read rate, any intermediate hop, the GPU link). A GPU reads CXL memory through the host root
complex, so CXL bandwidth beyond the GPU link is invisible to one GPU. Units: GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

from collections.abc import Sequence

from moecxl.memory.tiers.hardware import Hardware
from moecxl.memory.tiers.schema import Link, Tier


def _tier(tier: Tier | str, hw: Hardware) -> Tier:
    return hw.tier(tier) if isinstance(tier, str) else tier


def _link_gbps(link: Link, pinned: bool) -> float:
    if pinned:
        return link.gbps
    if link.pageable_gbps is None:
        raise ValueError(f"link {link.name!r} has no pageable_gbps; pageable copies over it are unknown")
    return link.pageable_gbps


def path_gbps(tier: Tier | str, hw: Hardware, pinned: bool = True) -> float:
    """Sustained GB/s of one copy from `tier` to one GPU: min(device read, every hop, GPU link)."""
    t = _tier(tier, hw)
    if t.link is None:
        return t.read_gbps
    hops = (*t.via, t.link)
    return min(t.read_gbps, *(_link_gbps(hw.link(h), pinned) for h in hops))


def copy_time_s(tier: Tier | str, nbytes: int, hw: Hardware, pinned: bool = True) -> float:
    """Seconds to copy `nbytes` from `tier` to the GPU: latency + per-copy overhead + bytes / path rate.

    HBM is where compute happens: 0 s. Against published pinned H2D points on PCIe (4 KiB 5 us, 64 KiB
    8 us, 1 MiB 36-41 us) this is close for tiny and large copies and optimistic (~35%) near 1 MiB.
    """
    t = _tier(tier, hw)
    if t.kind == "hbm":
        return 0.0
    if nbytes < 0:
        raise ValueError(f"copy_time_s: nbytes must be >= 0, got {nbytes}")
    return t.latency_ns * 1e-9 + t.copy_overhead_us * 1e-6 + nbytes / (path_gbps(t, hw, pinned) * 1e9)


def copy_gbps(tier: Tier | str, nbytes: int, hw: Hardware, pinned: bool = True) -> float:
    """Achieved GB/s of one copy of `nbytes`: small copies pay the fixed costs; levels off at ~8-16 MiB."""
    t = _tier(tier, hw)
    if t.kind == "hbm":
        return t.read_gbps
    return nbytes / copy_time_s(t, nbytes, hw, pinned) / 1e9


def copy_gbps_by_size(
    tier: Tier | str,
    hw: Hardware,
    sizes_bytes: Sequence[int] = tuple(4096 << i for i in range(15)),
    pinned=True,
) -> dict[int, float]:
    """{copy bytes: achieved GB/s} over a size sweep (default 4 KiB .. 64 MiB), for plots and checks."""
    return {int(n): copy_gbps(tier, int(n), hw, pinned) for n in sizes_bytes}


def shared_bandwidth(
    hw: Hardware, flows: Sequence[str | tuple[str, int]], pinned: bool = True
) -> tuple[float, ...]:
    """GB/s each concurrent copy gets (max-min fair) when `flows` run together.

    A flow is a tier name, or (tier name, GPU index) with several GPUs. Shared resources: each tier's
    device read rate, each hop in `via` (host side, one for all GPUs), and each GPU's own link. So two
    GPUs reading one CXL card split the card; two tiers feeding one GPU split its link.
    """
    users: list[list[tuple]] = []
    cap: dict[tuple, float] = {}
    for flow in flows:
        name, g = (flow, 0) if isinstance(flow, str) else flow
        if not 0 <= g < hw.gpu.count:
            raise ValueError(f"flow {flow!r}: GPU index {g} out of range (hardware has {hw.gpu.count})")
        t = hw.tier(name)
        res = [("tier", t.name)]
        cap[("tier", t.name)] = t.read_gbps
        for h in t.via:
            res.append(("via", h))
            cap[("via", h)] = _link_gbps(hw.link(h), pinned)
        if t.link is not None:
            res.append(("link", t.link, g))
            cap[("link", t.link, g)] = _link_gbps(hw.link(t.link), pinned)
        users.append(res)
    rate = [0.0] * len(users)
    active = set(range(len(users)))
    left = dict(cap)
    while active:
        load = {r: sum(1 for i in active if r in users[i]) for r in left}
        inc = min(left[r] / n for r, n in load.items() if n)
        for i in active:
            rate[i] += inc
        for r, n in load.items():
            left[r] -= inc * n
        full = {r for r, n in load.items() if n and left[r] <= 1e-9 * cap[r]}
        active = {i for i in active if not full.intersection(users[i])}
    return tuple(rate)
