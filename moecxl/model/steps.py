"""Jitted per-layer steps over split module state: what `generate`, perplexity and the runtime's
calibration run (compiled once per graph structure)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from moecxl.model.moe import expert_step


@functools.lru_cache(maxsize=64)
def _core_jit(graphdef, treedef):
    # The state travels as a flat list of arrays: flattening an nnx.State per call costs ~0.4 ms.
    def core_fn(leaves, x, pos_BT, mask_BTS, kv, start):
        core = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        return core(x, pos_BT, mask_BTS, kv, start)

    return jax.jit(core_fn, donate_argnums=(4,))


def split_flat(module):
    """(jitted-step key, flat leaves): nnx.split once, then keep only the list of arrays."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    return (graphdef, treedef), leaves


def _experts_fn(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, fmt=None):
    return h_BTD + expert_step(xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, fmt)


_experts_jit = jax.jit(_experts_fn, static_argnames=("fmt",))  # fmt: the experts' ExpertFormat
