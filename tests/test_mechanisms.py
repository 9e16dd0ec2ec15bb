"""The paper's multi-device mechanisms: placement (Algorithm 1), CXL-aware scheduling, migration with
hysteresis, and fault tolerance (a device going offline changes no generated token)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecxl.generate import generate
from moecxl.memory import Fault, Hardware, HardwareError
from moecxl.memory.store import StoreError
from moecxl.memory.tiers import copy_time_s
from moecxl.memory.transfer import LinkClock, TransferError
from moecxl.model import MoEDecoder
from moecxl.runtime import placement as pl
from moecxl.runtime import striping
from moecxl.runtime.engine import EngineError, OffloadEngine
from tests.conftest import tiny_config

L, E = 3, 6


@pytest.fixture(scope="module")
def model():
    return MoEDecoder(tiny_config(num_layers=L, num_experts=E, top_k=2), rngs=nnx.Rngs(11))


def four_cxl(capacity_experts=None, expert_bytes=1):
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")
    if capacity_experts is None:
        return hw
    tiers = tuple(
        dataclasses.replace(t, capacity_bytes=capacity_experts.get(t.name, 0) * expert_bytes)
        if t.name in capacity_experts
        else t
        for t in hw.tiers
    )
    return dataclasses.replace(hw, tiers=tiers)


def test_placement_respects_capacities_and_puts_hot_experts_in_fast_tiers():
    eb = 10_000_000  # bandwidth, not latency, decides at expert sizes
    hw = four_cxl({"cxl-a": 2, "cxl-b": 2, "cxl-c": 1, "cxl-d": 3, "dram": 4, "nvme": 100}, eb)
    freq = np.random.default_rng(0).zipf(1.5, (L, E)).astype(float)
    plc = pl.initial_placement(hw, L, E, eb, freq)
    used = {}
    for tier in plc.values():
        used[tier] = used.get(tier, 0) + eb
    assert all(used[t] <= hw.tier(t).capacity_bytes for t in used)
    by_heat = sorted(plc, key=lambda k: -freq[k])
    hottest_kinds = {hw.tier(plc[k]).kind for k in by_heat[:8]}
    coldest_kinds = {hw.tier(plc[k]).kind for k in by_heat[-5:]}
    assert hottest_kinds == {"cxl"} and "nvme" in coldest_kinds
    # The fastest CXL device (CXL-D) gets the very hottest expert.
    assert plc[by_heat[0]] == "cxl-d"


def test_profile_too_small_names_the_shortfall():
    hw = four_cxl({"cxl-a": 1, "cxl-b": 1, "cxl-c": 1, "cxl-d": 1, "dram": 1, "nvme": 1}, 1000)
    with pytest.raises(pl.PlacementError, match="shortfall 12000 bytes"):
        pl.initial_placement(hw, L, E, 1000)


def test_scheduling_picks_the_faster_device_then_the_idle_one(model):
    eng = OffloadEngine(
        model, hardware=four_cxl(), policy="lru", device_budget=0.6, emulate=True, time_scale=1.0
    )
    key = (0, 0)
    for t in ("cxl-a", "cxl-d"):
        eng.store.add_copy(key, t)
    for t in eng.store.tiers_of(key):
        if t not in ("cxl-a", "cxl-d"):
            eng.store.drop_copy(key, t)
    eng.store.set_home(key, "cxl-a")
    assert eng.core.source(key) == "cxl-d"  # empty queues: the 52 GB/s device
    eng.transfers.clock.reserve("cxl-d", 10 * 352_000_000, eng.transfers.now_s())  # CXL-D busy
    assert eng.core.source(key) == "cxl-a"
    eng.close()


MIXTRAL_EXPERT = dict(hidden_size=4096, intermediate_size=14336, dtype="bfloat16")


def _migrating_engine(model):
    """Four CXL devices, experts weighed as Mixtral-8x7B's (what a migration moves), no emulation."""
    return OffloadEngine(
        model,
        hardware=four_cxl(),
        policy="lru",
        device_budget=0.6,
        emulate=False,
        target_model=model.cfg.replace(**MIXTRAL_EXPERT),
    )


def test_migration_follows_a_workload_shift_then_stays_put(model):
    eng = _migrating_engine(model)
    rank = pl.tier_rank(eng.hardware)
    eng.core.step = 64  # a request 64 decode steps in: as many again to come, for a move to pay back over
    for hot_expert in (5, 2):  # a workload, then a shift to another expert
        freq = np.full((L, E), 0.01)
        freq[:, hot_expert] = 10.0
        freq[0, hot_expert] = 20.0  # the very hottest
        eng.core.freq_ema = freq
        before = dict(eng.store.home_of)
        eng.rebalance(max_moves=100)
        after = dict(eng.store.home_of)
        assert after[(0, hot_expert)] == "cxl-d"
        assert all(rank[after[(m, hot_expert)]] >= rank["cxl-a"] for m in range(L))  # not the slow devices
        assert all(rank[after[k]] >= rank[before[k]] for k in after if after[k] != before[k] and freq[k] > 1)
        assert eng.rebalance(max_moves=100) == 0 and eng.rebalance(max_moves=100) == 0  # no oscillation
    m = eng.metrics()
    assert m["migrations"] >= 1 and sum(m["migration_bytes"].values()) > 0
    eng.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    step=st.integers(1, 5),
    tier=st.sampled_from(["cxl-a", "cxl-b", "cxl-c", "cxl-d", "dram"]),
    back=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_a_tier_going_offline_changes_no_token_and_recovery_restores_placement(model, step, tier, back, seed):
    prompt = np.random.default_rng(seed).integers(0, 97, (2, 4))
    ref = generate(model, prompt, max_new_tokens=8)
    online = step + back if back else None
    hw = dataclasses.replace(four_cxl(), faults=(Fault(tier, step, online),))
    eng = OffloadEngine(model, hardware=hw, policy="pregate", device_budget=0.6, emulate=False)
    original = dict(eng.store.home_of)
    res = generate(model, prompt, max_new_tokens=8, engine=eng)
    assert np.array_equal(res.tokens, ref.tokens) and np.array_equal(res.logits, ref.logits)
    states = [f["state"] for f in res.metrics["faults"]]
    assert states[0] == "offline"
    if online is not None and online < 8:
        assert states == ["offline", "online"] and eng.store.home_of == original
    else:
        assert all(t != tier for t in eng.store.home_of.values())
    eng.close()


def test_offline_unknown_tier_and_duplicate_names_are_errors(model, tmp_path):
    eng = OffloadEngine(model, hardware=four_cxl(), policy="lru", device_budget=0.6, emulate=False)
    with pytest.raises(EngineError, match="unknown tier 'cxl-z'"):
        eng.set_offline("cxl-z")
    eng.close()
    bad = tmp_path / "dup.yaml"
    text = (
        Path("configs/hardware/h100-4cxl.yaml")
        .read_text()
        .replace("  cxl-b: {use: cxl-b", "  cxl-a: {use: cxl-b")
    )
    bad.write_text(
        text.replace(
            "include: library/devices.yaml",
            "include: " + str(Path("configs/hardware/library/devices.yaml").resolve()),
        )
    )
    with pytest.raises(HardwareError, match="cxl-a"):
        Hardware.from_yaml(bad)


def test_no_copy_left_is_an_error_never_a_wrong_result(model):
    hw = four_cxl()
    eng = OffloadEngine(model, hardware=hw, policy="lru", device_budget=0.6, emulate=False)
    for t in hw.tier_names:
        if t != "hbm":
            eng.offline.add(t)
            eng.transfers.offline.add(t)
    with pytest.raises(EngineError, match="offline"):
        generate(model, [[1, 2, 3]], max_new_tokens=2, engine=eng)
    eng.close()


def test_distribution_and_utilisation_are_visible(model):
    eng = OffloadEngine(
        model, hardware=four_cxl(), policy="lru", device_budget=0.6, emulate=True, time_scale=1e-3
    )
    res = generate(model, [[5, 6, 7]], max_new_tokens=4, engine=eng)
    dist = res.metrics["distribution"]
    assert abs(sum(dist.values()) - 1.0) < 1e-9 and dist["hbm"] > 0 and dist.get("cxl", 0) > 0
    assert res.metrics["utilisation_by_tier"] and eng.timeline
    eng.close()


# ---- striping: one expert as chunks on several devices ------------------------------------------------
MIXTRAL_BYTES = 3 * 4096 * 14336 * 2


def mixtral_target(model):
    return model.cfg.replace(**MIXTRAL_EXPERT)


def with_link(hw, gbps):
    """The same devices behind a GPU link of `gbps` (e.g. NVLink-C2C class instead of PCIe 5)."""
    return dataclasses.replace(hw, links=tuple(dataclasses.replace(k, gbps=gbps) for k in hw.links))


def test_striped_read_completes_with_its_last_chunk_on_the_clock():
    hw = four_cxl()
    stripe = striping.make_stripe(hw, ["cxl-a", "cxl-b", "cxl-c"], MIXTRAL_BYTES)
    chunks = stripe.scaled_bytes(MIXTRAL_BYTES)
    assert sum(chunks) == MIXTRAL_BYTES and chunks[0] > chunks[1] > chunks[2]  # cut by device rate
    clock = LinkClock(hw)
    clock.reserve("cxl-b", MIXTRAL_BYTES // 3, 0.0)  # some queue on one chunk's device and the link
    now = 1e-3
    expected = clock.expected_stripe_wait_s(stripe.tiers, chunks, now)
    trial = LinkClock(hw, 1.0, dict(clock.tier_free_s), dict(clock.link_free_s))
    by_chunk = [trial.reserve(t, b, now)[1] for t, b in zip(stripe.tiers, chunks)]
    done, dones = clock.reserve_stripe(stripe.tiers, chunks, now)
    assert expected + now == pytest.approx(max(by_chunk), rel=1e-12) and done == max(dones) == max(by_chunk)
    assert clock.bytes_by_tier["cxl-a"] == chunks[0] and clock.bytes_by_tier["cxl-c"] == chunks[2]
    # Idle devices whose rates together outrun the link: the link sets the pace (bytes / 53.5 GB/s).
    idle = LinkClock(hw).expected_stripe_wait_s(stripe.tiers, chunks, 0.0)
    fixed = 394e-9 + 5e-6  # the slowest chunk device's latency + per-copy overhead
    assert idle == pytest.approx(MIXTRAL_BYTES / 53.5e9 + fixed, rel=1e-3)


def test_scheduler_stripes_slow_devices_but_not_one_that_fills_the_link():
    hw = four_cxl()
    slow = striping.make_stripe(hw, ["cxl-a", "cxl-b"], MIXTRAL_BYTES)
    clock = LinkClock(hw)
    plan = striping.plan_fetch(("cxl-c",), slow, clock, MIXTRAL_BYTES, 0.0)  # CXL-C: 18 GB/s alone
    assert plan.striped and plan.reason == "sooner" and plan.tiers == ("cxl-a", "cxl-b")
    assert plan.expected_s < 0.4 * clock.expected_wait_s("cxl-c", MIXTRAL_BYTES, 0.0)
    # CXL-D (52 GB/s) nearly fills the 53.5 GB/s link: a stripe would gain ~3%, under the margin.
    plan = striping.plan_fetch(("cxl-d",), slow, clock, MIXTRAL_BYTES, 0.0)
    assert not plan.striped and plan.tiers == ("cxl-d",) and plan.reason == "link-bound"
    # Behind a link that outruns every device (NVLink-C2C class), striping CXL-D's expert pays.
    fast = with_link(hw, 375.0)
    plan = striping.plan_fetch(
        ("cxl-d",),
        striping.make_stripe(fast, ["cxl-d", "cxl-a"], MIXTRAL_BYTES),
        LinkClock(fast),
        MIXTRAL_BYTES,
        0.0,
    )
    assert plan.striped and plan.expected_s < 0.7 * copy_time_s("cxl-d", MIXTRAL_BYTES, fast)
    # A chunk device busy with host-side traffic (a migration): the stripe would wait for it.
    clock.reserve_device("cxl-a", 4 * MIXTRAL_BYTES, 0.0)
    plan = striping.plan_fetch(("cxl-c",), slow, clock, MIXTRAL_BYTES, 0.0)
    assert not plan.striped and plan.reason == "devices-busy"
    # Chunks on an offline device, an int8 copy, no stripe: one whole copy, and the reason says why.
    assert striping.plan_fetch(("cxl-c",), slow, LinkClock(hw), 1, 0.0, {"cxl-b"}).reason == "chunk-offline"
    assert striping.plan_fetch(("cxl-c",), slow, LinkClock(hw), 1, 0.0, low_precision=True).reason == (
        "low-precision"
    )
    assert striping.plan_fetch(("cxl-c", "cxl-d"), None, LinkClock(hw), 1, 0.0).tiers == ("cxl-d",)


def test_stripe_placement_stripes_experts_on_slow_devices_within_capacity():
    hw = four_cxl()
    homes = pl.initial_placement(hw, 4, 8, MIXTRAL_BYTES)
    stripes, skipped = striping.stripe_placement(hw, homes, MIXTRAL_BYTES)
    assert {homes[k] for k in stripes} <= {"cxl-a", "cxl-b", "cxl-c"} and stripes
    assert {homes[k] for k in skipped} == {"cxl-d"} and set(skipped.values()) == {"link-bound"}
    for sset in stripes.values():  # every set reaches the link's rate or the width limit
        assert sum(hw.tier(t).read_gbps for t in sset.tiers) >= 53.5 or len(sset.tiers) == striping.MAX_WIDTH
    used = {}
    tight = four_cxl({"cxl-a": 5, "cxl-b": 5, "cxl-c": 5, "cxl-d": 5}, MIXTRAL_BYTES)
    homes = {(0, e): "cxl-c" for e in range(5)}
    stripes, skipped = striping.stripe_placement(tight, homes, MIXTRAL_BYTES, used_bytes=used)
    for sset in stripes.values():
        for t, b in zip(sset.tiers, sset.chunk_bytes):
            used[t] = used.get(t, 0) + b
    assert all(used[t] <= 5 * MIXTRAL_BYTES for t in used) and "cxl-c" not in {
        t for sset in stripes.values() for t in sset.tiers
    }  # CXL-C is full with the homes


def test_striped_fetches_give_bit_identical_generation(model):
    prompt = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    ref = generate(model, prompt, max_new_tokens=6)
    eng = OffloadEngine(
        model,
        hardware=four_cxl(),
        policy="lru",
        device_budget=0.6,
        emulate=True,
        time_scale=1e-3,
        target_model=mixtral_target(model),
    )
    report = eng.stripe()
    assert report["striped"] > 0 and eng.where()["stripes"]
    key = next(iter(eng.store.stripes))
    tr = eng.transfers.submit_striped(key, eng.store.stripe_of(key))
    assert np.array_equal(np.asarray(tr.result()), eng.store.master(key))  # assembled chunks == the expert
    res = generate(model, prompt, max_new_tokens=6, engine=eng)
    assert np.array_equal(res.tokens, ref.tokens) and np.array_equal(res.logits, ref.logits)
    s = res.metrics["striping"]
    assert s["striped_fetches"] > 0 and s["stripe_sets"] == report["striped"]
    assert s["sets_skipped"] == report["skipped"]
    eng.close()


def test_a_chunk_device_offline_falls_back_without_changing_tokens(model):
    prompt = np.array([[3, 1, 4, 1, 5]])
    ref = generate(model, prompt, max_new_tokens=8)
    hw = dataclasses.replace(four_cxl(), faults=(Fault("cxl-a", 2, 5), Fault("cxl-b", 3, None)))
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy="lru",
        device_budget=0.6,
        emulate=True,
        time_scale=1e-3,
        target_model=mixtral_target(model),
    )
    eng.stripe()
    res = generate(model, prompt, max_new_tokens=8, engine=eng)
    assert np.array_equal(res.tokens, ref.tokens) and np.array_equal(res.logits, ref.logits)
    s = res.metrics["striping"]
    assert s["not_striped"].get("chunk-offline", 0) > 0 and s["striped_fetches"] > 0
    eng.close()


def test_a_chunk_device_failing_mid_read_refetches_a_whole_copy(model):
    eng = OffloadEngine(
        model,
        hardware=four_cxl(),
        policy="lru",
        device_budget=0.6,
        emulate=True,
        time_scale=100.0,  # a Mixtral-sized copy from CXL-A holds its queue for ~1 s
        target_model=mixtral_target(model),
    )
    key, other = (1, 2), (1, 3)
    eng.store.add_stripe(key, striping.make_stripe(eng.hardware, ["cxl-a", "cxl-b"], eng.expert_bytes))
    eng.store.add_copy(other, "cxl-a")
    blocker = eng.transfers.submit(other, "cxl-a")  # CXL-A's FIFO is busy: the chunk waits behind it
    eng.core.stripe_min_gain = -100.0  # stripe whatever the queues say
    eng.core.fetch(key, set(), prefetched=False)
    assert eng.inflight[key][0].tiers == ("cxl-a", "cxl-b")
    eng.set_offline("cxl-a")  # before the chunk's copy starts
    eng.core.complete(key)
    slot = eng.slot_of[key]
    got = np.concatenate([np.asarray(a[slot]).reshape(-1) for a in eng.cache])
    assert np.array_equal(got, eng.store.master(key)) and eng.c.refetches == 1
    assert eng.c.not_striped["chunk-offline"] == 1
    # The blocker lands if its worker took it before CXL-A went offline, and fails cleanly if not (a
    # loaded machine may not have started it yet); either way the striped fetch above was refetched whole.
    try:
        blocker.result()
    except TransferError as e:
        assert "went offline" in str(e)
    eng.close()


def test_a_bad_stripe_is_a_clear_error(model):
    hw = four_cxl()
    with pytest.raises(striping.StripeError, match=r"unknown device\(s\) \['cxl-z'\]"):
        striping.make_stripe(hw, ["cxl-a", "cxl-z"], MIXTRAL_BYTES)
    with pytest.raises(striping.StripeError, match=r"device\(s\) \['cxl-a'\] more than once"):
        striping.make_stripe(hw, ["cxl-a", "cxl-b", "cxl-a"], MIXTRAL_BYTES)
    with pytest.raises(striping.StripeError, match="not memory tiers"):
        striping.make_stripe(hw, ["cxl-a", "nvme"], MIXTRAL_BYTES)
    with pytest.raises(striping.StripeError, match="at least 2 devices"):
        striping.make_stripe(hw, ["cxl-a"], MIXTRAL_BYTES)
    with pytest.raises(striping.StripeError, match="strictly increasing"):
        striping.StripeSet(("cxl-a", "cxl-b"), (0, 64, 64))
    eng = OffloadEngine(model, hardware=hw, policy="lru", device_budget=0.6, emulate=False)
    with pytest.raises(
        StoreError, match=f"stripe covers 1024 bytes but the packed expert has {eng.expert_bytes}"
    ):
        eng.store.add_stripe((0, 0), striping.make_stripe(hw, ["cxl-a", "cxl-b"], 1024))
    eng.close()


def test_a_migration_happens_only_when_its_misses_pay_for_the_move():
    hw = four_cxl()
    nbytes = 352_000_000  # a Mixtral-8x7B expert
    saved = pl.use_s("cxl-c", hw, nbytes) - pl.use_s("cxl-d", hw, nbytes)  # slowest to fastest device
    cost = pl.migration_s("cxl-c", "cxl-d", hw, nbytes)
    assert saved > 0 and cost > saved  # one miss does not pay for reading and writing the expert
    assert not pl.migration_pays(1.0, 0.5, saved, 1, cost)
    assert pl.migration_pays(1.0, 0.5, saved, 64, cost)  # a hot expert over a long request does
    assert not pl.migration_pays(0.01, 0.5, saved, 64, cost)  # a cold one never does
    assert not pl.migration_pays(1.0, 0.0, saved, 64, cost)  # nor one that always hits


def test_rebalancing_at_a_request_start_moves_no_cold_expert(model):
    eng = _migrating_engine(model)
    eng.core.freq_ema = np.full((L, E), 0.05)  # every expert rarely used
    eng.core.freq_ema[:, 3] = 0.06  # a slightly different order: placement proposes moves
    assert eng.rebalance(max_moves=100) == 0
    eng.core.step = 10**6  # the same proposal, with a request long enough for the moves to pay
    assert eng.rebalance(max_moves=100) > 0
    eng.close()
