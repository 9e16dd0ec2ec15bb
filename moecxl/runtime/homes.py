"""Where experts live, as the run goes: faults and re-homing, migration, replication, striping, warm start.

Functions over a `DecisionCore`: they read and change its store's locations (a `HostStore` moves the
bytes too, a `VirtualStore` only the accounts) and book host-side traffic through its mechanism, so the
engine and the simulator re-home, migrate and stripe alike.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from moecxl.runtime import placement as placement_mod
from moecxl.runtime import striping
from moecxl.runtime.mechanism import CoreError

MIGRATION_MARGIN = 0.25  # a proposed tier must score this much better than the current one (hysteresis)
MIGRATIONS_PER_ROUND = 16  # at most L·E / this experts move per rebalancing round


def _check_tier(core, tier: str) -> None:
    if tier not in core.hardware.tier_names:
        raise CoreError(f"unknown tier {tier!r}; tiers: {', '.join(core.hardware.tier_names)}")


def set_offline(core, tier: str) -> None:
    """A device fails: no copy is read from it; its experts are re-homed (replica or host master)."""
    _check_tier(core, tier)
    core.offline.add(tier)
    core.mech.set_offline(tier, True)
    core.event("offline", tier=tier)
    for key in core.store.homed_on(tier):
        rehome(core, key)
    core.c.fault_events.append({"step": core.step, "tier": tier, "state": "offline"})


def set_online(core, tier: str) -> None:
    """A device returns: experts whose original home it was move back (placement recovers)."""
    _check_tier(core, tier)
    core.offline.discard(tier)
    core.mech.set_offline(tier, False)
    for key, home in core.original_home.items():
        if home == tier and core.store.home(key) != tier:
            migrate(core, key, tier)
    core.event("online", tier=tier)
    core.c.fault_events.append({"step": core.step, "tier": tier, "state": "online"})


def rehome(core, key) -> None:
    """Give `key` a home on an online tier: an existing copy, else one made from the host master."""
    online = [t for t in core.store.tiers_of(key) if t not in core.offline]
    if online:
        core.store.set_home(key, online[0])
        return
    target = tier_with_room(core, exclude=set(core.offline))
    if target is None:
        raise CoreError(f"expert {key}: every tier holding it is offline and no online tier has room")
    try:
        nbytes = core.store.add_copy(key, target)
    except Exception as e:  # the master is the last copy: never compute without the expert
        raise CoreError(f"expert {key} has no copy left to fetch: {e}") from e
    core.store.set_home(key, target)
    core.c.migration_bytes[target] += nbytes
    core.c.rehomed += 1
    core.event("rehome", layer=key[0], expert=key[1], tier=target)


def used_target_bytes(core) -> dict:
    """Bytes used per tier, counted in the target's experts (`core.clock_bytes` each): an emulated run's
    store holds small experts standing in for the target's, and capacity is the target's."""
    scale = core.clock_bytes / core.store.slot_bytes
    return {t: b * scale for t, b in core.store.used_bytes.items()}


def tier_with_room(core, exclude=frozenset(), prefer=("cxl", "dram", "nvme")):
    hw, nbytes, used = core.hardware, core.clock_bytes, used_target_bytes(core)
    for kind in prefer:
        tiers = [t for t in hw.tiers_of_kind(kind) if t.name not in exclude]
        if kind == "cxl":
            t = placement_mod.select_cxl_device(tiers, used, hw, nbytes, {}, nbytes)
            if t is not None:
                return t.name
            continue
        for t in tiers:
            if used.get(t.name, 0) + nbytes <= t.capacity_bytes:
                return t.name
    return None


def migrate(core, key, target: str) -> None:
    """Move an expert's home to `target` (host-side copy, booked on both devices)."""
    store = core.store
    src = store.home(key)
    if key in core.inflight and src in core.inflight[key][0].tiers:
        core.complete(key)  # a copy still reading the old home lands before that copy is dropped
    data = None
    if src not in core.offline and core.hardware.tier(src).kind != "nvme":
        data = store.source(key, tier=src)
        data = None if data is None else np.asarray(data)
    nbytes = store.add_copy(key, target, data)
    now = core.mech.now_s()
    core.mech.hold_device(target, now)
    if src not in core.offline:
        core.mech.hold_device(src, now)
    store.set_home(key, target)
    if src != target:
        store.drop_copy(key, src)
    core.c.migration_bytes[target] += nbytes
    core.c.migrations += 1
    core.event("migrate", layer=key[0], expert=key[1], src=src, tier=target)


def rebalance(core, max_moves: int | None = None, margin: float = MIGRATION_MARGIN) -> int:
    """Background migration: re-run placement on the EMA frequencies, move experts whose proposed tier
    is clearly better (hysteresis `margin`) and whose misses, over as many steps again as the request
    has run, save more than the move costs the devices (`placement.migration_pays`); only when no copy
    is in flight (idle links)."""
    if core.inflight:
        return 0
    hw = replace(core.hardware, tiers=tuple(t for t in core.hardware.tiers if t.name not in core.offline))
    try:
        proposal = placement_mod.initial_placement(
            hw, core.L, core.E, core.clock_bytes, core.freq_ema, core.clock_bytes, reader=core.reader
        )
    except placement_mod.PlacementError:
        return 0
    moves = 0
    limit = max_moves if max_moves is not None else max(1, core.L * core.E // MIGRATIONS_PER_ROUND)
    score = placement_mod.tier_rank(hw, core.reader)
    order = np.argsort(-core.freq_ema.reshape(-1), kind="stable")
    nbytes, horizon, c = core.clock_bytes, max(1, core.step), core.c
    for flat in order:
        key = divmod(int(flat), core.E)
        cur, want = core.store.home(key), proposal[key]
        if cur == want or score.get(want, 0) < score.get(cur, 0) * (1 + margin):
            continue
        if used_target_bytes(core).get(want, 0) + nbytes > core.hardware.tier(want).capacity_bytes:
            continue
        m = key[0]
        miss_rate = (c.misses[m] + 1) / (c.misses[m] + c.hits[m] + c.inflight_hits[m] + 2)
        saved = placement_mod.use_s(cur, hw, nbytes, core.reader) - placement_mod.use_s(
            want, hw, nbytes, core.reader
        )
        cost = placement_mod.migration_s(cur, want, core.hardware, nbytes)
        if not placement_mod.migration_pays(core.freq_ema[key], miss_rate, saved, horizon, cost):
            continue
        migrate(core, key, want)
        moves += 1
        if moves >= limit:
            break
    return moves


def warm_start(core) -> None:
    """Algorithm 1's device step: fill the cache with the hottest experts before the first request."""
    order = np.argsort(-core.freq_ema.reshape(-1), kind="stable")
    for flat in order[: core.n_slots]:
        key = divmod(int(flat), core.E)
        core.fetch(key, set(), prefetched=False)
        core.complete(key)
        core.stats[key][1] = 0


def replicate(core, n: int) -> int:
    """Replicate the hottest experts not on the device onto a second CXL device (scheduling then reads
    whichever copy lands first)."""
    cxl = [t.name for t in core.hardware.tiers_of_kind("cxl") if t.name not in core.offline]
    if len(cxl) < 2 or n <= 0:
        return 0
    done = 0
    for flat in np.argsort(-core.freq_ema.reshape(-1), kind="stable"):
        key = divmod(int(flat), core.E)
        if key in core.slot_of or len(core.store.tiers_of(key)) > 1:
            continue
        home = core.store.home(key)
        others = [t for t in cxl if t != home]
        target = tier_with_room(core, exclude={home} | set(core.offline), prefer=("cxl",))
        if target is None or target not in others:
            break
        core.c.migration_bytes[target] += core.store.add_copy(key, target)
        done += 1
        if done >= n:
            break
    return done


def stripe(
    core, n: int | None = None, max_width: int = striping.MAX_WIDTH, kinds=("cxl",), freq=None
) -> dict:
    """Stripe the hottest `n` experts (None: every one) across devices chosen by rate and load
    (`striping.stripe_placement`), where a striped read lands sooner than the home copy; the scheduler
    then picks per fetch. Returns {"striped": count, "skipped": {reason: count}}."""
    store = core.store
    homes = {k: store.home(k) for k in store.home_of}
    if freq is None:
        freq = core.freq_ema if core.freq_ema.any() else None
    stripes, skipped = striping.stripe_placement(
        core.hardware,
        homes,
        core.slot_bytes,
        freq,
        used_bytes=dict(store.used_bytes),
        cost_bytes=core.clock_bytes,
        limit=n,
        kinds=kinds,
        offline=set(core.offline),
        max_width=max_width,
        min_gain=core.stripe_min_gain,
    )
    for key, st in stripes.items():
        store.add_stripe(key, st)
        for t, nbytes in zip(st.tiers, st.chunk_bytes):
            core.c.migration_bytes[t] += nbytes
    reasons: dict = defaultdict(int)
    for r in skipped.values():
        reasons[r] += 1
    core.stripe_report = {"striped": len(stripes), "skipped": dict(reasons)}
    return core.stripe_report
