"""Batched copies: the copies the decision core issues together from one tier go as one transfer.

One booking on the link clock (the fixed latency and per-copy overhead paid once), one job on the tier's
worker moving the list with one `jax.device_put`, every expert of the batch landing at its done time.
Batching changes when experts land, never what the model computes. (Engine and simulator in lock-step
with batching on: tests/test_lockstep.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import moecxl
from moecxl.generate import generate
from moecxl.memory import Hardware
from moecxl.memory.store import HostStore
from moecxl.memory.tiers import copy_time_s
from moecxl.memory.transfer import LinkClock, TransferEngine
from moecxl.model import MoEDecoder
from moecxl.runtime.engine import OffloadEngine
from moecxl.sim.costmodel import load_shape
from moecxl.sim.simulate import SimConfig, simulate
from moecxl.sim.workload import requests_from_arrays
from tests.conftest import tiny_config

EXPERT_BYTES = 17_301_504  # one DeepSeek-V2-Lite expert in bf16 (3 x 2048 x 1408 x 2 bytes)
K = 4


@pytest.fixture(scope="module")
def hw():
    return Hardware.from_yaml("configs/hardware/h100-cxl.yaml")


@pytest.mark.parametrize("serial_overhead", [False, True])
def test_a_batch_books_its_summed_bytes_and_one_fixed_cost(hw, serial_overhead):
    clock = LinkClock(hw, serial_overhead=serial_overhead)
    done = [clock.reserve("cxl-d", EXPERT_BYTES, 0.0, joins=i > 0)[1] for i in range(K)][-1]
    assert done == pytest.approx(copy_time_s("cxl-d", K * EXPERT_BYTES, hw), rel=1e-12)


def test_separate_copies_pay_the_overhead_per_copy_only_where_it_holds_the_link(hw):
    """The profile's fixed cost is latency: K copies queued on one device finish at K bytes-times plus
    one fixed cost, as a batch does. Held by the link (the sensitivity), each copy pays it."""
    overlapped = LinkClock(hw)
    serial = LinkClock(hw, serial_overhead=True)
    last = [overlapped.reserve("cxl-d", EXPERT_BYTES, 0.0)[1] for _ in range(K)][-1]
    last_serial = [serial.reserve("cxl-d", EXPERT_BYTES, 0.0)[1] for _ in range(K)][-1]
    one_batch = copy_time_s("cxl-d", K * EXPERT_BYTES, hw)
    overhead_s = hw.tier("cxl-d").copy_overhead_us * 1e-6
    assert last == pytest.approx(one_batch, rel=1e-12)
    assert last_serial == pytest.approx(one_batch + (K - 1) * overhead_s, rel=1e-12)


def test_a_batched_transfer_lands_every_expert_at_the_batch_end_with_the_stored_bytes(tiny_model, hw):
    keys = [(0, e) for e in range(K)]
    store = HostStore(tiny_model, hw, dict.fromkeys(keys, "cxl-d"))
    transfers = TransferEngine(store, hw, emulate=True, virtual=True)
    transfers.emulated_bytes = EXPERT_BYTES
    try:
        parts = [transfers.submit(k, "cxl-d", batched=True) for k in keys]
        assert transfers.flush_batches() == [K]  # one job on cxl-d's worker
        batch_s = copy_time_s("cxl-d", K * EXPERT_BYTES, hw)
        assert [t.expected_done_s for t in parts] == pytest.approx([batch_s] * K, rel=1e-12)
        for k, t in zip(keys, parts):
            np.testing.assert_array_equal(np.asarray(t.result()), np.asarray(store.master(k)))
        assert len({t.copied_s for t in parts}) == 1  # moved together
        alone = transfers.submit((0, 0), "cxl-d")  # on its own, queued behind the batch's bytes
        assert alone.expected_done_s == pytest.approx(copy_time_s("cxl-d", (K + 1) * EXPERT_BYTES, hw))
        assert alone.result() is not None
    finally:
        transfers.close()
        store.close()


def test_batching_changes_no_token_or_logit_of_an_exact_policy():
    """lru with batching on and off: the same tokens and logits, bit for bit (the off path is
    bit-identical to the resident model: tests/test_engine.py), fewer transfers than misses."""
    model = MoEDecoder(tiny_config(num_layers=3, num_experts=6, top_k=2), rngs=nnx.Rngs(7))
    prompt = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 6))
    runs = {}
    for batch_copies in (False, True):
        eng = OffloadEngine(model, policy="lru", device_budget=0.45, emulate=False, batch_copies=batch_copies)
        try:
            runs[batch_copies] = generate(model, prompt, max_new_tokens=5, engine=eng)
        finally:
            eng.close()
    off, on = runs[False], runs[True]
    assert np.array_equal(on.tokens, off.tokens)
    assert np.array_equal(on.logits, off.logits)  # bit-identical, not merely close
    assert off.metrics["transfers"] == off.metrics["misses"]  # lru: one copy per miss
    assert on.metrics["transfers"] < on.metrics["misses"]
    assert on.metrics["batch_copies"] and not off.metrics["batch_copies"]


def _fine_grained_requests(E: int = 64, K: int = 6, L: int = 26, prompt: int = 8, decode: int = 4):
    """Two sequences routed top-K of E at random (DeepSeek-V2-Lite's topology), as a trace would give."""
    rng = np.random.default_rng(0)
    n = 2 * (prompt + decode)
    ids_NLK = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(n)])
    seq_N = np.repeat([0, 1], prompt + decode)
    is_decode_N = np.tile(np.r_[np.zeros(prompt, bool), np.ones(decode, bool)], 2)
    return requests_from_arrays(ids_NLK, seq_N, is_decode_N)


def test_simulated_fine_grained_misses_share_transfers(hw):
    """DeepSeek-V2-Lite's shapes (64 routed experts, top-6) homed on one CXL device: a visit's misses
    go several to a transfer, at most the copies staging holds (max_inflight)."""
    shape = load_shape("configs/models/deepseek-v2-lite.yaml")
    reqs = _fine_grained_requests(shape.E, shape.K, shape.L)
    runs = {
        b: simulate(reqs, shape, hw, SimConfig(policy="lru", device_budget=0.25, batch_copies=b)).metrics
        for b in (False, True)
    }
    off, on = runs[False], runs[True]
    assert off["experts_per_transfer"] == 1.0 and off["transfers"] == off["misses"]
    assert on["experts_per_transfer"] > 2 and 1 < on["max_experts_per_transfer"] <= max(2, shape.K)
    assert on["timing"] == "simulated"


@pytest.mark.slow
def test_misses_of_a_fine_grained_model_go_several_to_a_transfer():
    """models/deepseek-topology (64 routed experts, top-6) in the engine: a prompt's layer misses many
    experts at once and they share transfers; the tokens are the resident model's."""
    model = moecxl.load("models/deepseek-topology")
    prompt = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (1, 12))
    ref = generate(model, prompt, max_new_tokens=2)
    eng = OffloadEngine(model, policy="lru", device_budget=0.2, emulate=False, batch_copies=True)
    try:
        res = generate(model, prompt, max_new_tokens=2, engine=eng)
    finally:
        eng.close()
    assert np.array_equal(res.logits, ref.logits)
    m = res.metrics
    assert m["experts_per_transfer"] > 1.2
    assert 1 < m["max_experts_per_transfer"] <= eng.max_inflight
    assert m["transfers"] < m["misses"]
