"""The device cache's slot arrays: how experts are stored there, installed and read by the expert step.

Jitted pure functions over the slot arrays (the engine holds the arrays): 16-bit floats kept as their
bit patterns, landed copies written in groups, int8 copies dequantised into their slot, the expert step
over the slots (plus host-computed outputs), and the pre-gate's later-router top-k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moecxl.memory.store import ExpertLayout
from moecxl.memory.transfer import dequantize_int8
from moecxl.model.experts import moe_group
from moecxl.model.moe import expert_step
from moecxl.runtime.mechanism import CoreError


def storage_dtype(dtype) -> np.dtype:
    """The slot arrays' dtype for experts of `dtype`: 16-bit floats are kept as their uint16 bit patterns.
    XLA:CPU rewrites a whole bf16 array on each in-place slot update (~0.4 ms for a small cache, growing
    with its size) but updates uint16 in place; the bitcasts back are exact and free inside the step."""
    dt = np.dtype(dtype)
    return np.dtype(np.uint16) if jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 2 else dt


def _stored(x, stored_dtype, compute_dtype):
    """`x` as the slot arrays store it (see `storage_dtype`)."""
    if x.dtype == stored_dtype:
        return x
    if stored_dtype == np.uint16 and np.dtype(compute_dtype) != np.uint16:
        return jax.lax.bitcast_convert_type(x.astype(compute_dtype), jnp.uint16)
    return x.astype(stored_dtype)


def _computed(a, compute_dtype):
    """A slot array read back in the experts' dtype (a bitcast of the stored bits)."""
    return a if a.dtype == compute_dtype else jax.lax.bitcast_convert_type(a, compute_dtype)


def _write_slot(arrays, packed_P, slot, layout: ExpertLayout):
    mats = layout.unpack(packed_P)
    return tuple(
        jax.lax.dynamic_update_slice(a, _stored(m[None], a.dtype, layout.np_dtype), (slot,) + (0,) * m.ndim)
        for a, m in zip(arrays, mats)
    )


@functools.partial(jax.jit, static_argnames=("dtype", "fmt"))
def _stored_step_jit(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, dtype, fmt=None):
    """`generate`'s expert step over the engine's stored slot arrays (bit-identical: only bitcasts).
    `fmt`: the experts' format (MXFP4 slots hold the stored bytes; the format's FFN dequantises)."""

    # the slots as stored (bf16 as uint16 bits): the step slices one expert's bits at a time
    return h_BTD + expert_step(xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, fmt, dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _view_jit(arrays, dtype):
    return tuple(_computed(a, dtype) for a in arrays)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _install(arrays, packed_GP, slots_G, layout: ExpertLayout):
    """Write G landed experts into their slots, in order: one dispatch per layer, not one per copy.
    G is fixed per engine (its staging size); a short group repeats its last pair (same bytes again)."""
    for g, packed_P in enumerate(packed_GP):
        arrays = _write_slot(arrays, packed_P, slots_G[g], layout)
    return arrays


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _install_int8(arrays, q_and_s, slot, layout: ExpertLayout):
    return _write_slot(arrays, dequantize_int8(q_and_s[0], q_and_s[1], layout), slot, layout)


@functools.partial(jax.jit, static_argnames=("dtype", "fmt"))
def _mixed_jit(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, extra_BTD, dtype, fmt=None):

    on_device = (slot_E[ids_BTK] >= 0).astype(weights_BTK.dtype)
    return (
        h_BTD
        + expert_step(xn_BTD, weights_BTK * on_device, ids_BTK, ins, out, slot_E, fmt, dtype)
        + extra_BTD
    )


@functools.partial(jax.jit, static_argnames=("dtype", "last", "fmt"))
def _group_jit(
    h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, member_E, acc, extra_BTD, dtype, last, fmt=None
):
    """One group of a layer processed in groups (`runtime.grouped`): the per-expert rows of the experts
    of `member_E` into `acc`; the `last` group returns the layer's output, combined as `_stored_step_jit`
    combines (bit-identical), plus the host-computed outputs `extra_BTD` (their experts' weights masked)."""
    B, T, D = xn_BTD.shape
    K = ids_BTK.shape[-1]
    if extra_BTD is not None:
        weights_BTK = weights_BTK * (slot_E[ids_BTK] >= 0).astype(weights_BTK.dtype)
    x_ND, ids_NK, w_NK = xn_BTD.reshape(B * T, D), ids_BTK.reshape(B * T, K), weights_BTK.reshape(B * T, K)
    r = moe_group(x_ND, ids_NK, w_NK, ins, out, slot_E, member_E, acc, last, fmt, dtype)
    if not last:
        return r
    y = h_BTD + r.reshape(B, T, D).astype(xn_BTD.dtype)
    return y if extra_BTD is None else y + extra_BTD


@functools.partial(jax.jit, static_argnums=(3,))
def _pregate_top(xn_BTD, routers_HDE, valid_H, K: int):
    """Top-k ids of the next H routers on this layer's input [H, B, T, K] (as `sim.predict` computes
    them); -1 for a router not `valid_H` (in another stack)."""
    scores = jnp.einsum("BTD,HDE->HBTE", xn_BTD.astype(jnp.float32), routers_HDE.astype(jnp.float32))
    return jnp.where(valid_H[:, None, None, None], jax.lax.top_k(scores, K)[1], -1)


def budget_slots(device_budget, expert_bytes: int, n_experts: int, top_k: int, max_inflight: int):
    """(budget bytes, cache slots) of a device budget: a fraction of all expert bytes (0 < f <= 1) or a
    byte count, less `max_inflight` staging buffers; one layer's top-k must fit (batch 1 decode)."""
    total = n_experts * expert_bytes
    if device_budget is None or device_budget <= 0:
        raise CoreError(f"device_budget must be a positive fraction or byte count, got {device_budget!r}")
    budget_bytes = int(device_budget * total) if device_budget <= 1 else int(device_budget)
    n_slots = budget_bytes // expert_bytes - max_inflight
    if n_slots < top_k:
        need = (top_k + max_inflight) * expert_bytes
        raise CoreError(
            f"device_budget {device_budget!r} = {budget_bytes} bytes holds {budget_bytes // expert_bytes} "
            f"experts of {expert_bytes} bytes; one layer's top-{top_k} plus {max_inflight} copies in "
            f"flight need at least {need} bytes ({need / total:.3f} of expert bytes)"
        )
    return budget_bytes, n_slots
