"""The offload engine: exact policies give bit-identical logits and tokens; the budget always holds."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecxl.generate import generate
from moecxl.memory import Hardware
from moecxl.memory.store import StoreError
from moecxl.model import MoEDecoder
from moecxl.runtime.core import DecisionCore
from moecxl.runtime.engine import EngineError, OffloadEngine
from moecxl.runtime.policies import POLICIES, PolicyError, get_policy
from tests.conftest import tiny_config

EXACT = [name for name, p in POLICIES.items() if p.exact]


@pytest.fixture(scope="module")
def model():
    return MoEDecoder(tiny_config(num_layers=3, num_experts=6, top_k=2), rngs=nnx.Rngs(7))


def _engine(model, policy, budget, ref=None, **kw):
    return OffloadEngine(
        model,
        policy=policy,
        device_budget=budget,
        trace=ref if get_policy(policy).needs_future else None,
        emulate=False,
        record_events=True,
        **kw,
    )


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=st.sampled_from(EXACT),
    budget=st.floats(0.45, 1.0),
    batch=st.integers(1, 3),
    prompt_len=st.integers(1, 7),
    seed=st.integers(0, 10_000),
)
def test_exact_policies_are_bit_identical_to_resident(model, policy, budget, batch, prompt_len, seed):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.cfg.vocab_size, (batch, prompt_len))
    ref = generate(model, prompt, max_new_tokens=6)
    eng = _engine(model, policy, budget, ref)
    try:
        res = generate(model, prompt, max_new_tokens=6, engine=eng)
    finally:
        eng.close()
    assert np.array_equal(res.tokens, ref.tokens)
    assert np.array_equal(res.logits, ref.logits)  # bit-identical, not merely close
    assert all(ev["device_expert_bytes"] <= eng.budget_bytes for ev in eng.events)
    assert res.metrics["exact"] and res.metrics["policy"] == policy


def test_small_budget_forces_misses_and_still_matches(model):
    prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = generate(model, prompt, max_new_tokens=10)
    eng = _engine(model, "lru", 0.45)
    res = generate(model, prompt, max_new_tokens=10, engine=eng)
    m = res.metrics
    assert m["misses"] > 0 and m["evictions"] > 0 and m["bytes_by_tier"]
    assert np.array_equal(res.logits, ref.logits)
    assert max(ev["device_expert_bytes"] for ev in eng.events) <= eng.budget_bytes
    eng.close()


def test_oracle_hits_more_than_on_demand(model):
    prompt = np.array([[5, 6, 7, 8]])
    ref = generate(model, prompt, max_new_tokens=12)
    rates = {}
    for policy in ("on_demand", "oracle"):
        eng = _engine(model, policy, 0.5, ref)
        rates[policy] = generate(model, prompt, max_new_tokens=12, engine=eng).metrics["hit_rate"]
        eng.close()
    assert rates["oracle"] > rates["on_demand"]


def test_hobbit_is_labelled_inexact_and_stays_close(model):
    prompt = np.array([[2, 7, 1, 8, 2, 8]])
    ref = generate(model, prompt, max_new_tokens=6)
    eng = _engine(model, "hobbit", 0.45, lowp_threshold=1.01)  # every miss takes the int8 copy
    res = generate(model, prompt, max_new_tokens=6, engine=eng)
    assert res.metrics["exact"] is False
    err = np.abs(res.logits[:, 0] - ref.logits[:, 0]).max() / np.abs(ref.logits[:, 0]).max()
    assert 0 < err < 0.05
    assert any(ev.get("low_precision") for ev in eng.events)
    eng.close()


def test_visibility_reports_where_experts_are(model):
    eng = _engine(model, "lru", 0.5)
    generate(model, [[1, 2, 3]], max_new_tokens=3, engine=eng)
    where = eng.where()
    assert where["device"] and sum(where["tiers"].values()) == 3 * 6
    assert {ev["kind"] for ev in eng.events} >= {"fetch", "hit"}
    eng.close()


def test_nvme_tier_reads_real_files_and_detects_corruption(model, tmp_path):
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    placement = {(m, e): "nvme" for m in range(3) for e in range(6)}
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy="lru",
        device_budget=0.5,
        emulate=False,
        placement=placement,
        nvme_dir=tmp_path,
    )
    ref = generate(model, [[4, 4, 2]], max_new_tokens=3)
    res = generate(model, [[4, 4, 2]], max_new_tokens=3, engine=eng)
    assert np.array_equal(res.logits, ref.logits)
    path = tmp_path / "experts-nvme.bin"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupted"):
        eng.store.source((0, 0))
    eng.close()


def test_budget_too_small_names_the_minimum(model):
    with pytest.raises(EngineError, match="at least"):
        OffloadEngine(model, policy="lru", device_budget=0.05, emulate=False)
    eng = _engine(model, "gpu_only", 0.35)  # 6 experts' bytes: 4 slots + 2 staging
    with pytest.raises(EngineError, match="moves whole layers.*at least"):  # the whole layer at once
        generate(model, np.arange(40)[None] % 90, max_new_tokens=2, engine=eng)
    eng.close()


GROUPED = [name for name, p in POLICIES.items() if p.exact and name not in ("gpu_only", "accelerate")]


# 40 and 80 prompt tokens: both expert-step strategies; the second for a sample in the default set
GROUPED_CASES = [(p, 1) for p in GROUPED] + [
    (p, 2) if p in ("on_demand", "lru", "moecxl", "oracle") else pytest.param(p, 2, marks=pytest.mark.slow)
    for p in GROUPED
]


@pytest.mark.parametrize("policy,batch", GROUPED_CASES)
def test_a_layer_needing_more_experts_than_the_cache_holds_is_processed_in_groups(model, policy, batch):
    """4 slots, 6 experts per prefill layer: the engine computes what is resident, evicts, fetches the
    rest (mixtral-offloading, MoE-Infinity), and the combine is the resident one: bit-identical."""
    prompt = (np.arange(40 * batch).reshape(batch, 40) * 7 + 3) % model.cfg.vocab_size
    ref = generate(model, prompt, max_new_tokens=3)
    assert min(len(np.unique(ids[:, :40])) for ids in ref.expert_ids) > 4  # more than the cache holds
    eng = _engine(model, policy, 0.35, ref)
    try:
        res = generate(model, prompt, max_new_tokens=3, engine=eng)
    finally:
        eng.close()
    assert eng.n_slots == 4
    assert np.array_equal(res.tokens, ref.tokens) and np.array_equal(res.logits, ref.logits)
    assert all(ev["device_expert_bytes"] <= eng.budget_bytes for ev in eng.events)


def test_unknown_policy_and_bad_budget(model):
    with pytest.raises(PolicyError, match="unknown policy"):
        OffloadEngine(model, policy="magic", emulate=False)
    with pytest.raises(EngineError, match="device_budget"):
        OffloadEngine(model, policy="lru", device_budget=-1, emulate=False)
    with pytest.raises(EngineError, match="trace"):
        OffloadEngine(model, policy="oracle", emulate=False)


def test_emulated_links_slow_misses_to_the_profile(model):
    hw = Hardware.from_yaml("configs/hardware/h100-pcie4-dram.yaml")
    prompt = [[1, 2, 3, 4]]
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy="on_demand",
        device_budget=0.5,
        time_scale=1.0,
        target_model=model.cfg.replace(hidden_size=4096, intermediate_size=14336, dtype="bfloat16"),
    )
    res = generate(model, prompt, max_new_tokens=3, engine=eng)
    # Each miss of a Mixtral-size expert over PCIe 4 takes >= 13 ms on the emulated clock.
    assert res.metrics["timing"] == "emulated"
    assert res.metrics["stall_s"] >= 0.9 * res.metrics["misses"] * 0.0135 / eng.max_inflight
    eng.close()


def test_fast_eviction_path_picks_what_the_pure_rule_picks():
    from moecxl.runtime.policies import EntryStats, NextUse, Policy, Reuse, choose_victims

    rng = np.random.default_rng(0)
    L, E = 4, 6
    future = [(int(rng.integers(0, L)), rng.choice(E, 2, replace=False)) for _ in range(40)]
    for rule in ("fifo", "lru", "lfu", "predicted", "belady"):
        for _ in range(100):
            eng = object.__new__(DecisionCore)  # only the state `victim` reads
            eng._rank_tag, eng._rank, eng.probs_version = None, [], 0
            eng.policy = Policy("under-test", evict=rule)
            keys = [(int(rng.integers(0, L)), int(rng.integers(0, E))) for _ in range(14)]
            cached_keys = list(dict.fromkeys(keys))
            slots = rng.permutation(20)[: len(cached_keys)]  # slot numbers unrelated to caching order
            eng.slot_of = {k: int(s) for k, s in zip(cached_keys, slots)}
            eng.slot_key = [None] * 20
            eng.slot_layer_S = np.full(20, -1, np.int64)
            eng.slot_expert_S = np.full(20, -1, np.int64)
            eng.slot_seq_S = np.zeros(20, np.int64)
            for seq, (k, s) in enumerate(eng.slot_of.items()):
                eng.slot_key[s] = k
                eng.slot_layer_S[s], eng.slot_expert_S[s] = k
                eng.slot_seq_S[s] = seq
            eng.stats = {
                k: [int(rng.integers(0, 20)), int(rng.integers(0, 5)), int(rng.integers(0, 20)), False]
                for k in eng.slot_of
            }
            eng.reuse = Reuse(L, E)
            for m in rng.integers(0, L, 7):
                eng.reuse.observe(int(m), rng.choice(E, 2, replace=False))
            eng.probs = {k: float(rng.choice([0.0, 0.5, 1.0])) for k in keys[:5]}
            next_use = NextUse(future, 12).at(int(rng.integers(0, 30))) if rule == "belady" else None
            protect = {keys[int(j)] for j in rng.integers(0, len(keys), 3)}
            cached = {k: EntryStats(*v) for k, v in eng.stats.items()}
            pure = choose_victims(
                rule, cached, 1, protect, next_use=next_use, prob=eng.probs, reuse=eng.reuse
            )
            assert eng.victim(protect, next_use) == pure[0]
            if rule != "predicted":
                continue
            # A copy lands in a free slot after the ranking was made: it is ranked in, and may go first.
            new = next(((m, e) for m in range(L) for e in range(E) if (m, e) not in eng.slot_of), None)
            free = [s for s in range(20) if eng.slot_key[s] is None]
            if new is None or not free:
                continue
            s, seq = free[0], len(eng.slot_of)
            eng.slot_of[new], eng.slot_key[s], eng.slot_seq_S[s] = s, new, seq
            eng.slot_layer_S[s], eng.slot_expert_S[s] = new
            eng.stats[new] = [0, 0, 0, False]
            eng.ranked_landing(new, s)
            cached = {k: EntryStats(*v) for k, v in eng.stats.items()}
            pure = choose_victims(rule, cached, 1, protect, prob=eng.probs, reuse=eng.reuse)
            assert eng.victim(protect) == pure[0]


@pytest.mark.parametrize("policy", ["moecxl", "moecxl_nd"])
def test_the_ranked_victims_of_a_real_run_are_the_pure_rules_victims(model, policy):
    """The engine keeps the "predicted" rule's victims ranked across a visit's evictions and landings;
    every victim it picks in a run (demand copies, prefetches, the gate, the miss decision) is the one
    `choose_victims` picks from the same state."""
    from moecxl.runtime.policies import EntryStats, choose_victims

    prompt = np.random.default_rng(3).integers(0, model.cfg.vocab_size, (3, 5))
    eng = _engine(model, policy, 0.5)
    picked = []
    fast = eng.core.victim

    def checked(skip, next_use=None, incoming=None):
        got = fast(skip, next_use, incoming)
        cached = {k: EntryStats(*eng.stats[k]) for k in eng.slot_of}
        core = eng.core
        pure = choose_victims("predicted", cached, 1, set(skip), prob=core.probs, reuse=core.reuse)
        assert got == (pure[0] if pure else None)
        picked.append(got)
        return got

    eng.core.victim = checked
    try:
        generate(model, prompt, max_new_tokens=8, engine=eng)
    finally:
        eng.close()
    assert sum(v is not None for v in picked) >= 10  # the cache was full and evicted often


@pytest.fixture(scope="module")
def model_bf16():
    return MoEDecoder(tiny_config(num_layers=3, num_experts=6, top_k=2, dtype="bfloat16"), rngs=nnx.Rngs(8))


@pytest.mark.parametrize("policy", ["lru", "moecxl", "pregate"])
def test_bfloat16_experts_are_stored_as_their_bits_and_stay_bit_identical(model_bf16, policy):
    """16-bit float slot arrays are kept as uint16 bit patterns (XLA:CPU updates those in place); the
    step bitcasts them back, so logits stay bit-identical, and `cache` shows the experts' dtype."""
    prompt = np.random.default_rng(3).integers(0, model_bf16.cfg.vocab_size, (2, 5))
    ref = generate(model_bf16, prompt, max_new_tokens=6)
    eng = _engine(model_bf16, policy, 0.5)
    try:
        res = generate(model_bf16, prompt, max_new_tokens=6, engine=eng)
        assert all(a.dtype == np.uint16 for a in eng._cache)
        assert all(a.dtype == jnp.bfloat16 for a in eng.cache)
        slot = next(iter(eng.slot_of.values()))
        key = next(iter(eng.slot_of))
        got = np.concatenate([np.asarray(a[slot]).reshape(-1) for a in eng.cache])
        want = np.asarray(eng.store.source(key)).reshape(-1)[: got.size]
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    finally:
        eng.close()
    assert res.metrics["hit_rate"] < 1.0  # copies were installed during the run
    assert np.array_equal(res.logits, ref.logits)


def test_bfloat16_experts_take_int8_copies_under_hobbit(model_bf16):
    """bfloat16 is a float format (numpy's issubdtype says otherwise): hobbit's int8 copies quantise it."""
    prompt = np.random.default_rng(3).integers(0, model_bf16.cfg.vocab_size, (1, 5))
    eng = _engine(model_bf16, "hobbit", 0.5, lowp_threshold=1.01)
    try:
        res = generate(model_bf16, prompt, max_new_tokens=4, engine=eng)
    finally:
        eng.close()
    assert res.metrics["exact"] is False and any(ev.get("low_precision") for ev in eng.events)


def test_prefetch_runs_after_the_step_is_dispatched(model):
    """`generate` calls `after_experts` once a layer's expert step is launched: the policy's prefetch
    (and installs this layer does not read) run there, timed apart from the critical path."""
    prompt = np.random.default_rng(4).integers(0, model.cfg.vocab_size, (1, 4))
    ref = generate(model, prompt, max_new_tokens=8)
    eng = _engine(model, "pregate", 0.5)
    calls = []
    inner = eng.after_experts
    eng.after_experts = lambda m: (calls.append((m, eng.core.pending is not None)), inner(m))[1]
    try:
        res = generate(model, prompt, max_new_tokens=8, engine=eng)
    finally:
        eng.close()
    assert np.array_equal(res.logits, ref.logits)
    assert len(calls) == 8 * eng.L  # once per MoE layer and step
    assert any(pending for _, pending in calls) and eng.core.pending is None
    assert res.metrics["prefetch_issued"] > 0
    assert res.metrics["control_after_us_median_decode"] is not None


def test_an_ablated_policy_spec_runs_exactly_without_its_gate(model):
    """The engine takes a PolicySpec as well as a name (the gate's-worth ablations): moecxl without its
    gate prefetches every predicted expert, gates none, and still computes exactly."""
    import dataclasses

    from moecxl.runtime.policies import get_policy

    prompt = np.random.default_rng(5).integers(0, model.cfg.vocab_size, (2, 4))
    ref = generate(model, prompt, max_new_tokens=5)
    spec = dataclasses.replace(get_policy("moecxl"), name="moecxl-nogate", gate=False)
    eng = _engine(model, spec, 0.5)
    try:
        res = generate(model, prompt, max_new_tokens=5, engine=eng)
    finally:
        eng.close()
    assert np.array_equal(res.logits, ref.logits)
    assert res.metrics["policy"] == "moecxl-nogate" and res.metrics["gated_prefetches"] == 0
    assert res.metrics["prefetch_issued"] > 0
