"""Prefill + decode with a KV cache, one MoE layer at a time, through the expert hand-off.

Each decoder layer runs as two jitted steps: `core` (attention, norms, router: it yields the expert
ids) and `experts` (the expert FFN over slot arrays). Between them the `ExpertProvider` hands over
the weights: `ResidentExperts` passes the model's own arrays (nothing leaves the device, no host
sync); the offload engine passes its device cache and slot map after making the experts resident.
Both feed the same jitted step with the same shapes, so offloaded logits are bit-identical.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl import seq2seq
from moecxl.decoding import (  # noqa: F401 (the generation API, importable from here as before)
    ExpertProvider,
    GenerateResult,
    GenerationError,
    ResidentExperts,
    check_request,
    check_vocab,
    choose_token,
    left_pad,
    sample_top_p,
    timing_metrics,
)
from moecxl.model.attention import attention_mask
from moecxl.model.decoder import MoEDecoder, kv_cache
from moecxl.model.family import family_of
from moecxl.model.steps import _core_jit, _experts_jit, split_flat  # noqa: F401 (re-exported)

# ---- jitted steps, cached per graph structure so each compiles once --------------------------------


def _embed_fn(embed_VD, ids_BT, key_valid_BS, q_index_BT, window):
    x = jnp.take(embed_VD, ids_BT, axis=0)
    return x, attention_mask(key_valid_BS, q_index_BT, window)


_embed_jit = jax.jit(_embed_fn, static_argnums=(4,))


@functools.lru_cache(maxsize=16)
def _head_jit(graphdef, treedef):
    def head_fn(leaves, x_BTD, key, temperature, top_p, greedy):
        model_head = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        logits_BV = model_head(x_BTD[:, -1:, :])[:, 0, :]
        token_B, key = choose_token(logits_BV, key, temperature, top_p, greedy)
        return token_B, logits_BV, key

    return jax.jit(head_fn)


class _Head(nnx.Module):
    """Final norm + LM head as its own small module, so the head step jits over a small state."""

    def __init__(self, model: MoEDecoder):
        self.norm = model.norm
        self.embed_VD = model.embed_VD
        self.lm_head_DV = model.lm_head_DV

    def __call__(self, x_BTD):
        w_DV = self.embed_VD[...].T if self.lm_head_DV is None else self.lm_head_DV[...]
        return jnp.einsum("BTD,DV->BTV", self.norm(x_BTD), w_DV).astype(jnp.float32)


# ---- input handling ----------------------------------------------------------------------------------


def _bucket(n: int, step: int = 64) -> int:
    return -(-n // step) * step


# ---- the generation loop -----------------------------------------------------------------------------


def generate(
    model: MoEDecoder,
    input_ids,
    max_new_tokens: int = 32,
    *,
    engine=None,
    attention_mask=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens=None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> GenerateResult:
    """Greedy (temperature 0) or seeded temperature / top-p sampling with a KV cache.

    `engine=None` keeps every expert resident; an `OffloadEngine` (or any `ExpertProvider`) owns the
    experts otherwise. Rows that emit a stop token are padded afterwards; the loop ends when all stop.
    An encoder-decoder model (Switch) runs `seq2seq.generate`: the encoder once over `input_ids`, the
    decoder from `decoder_start_token_id` (default: the config's).
    """
    cfg = model.cfg
    if family_of(cfg).encoder_decoder:
        return seq2seq.generate(
            model,
            input_ids,
            max_new_tokens,
            engine=engine,
            attention_mask=attention_mask,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_tokens=stop_tokens,
            pad_token_id=pad_token_id,
            decoder_start_token_id=decoder_start_token_id,
        )
    if decoder_start_token_id is not None:
        raise GenerationError(
            f"decoder_start_token_id={decoder_start_token_id!r}: a {cfg.family!r} model has no decoder "
            "stack to start (encoder-decoder families only)"
        )
    check_request(cfg, max_new_tokens, temperature, top_p)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    ids_np, mask_np = left_pad(input_ids, attention_mask, pad)
    check_vocab(ids_np, mask_np, cfg.vocab_size)
    ids_np = np.where(mask_np, ids_np, 0)
    stops = set(int(s) for s in (stop_tokens if stop_tokens is not None else []))
    B, T = ids_np.shape
    S = _bucket(T + max(max_new_tokens, 1))
    if cfg.max_position_embeddings < S and T + max_new_tokens > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    provider = engine if engine is not None else ResidentExperts(model)
    experts_step = getattr(provider, "experts_fn", None) or _experts_jit
    after = getattr(provider, "after_experts", None)
    dt = model.embed_VD[...].dtype
    kvs = [kv_cache(cfg, B, S, dt) for _ in model.layers]
    layers = [split_flat(layer.core) for layer in model.layers]
    cores = [_core_jit(*k) for k, _ in layers]
    head_key, head_state = split_flat(_Head(model))
    head = _head_jit(*head_key)
    embed_VD = model.embed_VD[...]

    key_valid = np.zeros((B, S), bool)
    key_valid[:, :T] = mask_np
    pos_np = np.maximum(np.cumsum(mask_np, axis=1) - 1, 0).astype(np.int32)
    greedy = temperature == 0.0
    key = jax.random.key(seed)

    routing_ids: list[list] = []
    routing_w: list[list] = []
    tokens_out, logits_out = [], []
    done = np.zeros(B, bool)
    step_times_s = []

    def forward(x_ids_BT, pos_BT, q_index_BT, start, phase, step):
        # numpy in, no eager jnp ops: each eager op costs more than a layer's control plane.
        x, mask_BTS = _embed_jit(
            embed_VD, x_ids_BT.astype(np.int32), key_valid, q_index_BT.astype(np.int32), cfg.sliding_window
        )
        pos = pos_BT.astype(np.int32)
        start_arr = np.int32(start)
        provider.begin(phase, step)
        m = 0
        ids_step, w_step = [], []
        for li, (_, leaves) in enumerate(layers):
            co, kvs[li] = cores[li](leaves, x, pos, mask_BTS, kvs[li], start_arr)
            if co.ids_BTK is None:
                x = co.h_BTD
                continue
            ins, out, slot_E = provider.experts(m, co)
            x = experts_step(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E)
            if after is not None:
                after(m)  # the step is dispatched: the provider's overlappable work (prefetch)
            ids_step.append(co.ids_BTK)
            w_step.append(co.weights_BTK)
            m += 1
        provider.end(phase, step)
        routing_ids.append(ids_step)
        routing_w.append(w_step)
        return x

    t0 = time.perf_counter()
    last = forward(ids_np, pos_np, np.broadcast_to(np.arange(T), (B, T)), 0, "prefill", 0)
    cur_pos = pos_np[:, -1]
    for i in range(max_new_tokens):
        tok, logits, key = head(head_state, last, key, np.float32(temperature), np.float32(top_p), greedy)
        tok_np = np.asarray(tok)  # one host sync per generated token
        tok_np = np.where(done, pad, tok_np)
        tokens_out.append(tok_np)
        logits_out.append(logits)
        step_times_s.append(time.perf_counter() - t0)
        if stops:
            done |= np.isin(tok_np, list(stops))
        if i == max_new_tokens - 1 or done.all():
            break
        idx = T + i
        key_valid[:, idx] = True
        cur_pos = cur_pos + 1
        last = forward(tok_np[:, None], cur_pos[:, None], np.full((B, 1), idx), idx, "decode", i + 1)

    n_new = len(tokens_out)
    metrics = timing_metrics(step_times_s, t0, time.perf_counter(), B, T)
    if hasattr(provider, "metrics"):
        metrics.update(provider.metrics())
    V = cfg.vocab_size
    tokens = np.stack(tokens_out, axis=1).astype(np.int32) if n_new else np.zeros((B, 0), np.int32)
    logits_np = (
        np.stack([np.asarray(lg) for lg in logits_out], axis=1) if n_new else np.zeros((B, 0, V), np.float32)
    )
    n_moe = len(routing_ids[0])
    expert_ids = [np.concatenate([np.asarray(s[m]) for s in routing_ids], axis=1) for m in range(n_moe)]
    expert_weights = [np.concatenate([np.asarray(s[m]) for s in routing_w], axis=1) for m in range(n_moe)]
    return GenerateResult(tokens, logits_np, expert_ids, expert_weights, T, mask_np, metrics)
