"""The prefetch gate's inputs (demand pressure over the layers a copy spans, the planned path's copy time)
and the reuse promise of a layer the pass skips; in replay, the gate keeps prefetching from costing time
on a link-bound run and lets it through where compute hides the copies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moecxl.memory import Hardware
from moecxl.memory.tiers import copy_time_s
from moecxl.memory.transfer import LinkClock
from moecxl.runtime.gate import copy_alone_s, demand_pressure, expected_reuses, prefetch_gate
from moecxl.runtime.policies import get_policy
from moecxl.sim.costmodel import load_shape
from moecxl.sim.simulate import SimConfig, simulate
from moecxl.sim.workload import requests_from_arrays

MIXTRAL = "configs/models/mixtral-8x7b.yaml"


def test_demand_pressure_counts_the_lookups_a_copy_spans():
    # A copy shorter than a layer meets one lookup: the miss rate itself.
    assert demand_pressure(1, 1, window_s=1e-3, layer_s=1e-2) == pytest.approx(0.5)
    # A copy spanning 30 layers of 2 lookups each: some demand fetch will queue behind it.
    assert demand_pressure(30, 70, window_s=30e-3, layer_s=1e-3, uses_per_visit=2) > 0.99


def test_copy_alone_is_the_planned_path_without_queues():
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")
    clock = LinkClock(hw)
    nbytes = 352_000_000
    clock.reserve("cxl-c", nbytes, 0.0)  # a queue: not part of the copy's own time
    single = copy_alone_s(clock, ("cxl-c",), (nbytes,))
    assert single == pytest.approx(copy_time_s("cxl-c", nbytes, hw), rel=1e-3)
    striped = copy_alone_s(clock, ("cxl-a", "cxl-b", "cxl-c", "cxl-d"), (nbytes // 4,) * 4)
    assert striped < 0.5 * single  # four devices read at once: the shared link binds, not CXL-C


def test_gate_declines_when_a_copy_spans_many_layers_and_prefetches_when_compute_hides_it():
    copy_s = 6.6e-3
    kw = dict(wait_s=copy_s, copy_s=copy_s, misses=50, hits=50, victim_p=0.0, uses_per_visit=2)
    assert not prefetch_gate(1.0, 1, 0.25e-3, **kw)  # Mixtral decode: the copy is ~26 layers long
    assert prefetch_gate(0.9, 1, 20e-3, **kw)  # a layer longer than the copy: it lands in time


def test_a_layer_the_pass_skips_is_promised_no_reuse():
    assert expected_reuses(0.5, 4.0, rounds_until=1.0) == pytest.approx(expected_reuses(0.5, 4.0))
    assert expected_reuses(0.5, 4.0, rounds_until=0.25) == pytest.approx(expected_reuses(0.5, 4.0))
    assert expected_reuses(0.9, 50.0, rounds_until=1000.0) == 0.0
    assert 0.0 < expected_reuses(0.5, 4.0, rounds_until=3.0) < expected_reuses(0.5, 4.0)


def _imperfect_pregate_requests(seed: int = 0):
    """Mixtral-width routing (32 layers, top-2 of 8) with a pre-gate right about 70% of the time."""
    rng = np.random.default_rng(seed)
    S, T, M, L = 3, 4, 10, 32
    ids = np.array([[rng.choice(8, 2, replace=False) for _ in range(L)] for _ in range(S * (T + M))])
    seq = np.repeat(np.arange(S), T + M)
    dec = np.tile(np.arange(T + M) >= T, S)
    guess = np.where(rng.random(ids.shape) < 0.7, ids, rng.integers(0, 8, ids.shape))
    pregate = np.full((len(ids), L, 2, 2), -1, np.int16)
    for h in (1, 2):
        pregate[:, : L - h, h - 1] = guess[:, h:]
    return requests_from_arrays(ids, seq, dec, pregate_NLHK=pregate)


def test_replayed_gate_never_costs_time_link_bound_and_prefetches_when_compute_bound():
    reqs = _imperfect_pregate_requests()
    shape = load_shape(MIXTRAL)
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")
    full = get_policy("moecxl")
    no_pf = dataclasses.replace(full, name="moecxl-no-prefetch", prefetch=None, horizon=0)

    def run(policy, **kw):
        cfg = SimConfig(policy=policy, device_budget=0.25, warmup_requests=1, striping=True, **kw)
        return simulate(reqs, shape, hw, cfg).metrics

    # Roofline decode layers (~0.25 ms) against striped copies (~7 ms): link-bound.
    gated, plain = run(full), run(no_pf)
    assert gated["tpot_s"] <= plain["tpot_s"] * 1.001
    # 40 ms of compute per layer hides a copy: the gate lets prefetches through, and they pay.
    gated, plain = run(full, compute_s=40e-3), run(no_pf, compute_s=40e-3)
    assert gated["prefetch_issued"] > 0
    assert gated["tpot_s"] < plain["tpot_s"]


def test_with_host_compute_a_late_copy_saves_nothing_and_one_in_time_saves_the_host_time():
    """A miss costs at most the host's time, and so does a copy landing late (the engine then computes
    the expert on the host): only a copy that lands in time saves, and it saves the host's time."""
    copy_s, host_s = 6.6e-3, 1.8e-3
    kw = dict(copy_s=copy_s, misses=50, hits=50, victim_p=0.0, uses_per_visit=2)
    late = dict(wait_s=copy_s, **kw)  # lands ~26 layers after it is needed
    assert not prefetch_gate(1.0, 1, 0.25e-3, **late, host_s=host_s, host_served=50)
    in_time = dict(wait_s=copy_s, **kw)
    # a layer far longer than the copy, and no demand fetch left to delay: worth it
    assert prefetch_gate(0.9, 1, 20e-3, **in_time, host_s=host_s, host_served=50)
    # host-served misses do not queue on the link: the same prefetch with every miss fetched costs more
    busy = dict(wait_s=copy_s, copy_s=copy_s, misses=500, hits=10, victim_p=0.0, host_s=host_s)
    ok_host = prefetch_gate(0.5, 2, 4e-3, **busy, host_served=500)
    ok_fetch = prefetch_gate(0.5, 2, 4e-3, **busy, host_served=0)
    assert ok_host and not ok_fetch


def test_with_the_three_way_decision_a_sure_prefetch_pays_even_when_misses_were_fetched():
    """A demand fetch that would queue behind a prefetch is served on the host instead when that is
    sooner, so it loses at most the host's time; and a used prefetch saves the fetch's stall, or the
    host's time plus the cached copy's later uses. Every miss so far fetched, a sure prefetch
    that will be reused passes; a doubtful one passes only for a copy that will be reused."""
    copy_s, host_s = 6.6e-3, 1.8e-3
    busy = dict(wait_s=copy_s, copy_s=copy_s, misses=500, hits=10, victim_p=0.0, host_s=host_s, host_served=0)
    assert not prefetch_gate(1.0, 2, 4e-3, **busy)  # host-only accounting: every fetched miss queues
    assert prefetch_gate(1.0, 2, 4e-3, **busy, can_fetch=True, reuse_credit_s=5e-3)
    assert prefetch_gate(0.5, 2, 4e-3, **busy, can_fetch=True, reuse_credit_s=5e-3)
    assert not prefetch_gate(0.5, 2, 4e-3, **busy, can_fetch=True, reuse_credit_s=0.0)
    assert not prefetch_gate(0.2, 2, 4e-3, **busy, can_fetch=True, reuse_credit_s=5e-3)


def test_a_host_computed_miss_is_also_copied_for_later_when_its_reuses_beat_the_link_it_holds():
    """Host compute keeps this layer short; a background copy gives later tokens their hits. It is worth
    it when the cached copy's expected saving (net of its victim's) beats the demand fetches it may hold
    up, each of which loses at most the host's time (it goes to the host instead)."""
    from moecxl.runtime.gate import copy_for_later

    copy_s, host_s = 182e-6, 57e-6  # a Switch expert over PCIe 5 from DRAM; the host at batch 1
    assert copy_for_later(credit_s=40e-6, pressure=0.1, copy_s=copy_s, host_s=host_s)  # idle link
    assert not copy_for_later(credit_s=40e-6, pressure=0.9, copy_s=copy_s, host_s=host_s)  # busy link
    assert not copy_for_later(credit_s=-5e-6, pressure=0.0, copy_s=copy_s, host_s=host_s)  # victim worth more
