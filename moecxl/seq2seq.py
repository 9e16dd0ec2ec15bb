"""Encoder-decoder generation (Switch) one block at a time, through the expert hand-off.

The encoder runs once per request: phase "prefill", step 0, its sparse blocks the trace's MoE layers
0..n_enc-1. The decoder runs once per new token: phase "decode", step i (step 1 reads the decoder start
token), its sparse blocks layers n_enc..L-1, with its self-attention KV cache and the cross-attention
keys and values computed once from the encoder output. So a provider sees the real visiting order: a
decode step never visits the encoder's layers.

Between a sparse block's core (attention, router, expert capacity) and its expert step the provider hands
the experts over, as in `generate`: `ResidentExperts` passes the model's arrays, the offload engine its
slot arrays, into the same jitted step. Capacity is applied in the core, before the hand-off, so every
exact policy's logits equal the resident ones bit for bit, tokens dropped by capacity included (a dropped
token keeps its routed id with combine weight 0, as in the traces; an expert only dropped tokens chose
cannot occur while capacity >= 1, since a token is dropped only after `capacity` others were kept).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.decoding import (
    GenerateResult,
    GenerationError,
    ResidentExperts,
    check_request,
    check_vocab,
    choose_token,
    left_pad,
    timing_metrics,
)
from moecxl.model.steps import _experts_jit, split_flat
from moecxl.model.switch_steps import Bridge, Head, StackInputs, block_jit, module_jit

CACHE_BUCKET = 64  # decoder cache slots are a multiple of this: few shapes, few compilations


def _bucket(n: int) -> int:
    return -(-max(n, 1) // CACHE_BUCKET) * CACHE_BUCKET


class SwitchRunner:
    """A Switch model's forward, block by block, with `provider` owning the experts (None: resident).

    `encode` runs the encoder (one prefill step) and prepares the decoder's caches; each `decode` runs
    the decoder over the next tokens. Both return the routing of their sparse blocks {layer: (ids, w)}."""

    def __init__(self, model, provider=None):
        self.cfg = model.cfg
        self.provider = provider if provider is not None else ResidentExperts(model)
        self.experts_step = getattr(self.provider, "experts_fn", None) or _experts_jit
        self.after = getattr(self.provider, "after_experts", None)
        self.stacks = []
        for stack in (model.encoder, model.decoder):
            blocks = []
            for b in stack.layers:
                key, leaves = split_flat(b.core)
                blocks.append((block_jit(*key), leaves, b.experts is not None))
            self.stacks.append(blocks)
        self.n_enc = sum(sparse for _, _, sparse in self.stacks[0])
        self.L = self.n_enc + sum(sparse for _, _, sparse in self.stacks[1])
        key, self._enc_in = split_flat(StackInputs(model, is_decoder=False))
        self._enc_in_fn = module_jit(*key, method="encoder")
        key, self._dec_in = split_flat(StackInputs(model, is_decoder=True))
        self._dec_in_fn = module_jit(*key, method="decoder", static_argnums=(4,))
        key, self._bridge = split_flat(Bridge(model))
        self._bridge_fn = module_jit(*key)
        self.head_key, self.head_leaves = split_flat(Head(model))
        self.dtype = model.embed_VD[...].dtype
        self.cross = self.kvs = self.enc_valid = None

    def _blocks(self, blocks, m, x, bias, mask, cross=None, cross_mask=None, kvs=None, start=0):
        """The blocks of one stack; sparse ones hand their experts over (the first is trace layer m).
        `kvs`: the decoder's self-attention caches, updated in place. (output, {layer: routing})."""
        routing = {}
        start = np.int32(start)
        for i, (core, leaves, sparse) in enumerate(blocks):
            cross_kv = None if cross is None else cross[i]
            co, kv = core(leaves, x, bias, mask, cross_kv, cross_mask, None if kvs is None else kvs[i], start)
            if kvs is not None:
                kvs[i] = kv
            if not sparse:
                x = co.h_BTD
                continue
            ins, out, slot_E = self.provider.experts(m, co)
            x = self.experts_step(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E)
            if self.after is not None:
                self.after(m)  # the step is dispatched: the provider's overlappable work (prefetch)
            routing[m] = (co.ids_BTK, co.weights_BTK)
            m += 1
        return x, routing

    def encode(self, ids_BS: np.ndarray, valid_BS: np.ndarray, cache_len: int) -> dict:
        """The encoder over a request (prefill, step 0); the decoder's cross-attention keys and values and
        an empty self-attention cache of `cache_len` slots. Returns the encoder's routing."""
        self.provider.begin("prefill", 0)
        x, mask, bias = self._enc_in_fn(self._enc_in, ids_BS.astype(np.int32), valid_BS)
        x, routing = self._blocks(self.stacks[0], 0, x, bias, mask)
        self.cross = self._bridge_fn(self._bridge, x)
        self.provider.end("prefill", 0)
        B = ids_BS.shape[0]
        shape = (B, cache_len, self.cfg.num_heads, self.cfg.dim_head)
        self.kvs = [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.stacks[1]]
        self.enc_valid = valid_BS
        return routing

    def decode(self, tokens_BT: np.ndarray, start: int, step: int):
        """The decoder over tokens at positions [start, start + T) with the caches (decode, `step`):
        (output before the head [B, T, D], routing)."""
        C = self.kvs[0][0].shape[1]
        self.provider.begin("decode", step)
        x, mask, bias, cross_mask = self._dec_in_fn(
            self._dec_in, tokens_BT.astype(np.int32), np.int32(start), self.enc_valid, C
        )
        x, routing = self._blocks(
            self.stacks[1], self.n_enc, x, bias, mask, self.cross, cross_mask, self.kvs, start
        )
        self.provider.end("decode", step)
        return x, routing


@functools.lru_cache(maxsize=16)
def _choose_jit(graphdef, treedef):
    def fn(leaves, y_B1D, key, temperature, top_p, greedy):
        logits_BV = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(y_B1D)[:, 0, :]
        token_B, key = choose_token(logits_BV, key, temperature, top_p, greedy)
        return token_B, logits_BV, key

    return jax.jit(fn)


def start_token(cfg, decoder_start_token_id=None) -> int:
    """The decoder's first input: `decoder_start_token_id`, else the config's; refused unless an id in
    [0, vocab_size)."""
    tok = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)) or not 0 <= tok < cfg.vocab_size:
        raise GenerationError(
            f"decoder start token {tok!r} (decoder_start_token_id, else the config's): an encoder-decoder "
            f"request needs one id in [0, {cfg.vocab_size}) to start decoding from"
        )
    return int(tok)


def generate(
    model,
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
    """`moecxl.generate` for an encoder-decoder: the encoder once over `input_ids` [B, S] (padding
    anywhere `attention_mask` says; it counts toward expert capacity, as in the reference), then one
    decoder step per new token from the start token. Rows that emit a stop token feed and emit pad after
    it (transformers' greedy `generate` with `eos_token_id` = the stop token); the loop ends when all stop.
    """
    cfg = model.cfg
    check_request(cfg, max_new_tokens, temperature, top_p)
    first = start_token(cfg, decoder_start_token_id)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    ids_np, mask_np = left_pad(input_ids, attention_mask, pad, require_left=False)
    check_vocab(ids_np, mask_np, cfg.vocab_size)
    ids_np = np.where((ids_np >= 0) & (ids_np < cfg.vocab_size), ids_np, pad)
    stops = set(int(s) for s in (stop_tokens if stop_tokens is not None else []))
    B, S = ids_np.shape
    runner = SwitchRunner(model, engine)
    choose = _choose_jit(*runner.head_key)
    greedy = temperature == 0.0
    key = jax.random.key(seed)

    t0 = time.perf_counter()
    routing = [runner.encode(ids_np, mask_np, _bucket(max_new_tokens))]
    tok_B = np.full((B,), first, np.int32)
    done = np.zeros(B, bool)
    tokens_out, logits_out, step_times_s = [], [], []
    for i in range(max_new_tokens):
        y, r = runner.decode(tok_B[:, None], i, i + 1)
        routing.append(r)
        tok, logits, key = choose(
            runner.head_leaves, y, key, np.float32(temperature), np.float32(top_p), greedy
        )
        tok_B = np.where(done, pad, np.asarray(tok)).astype(np.int32)  # one host sync per token
        tokens_out.append(tok_B)
        logits_out.append(logits)
        step_times_s.append(time.perf_counter() - t0)
        if stops:
            done |= np.isin(tok_B, list(stops))
        if done.all():
            break

    n_new = len(tokens_out)
    metrics = timing_metrics(step_times_s, t0, time.perf_counter(), B, S)
    if hasattr(runner.provider, "metrics"):
        metrics.update(runner.provider.metrics())
    tokens = np.stack(tokens_out, axis=1) if n_new else np.zeros((B, 0), np.int32)
    logits_np = (
        np.stack([np.asarray(lg) for lg in logits_out], axis=1)
        if n_new
        else np.zeros((B, 0, cfg.vocab_size), np.float32)
    )
    expert_ids, expert_weights = routing_arrays(routing, runner.L, B, S)
    return GenerateResult(tokens, logits_np, expert_ids, expert_weights, S, mask_np, metrics)


def routing_arrays(routing: list[dict], L: int, B: int, S: int) -> tuple[list, list]:
    """Per MoE layer, ids int32 and weights float32 [B, S + steps, 1] over the encoder's S tokens then
    one decoder token per step; -1 (weight 0) where a token skips the layer (the traces' layout)."""
    n = S + len(routing) - 1
    ids = [np.full((B, n, 1), -1, np.int32) for _ in range(L)]
    ws = [np.zeros((B, n, 1), np.float32) for _ in range(L)]
    for step, r in enumerate(routing):
        cols = slice(0, S) if step == 0 else slice(S + step - 1, S + step)
        for m, (i_BTK, w_BTK) in r.items():
            ids[m][:, cols] = np.asarray(i_BTK)
            ws[m][:, cols] = np.asarray(w_BTK)
    return ids, ws


def teacher_forced(model, enc_ids_BS, dec_in_BT, provider=None, mode: str = "decode"):
    """(logits float32 [B, T, V], routing): the decoder's predictions at every position of `dec_in_BT`
    (start token first) given the encoder over `enc_ids_BS`. mode "decode": one decoder token per step
    with the cache; "prefill": the whole decoder input as one step (capacity then counts its tokens).
    `routing`: per forward step, per MoE layer, the ids ([B, T, 1]; -1 where the step skips the layer)."""
    enc_ids_BS = np.asarray(enc_ids_BS, np.int32)
    dec_in_BT = np.asarray(dec_in_BT, np.int32)
    B, T = dec_in_BT.shape
    runner = SwitchRunner(model, provider)
    head = module_jit(*runner.head_key)
    steps = [runner.encode(enc_ids_BS, np.ones(enc_ids_BS.shape, bool), _bucket(T))]
    chunks = [(0, T)] if mode == "prefill" else [(t, t + 1) for t in range(T)]
    logits = []
    for i, (a, z) in enumerate(chunks):
        y, r = runner.decode(dec_in_BT[:, a:z], a, i + 1)
        logits.append(np.asarray(head(runner.head_leaves, y)))
        steps.append(r)
    routing = []
    for r in steps:
        shape = next(iter(r.values()))[0].shape if r else (B, 0, 1)
        routing.append(
            [np.asarray(r[m][0]) if m in r else np.full(shape, -1, np.int32) for m in range(runner.L)]
        )
    return np.concatenate(logits, axis=1), routing
