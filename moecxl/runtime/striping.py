"""Striping: one expert stored as byte-range chunks on several devices, read by concurrent chunk copies.

A GPU reads CXL memory through the host root complex, so one copy moves at min(device read, GPU link):
a slow expander (CXL-C, 18 GB/s) uses a third of a PCIe-5 link (53.5 GB/s), while chunks read from
several devices at once are limited only by the link. Striping pays where devices are slow relative
to the link and not where one device nearly saturates it (CXL-D at 52 GB/s: at most ~3%). Pure code
shared by the engine and the simulator: `stripe_bounds` (chunk byte ranges by device rate),
`select_stripe_set` / `stripe_placement` (which devices, by rate and load, within capacities) and
`plan_fetch` (per fetch, the single copy that lands first or a striped read, whichever the `LinkClock`
expects sooner, with the reason when it does not stripe).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecxl.memory.tiers import Hardware, Tier, path_gbps
from moecxl.memory.transfer import LinkClock

GRANULE_BYTES = 64  # chunk boundaries: a cache line, a multiple of every dtype's itemsize
PAGE_BYTES = 4096  # each chunk sits in its own page-aligned buffer (store.ALIGN_BYTES)
STRIPE_KINDS = ("cxl", "dram")  # memory tiers a chunk may live on (no NVMe: a chunk is a DMA source)
MIN_GAIN = 0.05  # stripe only when it lands >= 5% sooner: a stripe holds S device queues, not one
MAX_WIDTH = 4
# Why a fetch was not striped (FetchPlan.reason); "sooner" when it was.
REASONS = ("sooner", "no-stripe", "link-bound", "devices-busy", "chunk-offline", "low-precision")


class StripeError(ValueError):
    """A stripe set is malformed (duplicate or unknown device, bad bounds); the message names it."""


@dataclass(frozen=True)
class StripeSet:
    """An expert as chunks on `tiers`: chunk i is bytes [bounds[i], bounds[i+1]) of its packed buffer."""

    tiers: tuple[str, ...]
    bounds: tuple[int, ...]  # S+1 byte offsets, 0 .. nbytes, strictly increasing

    def __post_init__(self):
        if len(self.tiers) < 2:
            raise StripeError(f"a stripe needs at least 2 devices, got {list(self.tiers)}")
        dup = sorted({t for t in self.tiers if self.tiers.count(t) > 1})
        if dup:
            raise StripeError(f"stripe {list(self.tiers)} names device(s) {dup} more than once")
        b = self.bounds
        if len(b) != len(self.tiers) + 1 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
            raise StripeError(
                f"stripe over {list(self.tiers)}: bounds {list(b)} must be {len(self.tiers) + 1} strictly "
                "increasing byte offsets from 0"
            )

    @property
    def nbytes(self) -> int:
        return self.bounds[-1]

    @property
    def chunk_bytes(self) -> tuple[int, ...]:
        return tuple(y - x for x, y in zip(self.bounds, self.bounds[1:]))

    def scaled_bytes(self, nbytes: int) -> tuple[int, ...]:
        """Chunk bytes of a copy of `nbytes` cut at the same fractions (the emulated target's expert)."""
        cuts = [int(round(x * nbytes / self.nbytes)) for x in self.bounds]
        return tuple(y - x for x, y in zip(cuts, cuts[1:]))


@dataclass(frozen=True)
class FetchPlan:
    """How one fetch is served: a whole copy from `tiers[0]`, or (striped) a chunk from every tier."""

    tiers: tuple[str, ...]
    expected_s: float  # expected completion from now (queues included), on the clock's scale
    striped: bool
    reason: str  # one of REASONS

    @property
    def label(self) -> str:
        return "+".join(self.tiers)


def stripe_bounds(nbytes: int, rates_gbps, granule: int = GRANULE_BYTES) -> tuple[int, ...]:
    """Byte offsets cutting `nbytes` into chunks proportional to each device's rate (idle devices then
    finish together), on `granule` boundaries; every chunk gets at least one granule."""
    rates = np.asarray(rates_gbps, float)
    if rates.ndim != 1 or len(rates) < 2 or not np.all(rates > 0):
        raise StripeError(f"stripe rates must be >= 2 positive GB/s figures, got {list(rates_gbps)}")
    if nbytes < granule * len(rates):
        raise StripeError(f"{nbytes} bytes cannot be cut into {len(rates)} chunks of >= {granule} bytes")
    cum = np.cumsum(rates) / rates.sum() * nbytes
    cuts = [0] + [int(round(c / granule)) * granule for c in cum[:-1]] + [nbytes]
    for i in range(1, len(cuts) - 1):  # keep every chunk non-empty after rounding
        cuts[i] = min(max(cuts[i], cuts[i - 1] + granule), nbytes - granule * (len(cuts) - 1 - i))
    return tuple(cuts)


def make_stripe(hw: Hardware, tiers, nbytes: int, granule: int = GRANULE_BYTES) -> StripeSet:
    """A stripe of `nbytes` over `tiers`, cut by each tier's path rate; unknown, duplicate or non-memory
    tiers are errors naming them."""
    tiers = tuple(tiers)
    if len(tiers) < 2:
        raise StripeError(f"a stripe needs at least 2 devices, got {list(tiers)}")
    unknown = [t for t in tiers if t not in hw.tier_names]
    if unknown:
        raise StripeError(
            f"stripe over {list(tiers)}: unknown device(s) {unknown}; tiers of {hw.name!r}: {list(hw.tier_names)}"
        )
    wrong = [t for t in tiers if hw.tier(t).kind not in STRIPE_KINDS]
    if wrong:
        raise StripeError(f"stripe over {list(tiers)}: {wrong} are not memory tiers ({STRIPE_KINDS})")
    dup = sorted({t for t in tiers if tiers.count(t) > 1})
    if dup:
        raise StripeError(f"stripe {list(tiers)} names device(s) {dup} more than once")
    return StripeSet(tiers, stripe_bounds(nbytes, [path_gbps(t, hw) for t in tiers], granule))


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def select_stripe_set(
    devices: list[Tier],
    used_bytes: dict[str, int],
    hw: Hardware,
    expert_bytes: int,
    load: dict[str, float],
    max_width: int = MAX_WIDTH,
) -> StripeSet | None:
    """Devices for one more striped expert: least loaded per GB/s first (as `select_cxl_device`), added
    until their rates together reach the GPU link (more cannot go faster) or `max_width`; a device
    without room for its chunk is left out. None when fewer than two devices fit."""
    order = sorted(devices, key=lambda d: (load.get(d.name, 0.0) + 1.0) / path_gbps(d, hw))
    link_gbps = max((hw.link(d.link).gbps for d in devices if d.link), default=float("inf"))
    pool = list(order)
    while len(pool) >= 2:
        chosen, rate = [], 0.0
        for d in pool:
            if len(chosen) >= max_width or (len(chosen) >= 2 and rate >= link_gbps):
                break
            chosen.append(d)
            rate += path_gbps(d, hw)
        try:
            stripe = make_stripe(hw, [d.name for d in chosen], expert_bytes)
        except StripeError:
            return None
        full = [
            d
            for d, b in zip(chosen, stripe.chunk_bytes)
            if used_bytes.get(d.name, 0) + _pages(b) > d.capacity_bytes
        ]
        if not full:
            return stripe
        pool = [d for d in pool if d not in full]
    return None


def idle_seconds(hw: Hardware, tiers, chunk_bytes) -> float:
    """Seconds a read of these chunks takes on idle devices and links (a whole copy: one tier)."""
    clock = LinkClock(hw)
    return max(clock.reserve(t, b, 0.0)[1] for t, b in zip(tiers, chunk_bytes))


def stripe_placement(
    hw: Hardware,
    homes: dict,
    expert_bytes: int,
    freq_LE=None,
    *,
    used_bytes: dict[str, int] | None = None,
    cost_bytes: int | None = None,
    limit: int | None = None,
    kinds=("cxl",),
    offline=frozenset(),
    max_width: int = MAX_WIDTH,
    min_gain: float = MIN_GAIN,
) -> tuple[dict, dict]:
    """Stripe sets for the hottest experts where striping lands sooner than the home copy.

    `homes`: (layer, expert) -> home tier; `expert_bytes` is what a copy occupies (capacity),
    `cost_bytes` what a fetch moves (the target's expert, default the same); `used_bytes`: bytes already
    held per tier (default: one page-rounded copy per home). Returns ({key: StripeSet}, {key: reason not
    striped}), reasons "link-bound" (the home copy already moves at nearly link rate) or "no-room".
    """
    cost_bytes = expert_bytes if cost_bytes is None else cost_bytes
    keys = sorted(homes)
    if freq_LE is not None:
        keys.sort(key=lambda k: -float(freq_LE[k]))
    used = dict(used_bytes) if used_bytes is not None else {}
    if used_bytes is None:
        for t in homes.values():
            used[t] = used.get(t, 0) + _pages(expert_bytes)
    total_f = float(np.sum(freq_LE)) if freq_LE is not None else float(len(keys))
    share = {
        k: (float(freq_LE[k]) if freq_LE is not None else 1.0) / (total_f or 1.0) * len(keys) for k in keys
    }
    load: dict[str, float] = {}
    for k, t in homes.items():
        load[t] = load.get(t, 0.0) + share[k]
    devices = [t for kind in kinds for t in hw.tiers_of_kind(kind) if t.name not in offline]
    stripes, skipped = {}, {}
    for key in keys:
        if limit is not None and len(stripes) >= limit:
            break
        stripe = select_stripe_set(devices, used, hw, expert_bytes, load, max_width)
        if stripe is None:
            skipped[key] = "no-room"
            continue
        home_s = idle_seconds(hw, (homes[key],), (cost_bytes,))
        if idle_seconds(hw, stripe.tiers, stripe.scaled_bytes(cost_bytes)) >= (1 - min_gain) * home_s:
            skipped[key] = "link-bound"
            continue
        stripes[key] = stripe
        for t, b in zip(stripe.tiers, stripe.chunk_bytes):
            used[t] = used.get(t, 0) + _pages(b)
            load[t] = load.get(t, 0.0) + share[key] * b / stripe.nbytes
    return stripes, skipped


def plan_fetch(
    copies,
    stripe: StripeSet | None,
    clock: LinkClock,
    nbytes: int,
    now_s: float,
    offline=frozenset(),
    low_precision: bool = False,
    min_gain: float = MIN_GAIN,
) -> FetchPlan:
    """CXL-aware scheduling of one fetch of `nbytes` (clock bytes): the online whole copy with the
    earliest expected completion, or the striped read when the clock expects it `min_gain` sooner.

    Expected completions read the clock's device queues and shared links without booking anything;
    a striped read finishes with its last chunk. When not striped, `reason` says why: no stripe set,
    an int8 copy (never striped), a chunk on an offline device, the shared link (even idle devices
    would not land it sooner), or the chunk devices' queues.
    """
    online = [t for t in copies if t not in offline]
    if not online:
        raise StripeError(f"no online whole copy among {list(copies)} (offline: {sorted(offline)})")
    waits = [clock.expected_wait_s(t, nbytes, now_s) for t in online]
    i = min(range(len(waits)), key=waits.__getitem__)  # np.argmin's first minimum, minus numpy's overhead
    single_s = waits[i]

    def single(reason: str) -> FetchPlan:
        return FetchPlan((online[i],), single_s, False, reason)

    if low_precision:
        return single("low-precision")
    if stripe is None:
        return single("no-stripe")
    if any(t in offline for t in stripe.tiers):
        return single("chunk-offline")
    chunks = stripe.scaled_bytes(nbytes)
    stripe_s = clock.expected_stripe_wait_s(stripe.tiers, chunks, now_s)
    if stripe_s < (1 - min_gain) * single_s:
        return FetchPlan(stripe.tiers, stripe_s, True, "sooner")
    if clock.link_floor_s(stripe.tiers, chunks, now_s) >= (1 - min_gain) * single_s:
        return single("link-bound")
    return single("devices-busy")
