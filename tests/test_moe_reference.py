"""The fast expert dispatch paths against the slow loop reference in `tests/reference_moe.py`."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecxl.model.expert_format as expert_format_mod
import moecxl.model.experts as experts_mod
from moecxl.model.experts import moe_blocked, moe_ffn, moe_unique
from moecxl.model.router import softmax_topk
from tests.reference_moe import reference_moe, reference_route

# jit: one compile per shape (eager dispatch compiles every primitive separately, which is slower)
STRATEGIES = {"unique": jax.jit(moe_unique), "blocked": jax.jit(moe_blocked)}


def problem(seed, N, K, E, D, F, gated=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
    w = rng.random((N, K)).astype(np.float32)
    ins = tuple(rng.standard_normal((E, D, F)).astype(np.float32) / D**0.5 for _ in range(2 if gated else 1))
    out = rng.standard_normal((E, F, D)).astype(np.float32) / F**0.5
    return x, ids, w, ins, out


def run(fn, x, ids, w, ins, out, slot_E=None):
    """Call a strategy on jax arrays; with `slot_E`, the slot arrays hold expert e at slot_E[e]."""
    if slot_E is None:
        slot_E = np.arange(out.shape[0], dtype=np.int32)
    inv = np.argsort(slot_E)  # slot -> expert
    ins = tuple(jnp.asarray(a[inv]) for a in ins)
    y = fn(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), ins, jnp.asarray(out[inv]), jnp.asarray(slot_E))
    return np.asarray(y, np.float64)


def close(y, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(y, ref, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize(
    "N,K,E,gated", [(1, 1, 1, True), (1, 2, 8, False), (5, 3, 7, True), (70, 4, 5, True), (33, 1, 64, False)]
)
def test_strategy_matches_reference(strategy, N, K, E, gated):
    x, ids, w, ins, out = problem(N * 100 + K * 10 + E, N, K, E, D=12, F=10, gated=gated)
    close(run(STRATEGIES[strategy], x, ids, w, ins, out), reference_moe(x, ids, w, ins, out))


@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 80),
    E=st.integers(1, 9),
    k=st.integers(1, 4),
    strategy=st.sampled_from(list(STRATEGIES)),
)
@settings(max_examples=8, deadline=None)
def test_strategy_matches_reference_random(seed, N, E, k, strategy):
    K = min(k, E)
    x, ids, w, ins, out = problem(seed, N, K, E, D=8, F=6)
    slot_E = np.random.default_rng(seed).permutation(E).astype(np.int32)  # experts in shuffled slots
    close(run(STRATEGIES[strategy], x, ids, w, ins, out, slot_E), reference_moe(x, ids, w, ins, out))


@pytest.mark.parametrize("N", [4, 100])  # both sides of UNIQUE_MAX_TOKENS
def test_moe_ffn_dispatch_matches_reference(N):
    x, ids, w, ins, out = problem(N, N, 2, 6, D=8, F=6)
    y = moe_ffn(
        jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), tuple(map(jnp.asarray, ins)), jnp.asarray(out)
    )
    close(np.asarray(y, np.float64), reference_moe(x, ids, w, ins, out))


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_matches_reference(normalize):
    logits = np.random.default_rng(0).standard_normal((20, 7)).astype(np.float32)
    w, ids, keep = softmax_topk(jnp.asarray(logits), 3, normalize)
    w_ref, ids_ref = reference_route(logits, 3, normalize)
    np.testing.assert_array_equal(np.asarray(ids), ids_ref)
    np.testing.assert_allclose(np.asarray(w), w_ref, atol=1e-6)
    assert np.asarray(keep).all()


def bf16_round(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


@contextlib.contextmanager
def large_expert_thresholds(gather_bytes: int = 1):
    """The step's size thresholds lowered so tiny shapes take the large-expert route (`gather_bytes` per
    scan step, bf16 read as stored). JAX caches traces across `jax.jit` wrappers and the thresholds are
    read while tracing, so the caches are cleared on the way in and out."""
    saved = experts_mod.GATHER_BYTES, expert_format_mod.WIDEN_MAX_BYTES
    experts_mod.GATHER_BYTES, expert_format_mod.WIDEN_MAX_BYTES = gather_bytes, 0
    jax.clear_caches()
    try:
        yield
    finally:
        experts_mod.GATHER_BYTES, expert_format_mod.WIDEN_MAX_BYTES = saved
        jax.clear_caches()


@pytest.fixture(params=["small", "large"])
def regime(request):
    """Small experts: the step gathers them all and keeps XLA's own einsum. Large ones: one expert per
    scan step, bf16 read as stored."""
    if request.param == "small":
        yield request.param
        return
    with large_expert_thresholds():
        yield request.param


def fresh(strategy):
    return jax.jit({"unique": moe_unique, "blocked": moe_blocked}[strategy])  # traced under the regime


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("N", [1, 3, 70])
def test_bf16_experts_with_float32_activations_are_float32_accurate(strategy, N, regime):
    """bf16 weights against float32 activations: the float32 result for those bf16 weights (the hi + lo
    split of x loses ~2^-17 of it), not a bf16-rounded one."""
    x, ids, w, ins, out = problem(7 + N, N, 2, 6, D=16, F=12)
    ins, out = tuple(bf16_round(a) for a in ins), bf16_round(out)
    to_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    y = fresh(strategy)(
        jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), tuple(map(to_bf16, ins)), to_bf16(out),
        jnp.arange(6, dtype=jnp.int32),
    )  # fmt: skip
    assert y.dtype == jnp.float32
    ref = reference_moe(x, ids, w, ins, out)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=5e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_bf16_experts_with_bf16_activations_within_bf16_rounding(strategy, regime):
    x, ids, w, ins, out = problem(11, 5, 2, 6, D=16, F=12)
    x, ins, out = bf16_round(x), tuple(bf16_round(a) for a in ins), bf16_round(out)
    to_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    y = fresh(strategy)(
        to_bf16(x), jnp.asarray(ids), jnp.asarray(w), tuple(map(to_bf16, ins)), to_bf16(out),
        jnp.arange(6, dtype=jnp.int32),
    )  # fmt: skip
    ref = reference_moe(x, ids, w, ins, out)
    # bf16 g, u, h and y: a few roundings of 2^-8 each
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=4 * 2**-8 * np.abs(ref).max(), rtol=0)


def engine_step_temp_bytes(N, x_dtype, D, F, E=8, C=8, K=2) -> int:
    """XLA's compiled working memory of the expert step over engine-style slots (bf16 as uint16 bits)."""
    S = jax.ShapeDtypeStruct
    args = (
        S((N, D), x_dtype), S((N, K), jnp.int32), S((N, K), jnp.float32),
        (S((C, D, F), jnp.uint16), S((C, D, F), jnp.uint16)), S((C, F, D), jnp.uint16), S((E,), jnp.int32),
    )  # fmt: skip
    step = jax.jit(moe_ffn, static_argnames=("fmt", "dtype"))
    return step.lower(*args, dtype=jnp.bfloat16).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("N", [1, 8, 100])  # decode, a few tokens (unique), prefill (blocked)
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_large_experts_step_holds_one_expert_at_a_time(N, x_dtype):
    """Experts past GATHER_BYTES (the thresholds lowered to one expert here): the step over the engine's
    slots needs about one expert of working memory whatever the number of experts it runs: no gathered
    copy of every needed expert, no float32 copy of any (XLA's compiled memory analysis)."""
    D, F = 512, 1024
    expert_bytes = 3 * D * F * 2
    activations = 2 * N * 2 * (D + 2 * F) * 4  # rows, blocks, hidden and per-expert outputs (float32)
    with large_expert_thresholds(expert_bytes):
        temp = engine_step_temp_bytes(N, x_dtype, D, F)
    assert temp <= 1.25 * expert_bytes + activations, (temp, expert_bytes)


def test_a_mixtral_expert_step_holds_one_expert():
    """At Mixtral-8x7B's widths (352 MB experts) and the shipped thresholds: 8 tokens over 8 slots hold
    one expert's bf16 rows (was 5.6 GB: every routed expert gathered and widened to float32)."""
    D, F = 4096, 14336
    temp = engine_step_temp_bytes(8, jnp.bfloat16, D, F)
    assert temp <= 1.1 * 3 * D * F * 2, temp


def test_small_experts_run_as_one_batched_step():
    """Under GATHER_BYTES the step gathers its experts at once (no loop): a small model's arithmetic."""
    S = jax.ShapeDtypeStruct
    args = (S((4, 16), jnp.float32), S((4, 2), jnp.int32), S((4, 2), jnp.float32),
            (S((6, 16, 12), jnp.float32),) * 2, S((6, 12, 16), jnp.float32))  # fmt: skip
    assert "while" not in jax.jit(moe_ffn).lower(*args).as_text()
    with large_expert_thresholds():  # and the large-expert route is a loop (the thresholds take effect)
        assert "while" in jax.jit(moe_ffn).lower(*args).as_text()


def test_resident_bf16_decode_holds_its_distinct_experts_once():
    """A resident bf16 bank (values, not bits) of large experts at decode: the U distinct experts as stored
    and one more, never float32 copies of them (XLA:CPU would widen a bf16 slice taken in a loop)."""
    D, F, E, K = 512, 1024, 8, 2
    expert_bytes = 3 * D * F * 2
    S = jax.ShapeDtypeStruct
    args = (
        S((1, D), jnp.bfloat16), S((1, K), jnp.int32), S((1, K), jnp.float32),
        (S((E, D, F), jnp.bfloat16), S((E, D, F), jnp.bfloat16)), S((E, F, D), jnp.bfloat16),
    )  # fmt: skip
    with large_expert_thresholds(expert_bytes):
        temp = jax.jit(moe_ffn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp <= (K + 1.25) * expert_bytes, (temp, expert_bytes)


@pytest.mark.parametrize("N", [1, 7, 100])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_engine_slots_as_bits_are_bit_identical_to_resident_bf16_experts(N, x_dtype, regime):
    """The engine's uint16 slots (experts in shuffled slots) and a resident bf16 bank take different
    routes through the step on XLA:CPU; the outputs are the same to the last bit."""
    x, ids, w, ins, out = problem(N, N, 2, 8, D=16, F=24)
    ins, out = tuple(jnp.asarray(a, jnp.bfloat16) for a in ins), jnp.asarray(out, jnp.bfloat16)
    x = jnp.asarray(x, x_dtype)
    perm = np.random.default_rng(N).permutation(8)
    inv = np.argsort(perm)  # slot -> expert
    bits = lambda a: jax.lax.bitcast_convert_type(a[inv], jnp.uint16)  # noqa: E731
    resident = jax.jit(moe_ffn)(x, jnp.asarray(ids), jnp.asarray(w), ins, out)
    engine = jax.jit(moe_ffn, static_argnames=("fmt", "dtype"))(
        x, jnp.asarray(ids), jnp.asarray(w), tuple(map(bits, ins)), bits(out), jnp.asarray(perm, jnp.int32),
        dtype=jnp.bfloat16,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(engine), np.asarray(resident))
