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


def _group_mask(choice_NE, n_group: int, topk_group: int, group_score):
    """[N, E] bool: experts of the `topk_group` groups with the best `group_score(choice_NGe)` [N, G]."""
    N, E = choice_NE.shape
    g_NG = group_score(choice_NE.reshape(N, n_group, E // n_group))
    _, top_NG = jax.lax.top_k(g_NG, topk_group)
    keep_NG = jnp.any(jax.nn.one_hot(top_NG, n_group, dtype=bool), axis=1)
    return jnp.repeat(keep_NG, E // n_group, axis=1)


def deepseek_v2(
    logits_NE, top_k: int, topk_method: str, n_group: int, topk_group: int, norm: bool, scale: float
):
    """DeepSeek-V2: softmax scores; top-k over all experts ("greedy") or over the `topk_group` groups
    with the highest max score ("group_limited_greedy"); optionally renormalised; times `scale`."""
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    if topk_method == "group_limited_greedy":
        mask_NE = _group_mask(probs_NE, n_group, topk_group, lambda s: jnp.max(s, axis=-1))
        probs_NE = jnp.where(mask_NE, probs_NE, 0.0)
    weights_NK, ids_NK = jax.lax.top_k(probs_NE, top_k)
    if norm:
        weights_NK = weights_NK / (jnp.sum(weights_NK, axis=-1, keepdims=True) + 1e-20)
    return weights_NK * scale, ids_NK.astype(jnp.int32), jnp.ones(ids_NK.shape, bool)


def deepseek_v3(logits_NE, bias_E, top_k: int, n_group: int, topk_group: int, norm: bool, scale: float):
    """DeepSeek-V3 ("noaux_tc"): sigmoid scores; the bias-corrected scores choose (groups ranked by the
    sum of their two best), the unbiased scores of the chosen experts weigh, optionally renormalised."""
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    mask_NE = _group_mask(choice_NE, n_group, topk_group, lambda s: jnp.sum(jax.lax.top_k(s, 2)[0], axis=-1))
    _, ids_NK = jax.lax.top_k(jnp.where(mask_NE, choice_NE, -jnp.inf), top_k)
    weights_NK = jnp.take_along_axis(scores_NE, ids_NK, axis=-1)
    if norm:
        weights_NK = weights_NK / (jnp.sum(weights_NK, axis=-1, keepdims=True) + 1e-20)
    return weights_NK * scale, ids_NK.astype(jnp.int32), jnp.ones(ids_NK.shape, bool)


def topk_softmax(logits_NE, top_k: int, out_dtype=jnp.float32):
    """GPT-OSS: top-k on the raw logits, softmax over the k chosen (in float32)."""
    top_NK, ids_NK = jax.lax.top_k(logits_NE.astype(jnp.float32), top_k)
    weights_NK = jax.nn.softmax(top_NK, axis=-1)
    return weights_NK.astype(out_dtype), ids_NK.astype(jnp.int32), jnp.ones(ids_NK.shape, bool)
