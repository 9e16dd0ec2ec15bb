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
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.model.attention import attention_mask
from moecxl.model.decoder import CoreOut, MoEDecoder
from moecxl.model.steps import _core_jit, _experts_jit, split_flat  # noqa: F401 (re-exported)


class GenerationError(ValueError):
    """Bad generation input (ids outside the vocabulary, empty prompt, negative length, ...)."""


class ExpertProvider(Protocol):
    """The narrow hand-off between the model and whoever owns the experts."""

    def begin(self, phase: str, step: int) -> None:
        """Called before each forward step: phase is "prefill" or "decode"."""

    def experts(self, moe_index: int, core: CoreOut) -> tuple[tuple, Any, Any]:
        """(ins, out, slot_E) on the device for this MoE layer, given its routing in `core`."""

    def end(self, phase: str, step: int) -> None:
        """Called after each forward step."""

    # Optional: `experts_fn(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E) -> x_BTD` replaces
    # the single-device expert step (moecxl.distributed.ExpertParallel runs it across devices), and
    # `after_experts(moe_index)`, called once that step is dispatched, runs work that may overlap it.


class ResidentExperts:
    """Every expert resident: the model's own stacked arrays and the identity slot map."""

    timing = None  # the resident path measures; it does not emulate

    def __init__(self, model: MoEDecoder):
        self._layers = []
        for layer in model.layers:
            if layer.experts is not None:
                ins, out = layer.experts.arrays()
                ins = tuple(jnp.asarray(w) for w in ins)
                self._layers.append((ins, jnp.asarray(out)))
        E = model.cfg.num_experts
        self._slot_E = jnp.arange(E, dtype=jnp.int32)

    def begin(self, phase: str, step: int) -> None:
        pass

    def experts(self, moe_index: int, core: CoreOut):
        ins, out = self._layers[moe_index]
        return ins, out, self._slot_E

    def end(self, phase: str, step: int) -> None:
        pass


@dataclass
class GenerateResult:
    """What `generate` returns. Routing lists hold one array per MoE layer, in layer order."""

    tokens: np.ndarray  # int32 [B, T_new]
    logits: np.ndarray  # float32 [B, T_new, V]: the logits each generated token was chosen from
    expert_ids: list  # int32 [B, T_prompt + T_new - 1, K] for every processed position
    expert_weights: list  # float32, same shape
    prompt_len: int  # T_prompt after left padding
    attention_mask: np.ndarray  # bool [B, T_prompt]: real prompt tokens
    metrics: dict = field(default_factory=dict)


# ---- jitted steps, cached per graph structure so each compiles once --------------------------------


def _embed_fn(embed_VD, ids_BT, key_valid_BS, q_index_BT, window):
    x = jnp.take(embed_VD, ids_BT, axis=0)
    return x, attention_mask(key_valid_BS, q_index_BT, window)


_embed_jit = jax.jit(_embed_fn, static_argnums=(4,))


@functools.lru_cache(maxsize=16)
def _head_jit(graphdef, treedef):
    def head_fn(leaves, x_BTD, key, temperature, top_p, greedy):
        model_head = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        key, sub = jax.random.split(key)
        logits_BV = model_head(x_BTD[:, -1:, :])[:, 0, :]
        token_B = jax.lax.cond(
            greedy,
            lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32),
            lambda: sample_top_p(logits_BV, sub, temperature, top_p),
        )
        return token_B, logits_BV, key

    return jax.jit(head_fn)


def sample_top_p(logits_BV, key, temperature, top_p):
    """Temperature then nucleus sampling: keep the smallest set of tokens with mass >= top_p."""
    scaled = logits_BV / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(scaled, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    cum = jnp.cumsum(sorted_p, axis=-1)
    keep_sorted = (cum - sorted_p) < top_p  # always keeps the most likely token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(keep_sorted)
    masked = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


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


def left_pad(input_ids, attention_mask=None, pad_token_id: int = 0):
    """Accept an int array [B, T] (+ mask) or a list of token lists; return left-padded ids and mask."""
    if (
        isinstance(input_ids, (list, tuple))
        and input_ids
        and isinstance(input_ids[0], (list, tuple, np.ndarray))
    ):
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in input_ids]
        if any(len(r) == 0 for r in rows):
            raise GenerationError(f"empty prompt in row {[len(r) for r in rows].index(0)}")
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), pad_token_id, np.int64)
        mask = np.zeros((len(rows), T), bool)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :] = r
            mask[b, T - len(r) :] = True
        return ids, mask
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise GenerationError(f"input_ids must be [B, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise GenerationError(f"empty prompt: input_ids has shape {ids.shape}")
    if attention_mask is None:
        mask = np.ones(ids.shape, bool)
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not mask.any(axis=1).all():
            raise GenerationError(f"empty prompt: row {int(np.argmin(mask.any(axis=1)))} has no real token")
        # Right-aligned (left-padded) prompts only: a real token may not precede a pad.
        if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            raise GenerationError("attention_mask must be left-padded (pads before real tokens)")
    return ids, mask


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
) -> GenerateResult:
    """Greedy (temperature 0) or seeded temperature / top-p sampling with a KV cache.

    `engine=None` keeps every expert resident; an `OffloadEngine` (or any `ExpertProvider`) owns the
    experts otherwise. Rows that emit a stop token are padded afterwards; the loop ends when all stop.
    """
    cfg = model.cfg
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    ids_np, mask_np = left_pad(input_ids, attention_mask, pad)
    bad = (ids_np < 0) | (ids_np >= cfg.vocab_size)
    if (bad & mask_np).any():
        b, t = np.argwhere(bad & mask_np)[0]
        raise GenerationError(
            f"token id {int(ids_np[b, t])} at row {b}, position {t} is outside the vocabulary [0, {cfg.vocab_size})"
        )
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
    G, Dh = cfg.num_kv_heads, cfg.dim_head
    kvs = [(jnp.zeros((B, S, G, Dh), dt), jnp.zeros((B, S, G, Dh), dt)) for _ in model.layers]
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
    total_s = step_times_s[-1] if step_times_s else time.perf_counter() - t0
    ttft_s = step_times_s[0] if step_times_s else float("nan")
    tpot_s = float(np.mean(np.diff(step_times_s))) if n_new > 1 else float("nan")
    metrics = {
        "ttft_s": ttft_s,
        "tpot_s": tpot_s,
        "tokens_per_s": B * n_new / total_s if n_new else 0.0,
        "batch_size": B,
        "prompt_len": T,
        "new_tokens": n_new,
        "timing": "measured-gpu" if jax.default_backend() == "gpu" else "measured-cpu",
    }
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
