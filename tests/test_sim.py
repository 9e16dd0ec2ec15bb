"""The simulator: cost-model units, the link clock, trace mapping errors, result schema, and agreement with
the engine on emulated links (same fetch/prefetch/evict sequence, same misses, TPOT within 10%)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flax import nnx

from moecxl.generate import generate
from moecxl.memory import Hardware
from moecxl.memory.tiers import copy_time_s
from moecxl.memory.transfer import LinkClock
from moecxl.model import MoEDecoder
from moecxl.runtime.engine import OffloadEngine
from moecxl.sim.costmodel import head_s, load_shape, shape_of, visit_s
from moecxl.sim.experiments import ExperimentError, load_hardware, load_results
from moecxl.sim.predict import pregate_tops_for_ids
from moecxl.sim.simulate import SimConfig, simulate
from moecxl.sim.workload import WorkloadError, check_topology, requests_from_arrays, requests_from_generate
from tests.conftest import tiny_config

MIXTRAL = "configs/models/mixtral-8x7b.yaml"


def test_mixtral_expert_over_pcie5_and_h100_decode_layer():
    hw = Hardware.from_yaml("configs/hardware/h100-pcie5-dram.yaml")
    shape = load_shape(MIXTRAL)
    assert shape.shape_only and shape.expert_bytes == 3 * 4096 * 14336 * 2
    assert copy_time_s("dram", shape.expert_bytes, hw) == pytest.approx(6.6e-3, rel=0.02)
    layer_s = visit_s(shape, hw.gpu, n_tokens=1, n_distinct=2, context=512, batch=1, prefill=False)
    assert layer_s == pytest.approx(0.22e-3, rel=0.15)  # HBM-bound: ~790 MB at 3.35 TB/s
    # batch-aware: 32 tokens touching all 8 experts read 4x the expert bytes of one token's 2
    assert visit_s(shape, hw.gpu, 32, 8, 512, 32, False) > 3 * layer_s
    # attention grows with context; long prefill is compute-bound
    assert visit_s(shape, hw.gpu, 1, 2, 32768, 1, False) > visit_s(shape, hw.gpu, 1, 2, 512, 1, False)
    assert visit_s(shape, hw.gpu, 16384, 8, 16384, 1, True) > 10e-3
    assert 0 < head_s(shape, hw.gpu, 1) < layer_s


def test_link_clock_fifo_per_device_and_shared_link():
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")
    n = 352_321_536
    one = copy_time_s("cxl-d", n, hw)
    clock = LinkClock(hw)
    _, d1 = clock.reserve("cxl-d", n, 0.0)
    _, d2 = clock.reserve("cxl-d", n, 0.0)  # same device: queues behind the first (FIFO)
    assert d1 == pytest.approx(one, rel=1e-6) and d2 == pytest.approx(2 * one, rel=0.02)
    clock = LinkClock(hw)
    _, da = clock.reserve("cxl-a", n, 0.0)
    _, db = clock.reserve("cxl-b", n, 0.0)  # another device, same GPU link: shares the link's 53.5 GB/s
    link_s = n / 53.5e9
    assert max(da, db) >= 2 * link_s  # the two together never beat the link
    assert db < copy_time_s("cxl-a", n, hw) + copy_time_s("cxl-b", n, hw)  # but overlap their device reads


def test_trace_topology_mismatch_is_an_error_unless_mapped():
    shape = load_shape(MIXTRAL)
    with pytest.raises(WorkloadError, match="E=128, K=1 but target model 'mixtral-8x7b' has E=8, K=2"):
        check_topology((12, 128, 1), shape)
    with pytest.raises(WorkloadError, match="L=16 MoE layers but target model 'mixtral-8x7b' has L=32"):
        check_topology((16, 8, 2), shape)
    check_topology((16, 8, 2), shape, layer_map="tile")  # explicit mapping: allowed
    with pytest.raises(WorkloadError, match="unknown layer_map"):
        check_topology((32, 8, 2), shape, layer_map="stretch")


def test_unknown_profile_and_old_result_schema(tmp_path):
    with pytest.raises(ExperimentError, match="unknown hardware profile 'h900-cxl'.*known:"):
        load_hardware("h900-cxl")
    old = tmp_path / "results.json"
    old.write_text(json.dumps({"kind": "moecxl.sim.results", "schema_version": 0}))
    with pytest.raises(ExperimentError, match="'schema_version' is 0; this moecxl reads version 2"):
        load_results(old)


def test_paper_scale_replay_oracle_bounds_the_policies():
    """A random trace with L/E/K of Mixtral: the oracle beats on-demand; more bandwidth, lower TPOT."""
    rng = np.random.default_rng(0)
    S, T, M = 3, 8, 6
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(S * (T + M) * 32)]).reshape(-1, 32, 2)
    seq = np.repeat(np.arange(S), T + M)
    dec = np.tile(np.arange(T + M) >= T, S)
    reqs = requests_from_arrays(ids, seq, dec)
    shape = load_shape(MIXTRAL)
    tpot = {}
    for prof, pol in [
        ("h100-pcie4-dram", "on_demand"),
        ("h100-pcie5-dram", "on_demand"),
        ("h100-cxl", "oracle"),
    ]:
        hw = Hardware.from_yaml(f"configs/hardware/{prof}.yaml")
        m = simulate(reqs, shape, hw, SimConfig(policy=pol, warmup_requests=1)).metrics
        assert m["timing"] == "simulated"
        tpot[prof] = m["tpot_s"]
    assert tpot["h100-pcie5-dram"] < tpot["h100-pcie4-dram"] and tpot["h100-cxl"] < tpot["h100-pcie5-dram"]


def test_simulated_striping_pays_on_slow_devices_and_books_every_chunk():
    """The simulator stripes through the engine's `plan_fetch`: on devices slower than the link (CXL-A..C
    on PCIe 5) it lowers TPOT and moves bytes from every chunk's device; CXL-D's experts stay whole."""
    rng = np.random.default_rng(1)
    S, T, M = 3, 8, 6
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(S * (T + M) * 32)]).reshape(-1, 32, 2)
    reqs = requests_from_arrays(ids, np.repeat(np.arange(S), T + M), np.tile(np.arange(T + M) >= T, S))
    shape = load_shape(MIXTRAL)
    out = {}
    for prof in ("h100-3cxl", "h100-4cxl"):
        hw = Hardware.from_yaml(f"configs/hardware/{prof}.yaml")
        for on in (False, True):
            m = simulate(reqs, shape, hw, SimConfig(policy="lru", warmup_requests=1, striping=on)).metrics
            out[prof, on] = m
    on, off = out["h100-3cxl", True], out["h100-3cxl", False]
    assert on["striping"]["striped_fetches"] > 0 and off["striping"]["striped_fetches"] == 0
    assert on["tpot_s"] < 0.8 * off["tpot_s"]
    assert sum(on["bytes_by_tier"].values()) == sum(off["bytes_by_tier"].values())  # same misses, split
    assert on["misses"] == off["misses"]
    four = out["h100-4cxl", True]["striping"]
    assert four["sets_skipped"].get("link-bound", 0) > 0  # CXL-D's homes: the link, not the device, binds


# ---- agreement with the engine on emulated links --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_layers=4, num_experts=6, top_k=2)
    model = MoEDecoder(cfg, rngs=nnx.Rngs(3))
    prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = generate(model, prompt, max_new_tokens=10)
    full = np.concatenate([prompt, ref.tokens[:, :-1]], axis=1)
    reqs = requests_from_generate(ref, pregate_NLHK=pregate_tops_for_ids(model, full, 2))
    target = cfg.replace(hidden_size=4096, intermediate_size=14336, dtype="bfloat16", name="mixtral-width")
    return model, prompt, ref, reqs, target


def _decisions(events):
    return [
        (e["kind"], e["layer"], e["expert"]) for e in events if e["kind"] in ("fetch", "prefetch", "evict")
    ]


@pytest.mark.parametrize("policy", ["on_demand", "lru", "pregate", "moecxl", "oracle", "moecxl_nd"])
def test_simulator_agrees_with_emulated_engine(tiny, policy):
    model, prompt, ref, reqs, target = tiny
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")  # four devices sharing one PCIe 5 link
    scale = 3.0  # emulated copies of Mixtral-width experts: 20-60 ms, far above this machine's layer time
    for _ in range(2):  # the first run compiles
        eng = OffloadEngine(
            model,
            hardware=hw,
            policy=policy,
            device_budget=0.5,
            emulate=True,
            time_scale=scale,
            target_model=target,
            record_events=True,
            trace=ref if policy == "oracle" else None,
        )
        t0 = time.perf_counter()
        res = generate(model, prompt, max_new_tokens=10, engine=eng)
        wall_s = time.perf_counter() - t0
        eng.close()
    em = res.metrics
    layer_s = (wall_s - em["stall_s"]) / eng.tick  # measured compute + control per layer visit
    cfg = SimConfig(
        policy=policy, device_budget=0.5, time_scale=scale, compute_s=layer_s, head_s=0.0, record_events=True
    )
    sim = simulate(reqs, shape_of(target), hw, cfg)
    sm = sim.metrics
    assert sm["device_slots"] == em["device_slots"]
    if policy in ("oracle", "moecxl", "moecxl_nd"):
        # Timing-dependent decisions: the oracle's Belady victim depends on which far-ahead copies have
        # landed (in flight = protected), and moecxl's gate reads the link queues at wall-clock time, so on
        # a loaded machine the engine's exact sequence can differ from the simulator's. Demand misses and
        # hit rate must still agree.
        assert abs(sm["misses"] - em["misses"]) <= max(1, 0.1 * em["misses"])
        assert sm["hit_rate"] == pytest.approx(em["hit_rate"], abs=0.05)
    else:
        assert _decisions(sim.events) == _decisions(eng.events)  # same fetches, prefetches, evictions
        assert sm["misses"] == em["misses"] and sm["hit_rate"] == em["hit_rate"]
    assert sm["tpot_s"] == pytest.approx(em["tpot_s"], rel=0.10)


def test_expected_reuse_eviction_beats_recency_on_the_layer_cycle():
    """Decoding visits layers cyclically: with fewer slots than a token's experts, LRU evicts exactly the
    expert needed next and never hits; moecxl's eviction (distance to the expert's layer, chance of
    reuse) keeps the experts each layer keeps using."""
    rng = np.random.default_rng(1)
    S, T, M, L = 3, 4, 24, 32
    favourite = rng.choice(8, (L, 2))
    rows = []
    for _ in range(S * (T + M)):
        rows.append(
            [
                favourite[m]
                if rng.random() < 0.8 and favourite[m, 0] != favourite[m, 1]
                else rng.choice(8, 2, replace=False)
                for m in range(L)
            ]
        )
    ids = np.array(rows)
    seq = np.repeat(np.arange(S), T + M)
    dec = np.tile(np.arange(T + M) >= T, S)
    pregate = np.full((len(ids), L, 2, 2), -1, np.int16)  # later layers' true routing: a perfect pre-gate
    for h in (1, 2):
        pregate[:, : L - h, h - 1] = ids[:, h:]
    reqs = requests_from_arrays(ids, seq, dec, pregate_NLHK=pregate)
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    shape = load_shape(MIXTRAL)
    m = {
        p: simulate(reqs, shape, hw, SimConfig(policy=p, device_budget=0.2, warmup_requests=1)).metrics
        for p in ("lru", "pregate", "moecxl")
    }
    assert m["lru"]["hits"] == 0 and m["pregate"]["hits"] == 0  # same predictions, recency eviction
    assert m["moecxl"]["hits"] > 0.5 * (m["moecxl"]["hits"] + m["moecxl"]["misses"])
    assert m["moecxl"]["tpot_s"] < 0.7 * min(m["lru"]["tpot_s"], m["pregate"]["tpot_s"])


def test_belady_eviction_without_prefetch_sees_the_future_and_bounds_demand_caching():
    """Belady's farthest-next-use eviction, demand fetches only: no causal eviction gets more hits."""
    import dataclasses

    from moecxl.runtime.policies import get_policy

    rng = np.random.default_rng(2)
    S, T, M, L = 3, 4, 16, 32
    pop = rng.dirichlet(np.full(8, 0.5), size=L)  # skewed per-layer popularity, independent tokens
    ids = np.array(
        [[rng.choice(8, 2, replace=False, p=pop[m]) for m in range(L)] for _ in range(S * (T + M))]
    )
    reqs = requests_from_arrays(ids, np.repeat(np.arange(S), T + M), np.tile(np.arange(T + M) >= T, S))
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    shape = load_shape(MIXTRAL)
    demand = {  # eviction rules compared with prefetch off
        name: dataclasses.replace(get_policy(base), name=name, prefetch=None, horizon=0, **kw)
        for name, base, kw in [
            ("belady", "lru", {"evict": "belady"}),
            ("lru", "lru", {}),
            ("lfu", "lfu", {}),
            ("moecxl", "moecxl", {}),
        ]
    }
    m = {
        n: simulate(reqs, shape, hw, SimConfig(policy=p, device_budget=0.25)).metrics
        for n, p in demand.items()
    }
    assert m["belady"]["prefetch_issued"] == 0
    assert m["belady"]["hits"] > max(m[p]["hits"] for p in ("lru", "lfu", "moecxl"))


def test_expected_reuse_distance_orders_by_layer_distance_and_chance():
    from moecxl.runtime.policies import Reuse, expected_reuse_distance

    r = Reuse(L=4, E=4, alpha=0.5)
    for _ in range(3):
        for layer in range(4):
            r.observe(layer, [layer])  # layer l always uses expert l
    r.observe(1, [1])  # now at layer 1
    d = lambda key, prob=None: expected_reuse_distance(key, prob, r)  # noqa: E731
    assert d((2, 2)) < d((3, 3)) < d((0, 0)) < d((1, 1))  # same chance: nearer layer first
    assert d((2, 2)) < d((2, 0))  # same layer: the expert the layer keeps using
    assert d((3, 0), {(3, 0): 1.0}) < d((3, 3), {(3, 3): 0.0})  # a prediction overrides the estimate


def test_the_vectorised_reuse_distance_picks_the_pure_rules_victim():
    """The core's vectorised ranking (`reuse_distance_S`: the largest distance, ties to the earliest
    cached) picks the victim `choose_victims("predicted")` picks, over random caches, predictions and
    protected sets."""
    from moecxl.runtime.policies import EntryStats, Reuse, choose_victims, reuse_distance_S

    def farthest_reuse_slot(layer_S, expert_S, seq_S, evictable_S, prob, slot_of, r):
        if not evictable_S.any():
            return None
        dist_S = reuse_distance_S(layer_S, expert_S, evictable_S, prob, slot_of, r)
        best_S = evictable_S & (dist_S == dist_S.max())
        return int(np.argmin(np.where(best_S, seq_S, np.iinfo(np.int64).max)))

    rng = np.random.default_rng(11)
    L, E, S = 6, 8, 12
    for _ in range(50):
        r = Reuse(L, E)
        for t in range(int(rng.integers(1, 30))):
            r.observe(t % L, rng.choice(E, 2, replace=False).tolist())
        keys = [(int(k // E), int(k % E)) for k in rng.choice(L * E, S, replace=False)]
        slot_of = {k: s for s, k in enumerate(keys)}
        layer_S = np.array([k[0] for k in keys])
        expert_S = np.array([k[1] for k in keys])
        seq_S = rng.permutation(S)
        prob = {k: float(rng.random()) for k in keys if rng.random() < 0.5}
        prob.update({(int(rng.integers(L)), int(rng.integers(E))): 0.9})  # one not cached
        protect = {k for k in keys if rng.random() < 0.3}
        evictable_S = np.array([k not in protect for k in keys])
        # the pure rule scans the cache in insertion order: the engine's seq_S
        cached = {keys[s]: EntryStats(0, 1, 0) for s in np.argsort(seq_S)}
        want = choose_victims("predicted", cached, 1, protect, prob=prob, reuse=r)
        s = farthest_reuse_slot(layer_S, expert_S, seq_S, evictable_S, prob, slot_of, r)
        assert (None if s is None else keys[s]) == (want[0] if want else None)


def test_energy_per_token_counts_bytes_and_busy_time(tmp_path):
    """Energy beside latency: on-demand moves more bytes than the oracle, so it costs more per token;
    every figure in the energy file has a source, and a figure without one is refused by name."""
    from moecxl.sim.energy import EnergyError, EnergyModel, path_pj_per_bit

    em = EnergyModel.load()
    assert all(em.sources.values()) and "link_pj_per_bit.nvlink-c2c" in em.sources
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    assert path_pj_per_bit(em, hw, "cxl-d") == em.memory("cxl") + em.link("pcie5-x16")
    rng = np.random.default_rng(0)
    S, T, M = 3, 8, 6
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(S * (T + M) * 32)]).reshape(-1, 32, 2)
    reqs = requests_from_arrays(ids, np.repeat(np.arange(S), T + M), np.tile(np.arange(T + M) >= T, S))
    shape = load_shape(MIXTRAL)
    e = {}
    for pol in ("on_demand", "oracle"):
        m = simulate(reqs, shape, hw, SimConfig(policy=pol, warmup_requests=1), energy=em).metrics
        moved = sum(m["bytes_by_tier"].values())
        parts = m["energy"]["j_by_component"]
        assert parts["expert_copies"] == pytest.approx(
            moved * 8 * path_pj_per_bit(em, hw, "cxl-d") * 1e-12, rel=0.05
        )
        assert m["energy"]["j_per_token"] == pytest.approx(sum(parts.values()) / m["tokens"])
        e[pol] = m["energy"]["j_per_token"]
    assert e["oracle"] < e["on_demand"]
    bad = tmp_path / "energy.yaml"
    bad.write_text(
        "memory_pj_per_bit: {dram: {value: 20}}\nlink_pj_per_bit: {}\ngpu_watts: {}\ncpu_watts: {busy: {value: 1, source: x}}\n"
    )
    with pytest.raises(EnergyError, match="memory_pj_per_bit.dram has no 'source'"):
        EnergyModel.load(bad)


def test_reuse_learns_the_layers_a_pass_visits():
    """A Switch decode visits only the decoder's sparse layers: the encoder's experts are not 'next'."""
    from moecxl.runtime.policies import Reuse

    r = Reuse(L=4, E=2)
    for layer in (0, 1, 2, 3, 2, 3, 2):  # prefill passes all four layers, decode only layers 2 and 3
        r.observe(layer, [0])
    assert r.layers_until(3) == 1 and r.layers_until(2) == 2
    assert r.layers_until(0) == r.layers_until(1) == 1000 * 4  # not in this pass: evicted first


def test_reuse_remembers_popular_experts_and_recent_ones():
    """Two memories: a burst of another expert does not erase a long-popular one (a top-1-of-128 router
    re-uses experts over tens of tokens), and a fresh expert still counts as likely (temporal locality)."""
    from moecxl.runtime.policies import Reuse

    both, short = Reuse(L=1, E=4), Reuse(L=1, E=4, alpha=0.2)
    for r in (both, short):
        for t in range(200):
            r.observe(0, [0] if t % 4 else [2])  # expert 0 three visits in four
        for _ in range(12):
            r.observe(0, [1])  # then a burst of expert 1
    assert short.p_LE[0, 0] < 0.1 < 0.4 < both.p_LE[0, 0]  # recency alone has forgotten expert 0
    assert both.p_LE[0, 1] >= short.p_LE[0, 1] > 0.9  # the burst is still recent
    assert both.p_LE[0, 3] < 0.01  # never used


def test_a_needed_expert_in_flight_is_computed_on_the_host_when_its_copy_would_land_later():
    """Mixtral over CXL-D: a prefetched copy lands ~26 decode layers after it was issued. With host
    compute, the needed expert is computed where it lives (DRAM, near-data homes) instead of waited for,
    and the copy still lands for later tokens; without it, the layer waits."""
    import dataclasses

    from moecxl.runtime.policies import get_policy

    rng = np.random.default_rng(3)
    S, T, M, L = 2, 4, 8, 32
    ids = np.array([[rng.choice(8, 2, replace=False) for _ in range(L)] for _ in range(S * (T + M))])
    reqs = requests_from_arrays(ids, np.repeat(np.arange(S), T + M), np.tile(np.arange(T + M) >= T, S))
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    shape = load_shape(MIXTRAL)
    oracle = get_policy("oracle")
    oracle_nd = dataclasses.replace(oracle, name="oracle_nd", exact=False, host_compute=True)
    fetch = simulate(reqs, shape, hw, SimConfig(policy=oracle, warmup_requests=1)).metrics
    nd = simulate(reqs, shape, hw, SimConfig(policy=oracle_nd, warmup_requests=1)).metrics
    assert fetch["inflight_host_computed"] == 0
    assert nd["inflight_host_computed"] > 0
    assert nd["tpot_s"] < fetch["tpot_s"]
    # a copy computed on the host while in flight counts as used once, not again when it lands
    assert 0 < nd["prefetch_precision"] <= 1.0


def test_when_staging_is_full_the_cpu_computes_its_experts_before_waiting_for_a_copy():
    """Host compute or fetch per miss at batch 16 with two staging buffers: a fetch that must wait for a copy to land does
    not hold up the host experts already chosen in that visit; the CPU computes them first (they
    appear before the blocked fetch, at the visit's start), then the copy lands."""
    import dataclasses

    from moecxl.runtime.policies import get_policy

    rng = np.random.default_rng(5)
    S, T, M, L, E, K = 32, 4, 4, 16, 32, 4  # the 32-expert top-4 model: copies close to host compute
    ids = np.array([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(S * (T + M))])
    reqs = requests_from_arrays(
        ids, np.repeat(np.arange(S), T + M), np.tile(np.arange(T + M) >= T, S), batch=16
    )
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    three_way = dataclasses.replace(
        get_policy("on_demand"), name="on_demand_nd", exact=False, host_compute=True
    )
    cfg = SimConfig(policy=three_way, device_budget=0.25, max_inflight=2, record_events=True)
    events = simulate(reqs, load_shape("configs/models/custom-32e-top4-full.yaml"), hw, cfg).events
    visits, cur = [], []
    for e in events:
        if e["kind"] in ("fetch", "host_compute", "hit"):
            if cur and e.get("layer") != cur[-1].get("layer"):
                visits.append(cur)
                cur = []
            cur.append(e)
    host_then_fetch = [
        v
        for v in visits
        if any(
            a["kind"] == "host_compute" and b["kind"] == "fetch" for i, a in enumerate(v) for b in v[i + 1 :]
        )
    ]
    assert host_then_fetch  # host experts computed before a fetch blocked on staging
    for v in host_then_fetch:
        first_host = next(e for e in v if e["kind"] == "host_compute")
        later = [e for e in v[v.index(first_host) :] if e["kind"] == "fetch"]
        assert all(f["t_s"] >= first_host["t_s"] for f in later)


def test_a_prefill_needing_more_experts_than_the_cache_is_simulated_in_groups():
    """Mixtral-8x7B with room for 3 experts: a 48-token prefill touches all 8 of a layer. The simulator
    processes it in groups (as the engine does; it refused before) and charges one weight pass per group,
    at least the one-pass roofline."""
    from moecxl.runtime.visit import Visit, restrict
    from moecxl.sim.costmodel import group_s

    shape = load_shape("configs/models/mixtral-8x7b.yaml")
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    v = Visit("prefill", 0, 0, tuple(range(8)), (16,) * 8, (), 64, 64, 1)
    groups = [restrict(v, (0, 1, 2)), restrict(v, (3, 4, 5)), restrict(v, (6, 7))]
    parts = group_s(shape, hw.gpu, v, groups)
    assert len(parts) == 3 and sum(parts) >= visit_s(shape, hw.gpu, 64, 8, 64, 1, True) * (1 - 1e-9)
    rng = np.random.default_rng(0)
    ids_NLK = np.stack([rng.permutation(8)[:2] for _ in range(64 * 32)]).reshape(64, 32, 2)
    is_decode_N = np.arange(64) >= 48  # one sequence: a 48-token prompt, 16 decoded tokens
    reqs = requests_from_arrays(ids_NLK, np.zeros(64, np.int64), is_decode_N)
    small = simulate(reqs, shape, hw, SimConfig(policy="lru", device_budget=0.02))  # 5 experts' bytes
    large = simulate(reqs, shape, hw, SimConfig(policy="lru", device_budget=0.6))
    assert (
        small.metrics["ttft_s"] >= large.metrics["ttft_s"]
        and small.metrics["tpot_s"] > large.metrics["tpot_s"]
    )


def test_the_simulator_refuses_host_compute_where_the_engine_does():
    """GPT-OSS experts (biases, clamps, MXFP4 bytes) are outside the host kernel: the engine refuses
    moecxl_nd on them, so the simulator does too, naming the policy and the model; copying policies run."""
    from moecxl.runtime.policies import get_policy
    from moecxl.sim.simulate import SimError

    assert load_shape(MIXTRAL).host_kernel and load_shape("configs/models/deepseek-v3.yaml").host_kernel
    shape = load_shape("configs/models/gpt-oss-20b.yaml")
    assert not shape.host_kernel
    rng = np.random.default_rng(0)
    ids = np.array([[rng.choice(shape.E, shape.K, replace=False) for _ in range(shape.L)] for _ in range(12)])
    reqs = requests_from_arrays(ids, np.repeat(np.arange(2), 6), np.tile(np.arange(6) >= 2, 2))
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    with pytest.raises(SimError, match=r"policy 'moecxl_nd' computes misses on the host.*cannot compute"):
        simulate(reqs, shape, hw, SimConfig(policy=get_policy("moecxl_nd")))
    assert simulate(reqs, shape, hw, SimConfig(policy=get_policy("lru"))).metrics["tpot_s"] > 0
