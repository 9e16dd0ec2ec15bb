"""Routing semantics of each family, as pure functions over router logits.

Every router returns (weights_NK, ids_NK, keep_NK): the combine weights, the chosen experts and
whether each assignment is served (False only where a capacity limit drops a token: Switch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_topk(logits_NE, top_k: int, norm_topk_prob: bool, out_dtype=jnp.float32):
    """Mixtral / OLMoE / Qwen3-MoE: softmax in float32, top-k, optionally renormalise."""
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    weights_NK, ids_NK = jax.lax.top_k(probs_NE, top_k)
    if norm_topk_prob:
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
    keep_NK = jnp.ones(ids_NK.shape, bool)
    return weights_NK.astype(out_dtype), ids_NK.astype(jnp.int32), keep_NK


def switch_top1(logits_BTE, expert_capacity: int, valid_BT=None):
    """Switch: top-1 argmax of the softmax; capacity counts tokens per expert along each batch row.

    Tokens beyond `expert_capacity` for their expert are dropped (keep=False). In transformers 5 a
    dropped token gets no MLP output (only its residual passes); 4.x added the normed input scaled by
    the router probability instead. The reference counts padding toward capacity (its
    `router_ignore_padding_tokens` is never read): pass `valid_BT=None` for parity.
    """
    probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    ids_BT = jnp.argmax(probs_BTE, axis=-1).astype(jnp.int32)
    onehot_BTE = jax.nn.one_hot(ids_BT, logits_BTE.shape[-1], dtype=jnp.int32)
    if valid_BT is not None:
        onehot_BTE = onehot_BTE * valid_BT[..., None].astype(jnp.int32)
    priority_BTE = jnp.cumsum(onehot_BTE, axis=1)
    keep_BT = jnp.sum(priority_BTE * onehot_BTE, axis=-1) <= expert_capacity
    weight_BT = jnp.max(probs_BTE, axis=-1)
    return weight_BT[..., None], ids_BT[..., None], keep_BT[..., None]
