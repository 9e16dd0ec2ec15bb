"""Beyond fetching: each miss is fetched, computed on the host where the expert lives, or served by a
low-precision copy, whichever is expected to finish first; host compute is float32-close (1e-5)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from moecxl.generate import generate
from moecxl.memory import Hardware, copy_time_s
from moecxl.model import MoEDecoder
from moecxl.runtime.engine import EngineError, OffloadEngine
from moecxl.runtime.gate import MissCosts, host_compute_s, miss_decision
from tests.conftest import tiny_config

MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, dtype="bfloat16")
EXPERT_PARAMS = 3 * 4096 * 14336
EXPERT_BYTES = 2 * EXPERT_PARAMS


def host_s(hw, tier, n_tokens):
    t, host = hw.tier(tier), hw.host
    return host_compute_s(
        n_tokens,
        EXPERT_PARAMS,
        EXPERT_BYTES,
        t.read_gbps,
        host.gflops,
        host.mem_gbps,
        4096,
        hw.link(t.link).gbps,
    )


def test_decision_is_batch_aware_small_batches_compute_large_ones_fetch():
    hw = Hardware.from_yaml("configs/hardware/h100-pcie4-dram.yaml")
    fetch = copy_time_s("dram", EXPERT_BYTES, hw)
    assert miss_decision(MissCosts(fetch_s=fetch, host_s=host_s(hw, "dram", 1))) == "host"
    assert miss_decision(MissCosts(fetch_s=fetch, host_s=host_s(hw, "dram", 4096))) == "fetch"
    # Host time grows with tokens routed to the expert; fetching does not.
    assert host_s(hw, "dram", 64) > host_s(hw, "dram", 1)


def test_decision_prefers_exact_options_on_ties_and_a_copy_in_flight_when_sooner():
    assert miss_decision(MissCosts(fetch_s=1.0, host_s=1.0, lowp_s=1.0)) == "fetch"
    assert miss_decision(MissCosts(fetch_s=1.0, inflight_s=0.2, host_s=0.5)) == "inflight"
    assert miss_decision(MissCosts(fetch_s=1.0, host_s=2.0, lowp_s=0.5)) == "lowp"
    assert miss_decision(MissCosts(fetch_s=1.0, host_s=None, lowp_s=None)) == "fetch"


@pytest.fixture(scope="module")
def model():
    return MoEDecoder(tiny_config(num_layers=3, num_experts=6, top_k=2), rngs=nnx.Rngs(5))


def test_host_computed_experts_are_float32_close_to_the_device_path(model):
    prompt = [[3, 4, 5, 6, 7]]
    ref = generate(model, prompt, max_new_tokens=6)
    hw = Hardware.from_yaml("configs/hardware/h100-pcie4-dram.yaml")
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy="moecxl_nd",
        device_budget=0.5,
        emulate=True,
        time_scale=0.01,
        target_model=model.cfg.replace(**MIXTRAL),
    )
    res = generate(model, prompt, max_new_tokens=6, engine=eng)
    assert res.metrics["miss_choices"]["host"] > 0 and res.metrics["host_computed_tokens"] > 0
    assert res.metrics["exact"] is False
    err = np.abs(res.logits - ref.logits).max() / np.abs(ref.logits).max()
    assert err < 1e-5
    assert np.array_equal(res.tokens, ref.tokens)
    eng.close()


def test_bad_quality_budget_and_missing_host_figures_are_clear_errors(model):
    hw = Hardware.from_yaml("configs/hardware/h100-pcie4-dram.yaml")
    with pytest.raises(EngineError, match="quality_budget"):
        OffloadEngine(
            model, hardware=hw, policy="moecxl_nd", device_budget=0.5, emulate=False, quality_budget=1.5
        )
    with pytest.raises(EngineError, match="no `host:` block"):
        OffloadEngine(
            model,
            hardware=dataclasses.replace(hw, host=None),
            policy="moecxl_nd",
            device_budget=0.5,
            emulate=False,
        )


def test_a_copy_is_credited_with_the_reuses_it_serves_while_cached():
    """Host compute leaves nothing cached: a copy that will be reused is the better buy, the more so the
    longer the cache keeps it (rounds before it turns over)."""
    from moecxl.runtime.gate import reuse_credit_s

    assert miss_decision(MissCosts(fetch_s=1.2, host_s=1.0)) == "host"
    one_round = reuse_credit_s(0.8, host_s=1.0, copy_s=1.2)
    assert one_round == pytest.approx(
        0.8
    )  # one round: used again with chance 0.8, served by the host otherwise
    assert miss_decision(MissCosts(fetch_s=1.2, host_s=1.0, reuse_credit_s=one_round)) == "fetch"
    assert (
        miss_decision(MissCosts(fetch_s=1.2, host_s=1.0, reuse_credit_s=reuse_credit_s(0.1, 1.0, 1.2)))
        == "host"
    )
    # a router that keeps picking the same expert and a cache that keeps it: the copy wins at 6x the cost
    assert reuse_credit_s(0.9, 0.06, 0.38, rounds=50) == pytest.approx(0.06 * 0.9 * 50)
    # a top-1-of-128 expert used once in four rounds and cached for twelve: three uses, not a 0.33 run
    assert reuse_credit_s(0.25, 0.06, 0.38, rounds=12) == pytest.approx(0.06 * 3.0)
    many = reuse_credit_s(0.9, 0.06, 0.38, rounds=50)
    assert miss_decision(MissCosts(fetch_s=0.38, host_s=0.06, reuse_credit_s=many)) == "fetch"
    assert (
        miss_decision(MissCosts(fetch_s=0.38, host_s=0.06, reuse_credit_s=reuse_credit_s(0.9, 0.06, 0.38)))
        == "host"
    )


def test_reuse_calibration_scales_the_credit_by_what_copies_really_served():
    """Copies fetched on a miss promise `expected_reuses`; what they served when evicted corrects it."""
    from moecxl.runtime.gate import ReuseCalibration, expected_reuses, reuse_credit_s

    cal = ReuseCalibration()
    assert cal.factor == 1.0  # the prior: the model is trusted until copies come back
    for i in range(20):
        cal.fetched(("a", i), expected_reuses(0.5, 4))  # 2.0 promised each (0.5 per round, 4 rounds)
        cal.evicted(("a", i), 6)  # each served six reuses
    assert 2.9 < cal.factor <= 3.0
    cal.evicted(("never", 0), 50)  # a copy the decision did not fetch is not counted
    assert cal.factor <= 3.0
    base = reuse_credit_s(0.5, 1e-3, 2e-3, 4)
    assert reuse_credit_s(0.5, 1e-3, 2e-3, 4, cal.factor) == pytest.approx(base * cal.factor)
    stingy = ReuseCalibration()
    for i in range(100):
        stingy.fetched(i, 5.0)
        stingy.evicted(i, 0)
    assert stingy.factor == 0.125  # clipped: never below an eighth of the model


def test_calibration_learns_how_long_copies_stay_before_trusting_the_slot_estimate():
    from moecxl.runtime.gate import ReuseCalibration

    cal = ReuseCalibration()
    assert cal.rounds(48.0) == 48.0  # nothing evicted yet: the slot-count estimate
    for i in range(200):
        cal.evicted(("b", i), 0, rounds_resident=3.0)  # copies really stay three rounds
    assert cal.rounds(48.0) == pytest.approx(3.0)
    assert cal.rounds(0.2) == pytest.approx(3.0)
    assert ReuseCalibration().rounds(0.2) == 1.0  # never below one round
    # a cache with room evicts nothing; a copy still cannot outlast what the request is expected to have
    assert ReuseCalibration().rounds(48.0, decode_steps=5) == 5.0
    assert cal.rounds(48.0, decode_steps=0) == 1.0


def test_a_just_used_expert_is_promised_its_recency_then_its_popularity():
    from moecxl.runtime.gate import expected_reuses

    # no long-run figure: the next-visit chance holds for every round
    assert expected_reuses(0.3, 10) == pytest.approx(3.0)
    # recency fades towards popularity: between the popularity alone and the flat promise
    faded = expected_reuses(0.3, 10, p_far=0.02, decay=0.8)
    assert 0.02 * 10 < faded < 3.0
    assert faded == pytest.approx(0.2 + 0.28 * (1 - 0.8**10) / 0.2)
    assert expected_reuses(0.3, 10, p_far=0.3) == pytest.approx(3.0)


def test_near_data_placement_homes_experts_where_the_host_reads_fastest():
    """DRAM (the host's 200 GB/s) before CXL-D (52 GB/s) for a policy that computes misses on the host;
    the GPU's own placement keeps the paper's order (CXL first); capacities hold either way."""
    import dataclasses as dc

    from moecxl.runtime.placement import PlacementError, cpu_read_gbps, initial_placement, tier_rank

    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    assert cpu_read_gbps("dram", hw) == hw.host.mem_gbps > cpu_read_gbps("cxl-d", hw) == 52.0
    L, E, nbytes = 4, 8, 10**9
    gpu = initial_placement(hw, L, E, nbytes)
    assert set(gpu.values()) == {"cxl-d"}
    cpu = initial_placement(hw, L, E, nbytes, reader="cpu")
    assert set(cpu.values()) == {"dram"}
    assert tier_rank(hw, "cpu")["dram"] > tier_rank(hw, "cpu")["cxl-d"]
    # DRAM with room for 5 experts: the 5 hottest go there, the rest to the next-fastest tier (CXL-D).
    small = dc.replace(
        hw, tiers=tuple(dc.replace(t, capacity_bytes=5 * nbytes) if t.name == "dram" else t for t in hw.tiers)
    )
    freq = np.arange(L * E, dtype=float).reshape(L, E)
    cpu = initial_placement(small, L, E, nbytes, freq, reader="cpu")
    hottest = {divmod(int(i), E) for i in np.argsort(-freq.reshape(-1))[:5]}
    assert {k for k, t in cpu.items() if t == "dram"} == hottest
    assert {t for k, t in cpu.items() if k not in hottest} == {"cxl-d"}
    with pytest.raises(PlacementError, match="reader"):
        initial_placement(hw, L, E, nbytes, reader="npu")


def test_the_host_reading_an_expert_shares_its_device_with_the_gpus_copies():
    """A host read waits for a copy in flight from the same device, and a later copy waits for it;
    another device is not held up, and the GPU link is not used by the host's read."""
    from moecxl.memory.transfer import LinkClock

    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    clock = LinkClock(hw)
    _, copy_done = clock.reserve("cxl-d", EXPERT_BYTES, 0.0)
    device_s = EXPERT_BYTES / (hw.tier("cxl-d").read_gbps * 1e9)
    assert clock.device_queue_s("cxl-d", 0.0) == pytest.approx(device_s)
    assert clock.reserve_host_read("cxl-d", EXPERT_BYTES, 0.0) == pytest.approx(device_s)
    assert clock.reserve_host_read("dram", EXPERT_BYTES, 0.0) == 0.0  # its own device: no wait
    start, _ = clock.reserve("cxl-d", EXPERT_BYTES, 0.0)
    assert start == pytest.approx(2 * device_s)  # behind the copy and the host's read
    assert clock.link_free_s["pcie5-x16"] == pytest.approx(2 * EXPERT_BYTES / (53.5e9), rel=0.05)


def test_the_engine_homes_experts_near_data_only_for_policies_that_compute_on_the_host(model):
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    near = OffloadEngine(model, hardware=hw, policy="moecxl_nd", device_budget=0.5, emulate=False)
    fetching = OffloadEngine(model, hardware=hw, policy="moecxl", device_budget=0.5, emulate=False)
    try:
        assert set(near.placement.values()) == {"dram"}  # the CPU reads DRAM ~4x faster than CXL-D
        assert set(fetching.placement.values()) == {"cxl-d"}  # Algorithm 1: warm experts on CXL
        assert {near.store.home(k) for k in near.placement} == {"dram"}
    finally:
        near.close()
        fetching.close()
