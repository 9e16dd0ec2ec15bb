"""Lock-step parity: the engine on a virtual clock and the simulator take the same actions.

Both run `runtime.core.DecisionCore`; the engine carries its actions out with real copies (landing at
the `LinkClock`'s time) and host compute, the simulator books them. On the same routing, compute time
per visit and hardware, every action (hit, fetch, prefetch, eviction, host computation, re-homing,
fault) comes in the same order, with the same source tier, for every policy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flax import nnx

from moecxl.generate import generate
from moecxl.memory import Hardware
from moecxl.memory.kerneltable import KernelTable
from moecxl.memory.tiers import Fault
from moecxl.model import MoEDecoder
from moecxl.runtime.engine import OffloadEngine
from moecxl.runtime.metrics import CoreMetrics
from moecxl.runtime.policies import POLICIES
from moecxl.sim.costmodel import shape_of
from moecxl.sim.predict import pregate_tops_for_ids
from moecxl.sim.simulate import SimConfig, simulate
from moecxl.sim.workload import activation_matrix, requests_from_generate
from tests.conftest import tiny_config

COMPUTE_S, HEAD_S, SCALE = 2e-4, 1e-4, 0.05  # virtual seconds; copies of Mixtral-width experts, scaled
NEW_TOKENS = 6
ACTIONS = ("hit", "fetch", "prefetch", "evict", "host_compute", "rehome", "offline", "online", "migrate")


def _actions(events):
    return [
        (e["kind"], e.get("layer"), e.get("expert"), e.get("tier"), round(e["t_s"], 9))
        for e in events
        if e["kind"] in ACTIONS
    ]


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_layers=4, num_experts=6, top_k=2)
    model = MoEDecoder(cfg, rngs=nnx.Rngs(3))
    target = cfg.replace(hidden_size=4096, intermediate_size=14336, dtype="bfloat16", name="mixtral-width")
    runs = {}
    for batch in (1, 2):
        prompt = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, 7))
        ref = generate(model, prompt, max_new_tokens=NEW_TOKENS)
        full = np.concatenate([prompt, ref.tokens[:, :-1]], axis=1)
        reqs = requests_from_generate(ref, pregate_NLHK=pregate_tops_for_ids(model, full, 2))
        runs[batch] = (prompt, ref, reqs)
    return model, target, runs


class _Recorded:
    """A predictor whose probabilities were recorded once (from a learned or any other predictor) and
    are replayed visit by visit: what the simulator replays when traces carry stored predictions."""

    def __init__(self, inner):
        self.inner, self.log = inner, {}

    def candidates(self, visit, layers, features):
        at = (visit.phase, visit.step, visit.layer)
        if at not in self.log:  # the first run records, the second replays
            self.log[at] = self.inner(visit, layers)
        return self.log[at]


def _made_up_predictor(E):
    rng = np.random.default_rng(7)

    def predict(visit, layers):
        return sorted(
            (((layer, e), float(p)) for layer in layers for e, p in enumerate(rng.dirichlet(np.ones(E)))),
            key=lambda c: -c[1],
        )[: 2 * len(layers)]

    return predict


# A host kernel slower than the profile's host (2 GB/s at 1 token, bf16): its own time is the floor.
SLOW_KERNEL = KernelTable({("bfloat16", 1): 2.0, ("bfloat16", 16): 1.0}, read_gbps=30.0, source="test")


def _profile(name: str) -> Hardware:
    if name == "one-cxl":
        return Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    if name == "one-cxl-slow-kernel":
        return Hardware.from_yaml("configs/hardware/h100-cxl.yaml").with_host_kernel(SLOW_KERNEL)
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")
    if name == "four-cxl-fault":  # a device fails on the 2nd decode step, returns on the 5th
        hw = replace(hw, faults=(Fault("cxl-b", 2, 5),))
    return hw


def _run(tiny, policy: str, profile: str, budget: float, batch: int, batch_copies: bool = False):
    model, target, runs = tiny
    prompt, ref, reqs = runs[batch]
    hw = _profile(profile)
    predictor = sim_predictor = None
    spec = POLICIES.get(policy)
    if policy == "moecxl_learned":
        spec = replace(POLICIES["moecxl"], name="moecxl_learned", prefetch="predictor")
        predictor = _Recorded(_made_up_predictor(model.cfg.num_experts))
        sim_predictor = predictor
    L, E = len(ref.expert_ids), model.cfg.num_experts
    library = [activation_matrix(reqs[0], L, E)] if spec.prefetch == "eam" else None
    # Replication on four devices; striping is checked by the wall-clock tests only: the engine stripes
    # its own (small) experts at page granularity, the simulator the target's, so the sets can differ.
    replicated = profile != "one-cxl"
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy=spec,
        device_budget=budget,
        time_scale=SCALE,
        target_model=target,
        record_events=True,
        trace=ref if spec.needs_future else None,
        eam_library=library,
        predictor=predictor,
        quality_budget=0.5 if spec.host_compute else 0.0,
        lowp_threshold=0.6,
        clock="virtual",
        compute_s=COMPUTE_S,
        head_s=HEAD_S,
        batch_copies=batch_copies,
    )
    if replicated:
        eng.replicate(3)
    try:
        res = generate(model, prompt, max_new_tokens=NEW_TOKENS, engine=eng)
    finally:
        eng.close()
    cfg = SimConfig(
        policy=spec,
        device_budget=budget,
        time_scale=SCALE,
        compute_s=COMPUTE_S,
        head_s=HEAD_S,
        record_events=True,
        quality_budget=0.5 if spec.host_compute else 0.0,
        lowp_threshold=0.6,
        replicate_hot=3 if replicated else 0,
        placement="near_data" if spec.host_compute else "uniform",
        batch_copies=batch_copies,
    )
    sim = simulate(reqs, shape_of(target), hw, cfg, eam_library=library or (), predictor=sim_predictor)
    return res, eng, sim


LOCKSTEP_POLICIES = [*POLICIES, "moecxl_learned"]
CASES = [
    # every policy on one CXL device; a sample of budgets and batches
    *[(p, "one-cxl", (0.4, 0.6)[i % 2], 1 + i % 2) for i, p in enumerate(LOCKSTEP_POLICIES)],
    # four devices with replication, and one failing mid-run
    *[(p, "four-cxl", 0.5, 2) for p in ("lru", "moecxl_nd")],
    *[(p, "four-cxl-fault", 0.5, 1) for p in ("moecxl", "moecxl_host")],
    # the host kernel's measured time as the floor of the host's (engine and simulator alike)
    *[(p, "one-cxl-slow-kernel", 0.4, 2) for p in ("moecxl_nd", "moecxl_host")],
    # a budget of 4 slots for prompts needing 5-6 experts per layer: prefill processed in groups
    *[(p, "one-cxl", 0.25, 2) for p in ("lru", "oracle", "moecxl_nd", "mixtral_offloading")],
]


@pytest.mark.parametrize("policy,profile,budget,batch", CASES)
def test_engine_and_simulator_take_the_same_actions(tiny, policy, profile, budget, batch):
    res, eng, sim = _run(tiny, policy, profile, budget, batch)
    got, want = _actions(eng.events), _actions(sim.events)
    assert len(got) > 10
    assert any(a[0] in ("fetch", "prefetch") for a in got)
    assert got == want
    em, sm = res.metrics, sim.metrics
    assert set(CoreMetrics.__annotations__) <= set(em) & set(sm)  # one schema: the core's keys in both
    compared = 0
    for k, kind in CoreMetrics.__annotations__.items():
        kind = getattr(kind, "__forward_arg__", kind)  # a TypedDict keeps its annotations as ForwardRefs
        # byte counts are each side's own expert bytes (the engine's tiny experts, the simulator's
        # emulated ones) and "hardware" names each side's profile; counts, choices and flags must agree
        if kind in ("int", "dict", "bool") and "bytes" not in k and k != "distribution":
            assert em[k] == sm[k], k
            compared += 1
    assert compared > 10
    assert em["timing"] == "virtual"
    if profile == "four-cxl-fault":
        assert [f["state"] for f in em["faults"]] == ["offline", "online"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", LOCKSTEP_POLICIES)
@pytest.mark.parametrize("profile", ["one-cxl", "four-cxl", "four-cxl-fault"])
@pytest.mark.parametrize("budget,batch", [(0.4, 1), (0.7, 2)])
def test_every_policy_profile_budget_and_batch_in_lockstep(tiny, policy, profile, budget, batch):
    res, eng, sim = _run(tiny, policy, profile, budget, batch)
    assert _actions(eng.events) == _actions(sim.events)


def test_a_slow_host_kernel_shows_in_the_host_only_tpot(tiny):
    """The same run with the kernel slower than the profile's host: host-only decode slows down (both
    executors charge the kernel's time, so they stay in lock-step while doing it)."""
    fast = _run(tiny, "moecxl_host", "one-cxl", 0.4, 1)
    slow = _run(tiny, "moecxl_host", "one-cxl-slow-kernel", 0.4, 1)
    for res, _, sim in (fast, slow):
        assert res.metrics["host_compute_s"] == pytest.approx(sim.metrics["host_compute_s"])
    assert slow[0].metrics["host_compute_s"] > 2 * fast[0].metrics["host_compute_s"]
    assert slow[2].metrics["tpot_s"] > 2 * fast[2].metrics["tpot_s"]  # the virtual clock's TPOT


BATCHED = [("lru", "one-cxl", 0.4, 2), ("moecxl", "four-cxl-fault", 0.5, 1)]  # the rest in the slow set
BATCHED_SLOW = [
    ("pregate", "one-cxl", 0.4, 1),
    ("moecxl_nd", "one-cxl", 0.4, 2),
    ("moecxl_nd", "four-cxl", 0.5, 2),
]


def _check_batched_lockstep(tiny, policy, profile, budget, batch):
    res, eng, sim = _run(tiny, policy, profile, budget, batch, batch_copies=True)
    assert _actions(eng.events) == _actions(sim.events)
    em, sm = res.metrics, sim.metrics
    assert em["batch_copies"] and sm["batch_copies"]
    for k in ("transfers", "experts_per_transfer", "max_experts_per_transfer", "misses", "prefetch_issued"):
        assert em[k] == sm[k], k
    if profile == "one-cxl" and not POLICIES[policy].host_compute:  # a visit's misses share one device
        assert em["max_experts_per_transfer"] > 1 and em["transfers"] < em["misses"] + em["prefetch_issued"]


@pytest.mark.parametrize("policy,profile,budget,batch", BATCHED)
def test_batched_copies_keep_the_engine_and_the_simulator_in_lockstep(tiny, policy, profile, budget, batch):
    """Copies issued together from one tier go as one transfer in both executors: the same actions at
    the same times and the same transfers (several experts in one where they share a device)."""
    _check_batched_lockstep(tiny, policy, profile, budget, batch)


@pytest.mark.slow
@pytest.mark.parametrize("policy,profile,budget,batch", BATCHED_SLOW)
def test_more_policies_with_batched_copies_in_lockstep(tiny, policy, profile, budget, batch):
    _check_batched_lockstep(tiny, policy, profile, budget, batch)
