"""Switch Transformers (T5-style encoder-decoder with top-1 MoE) in Flax NNX, as transformers 5.24 runs it.

A block is `core` (T5 layer norms, self-attention, cross-attention in the decoder, the router or the dense
ReLU MLP) plus `experts` (an `ExpertBank(gated=False)` on sparse blocks), so an offload engine can own the
experts. Sparse blocks: index i with `i % step == 1`, or every block when step == 1 (none when step == 0).
Only block 0 of each stack owns the relative-position bias table; its bias is shared by the other blocks.
T5 attention is unscaled. A token dropped by the expert capacity gets no MLP output: only its residual
passes (transformers >= 5; 4.x added the normed input scaled by the router probability instead).

Shape key: B batch, S encoder tokens, T decoder tokens, D model, H heads, d head dim (d_kv), F d_ff,
E experts, K = 1, V vocab, C decoder cache slots.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from moecxl.config import ModelConfig
from moecxl.model.family import sparse_layers
from moecxl.model.layers import DTYPES, Dense, RMSNorm, init_normal
from moecxl.model.moe import ExpertBank, expert_step
from moecxl.model.router import switch_top1

NEG_INF = -1e30


def relative_position_bucket(rel, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5 bucket of each relative position (key - query): exact for small distances, log-spaced beyond."""
    rel = jnp.asarray(rel, jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 as the reference computes it; n >= 1 keeps log finite where the branch is unused.
    scaled = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


class RelativeBias(nnx.Module):
    """The bias table [buckets, H] of block 0; returns the additive score bias [1, H, T, S]."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        self.table_NH = nnx.Param(init_normal(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), dt))
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance

    def __call__(self, q_len: int, k_len: int, q_start=0):
        """Queries sit at q_start + [0, q_len), keys at [0, k_len); q_start may be traced."""
        rel_TS = jnp.arange(k_len)[None, :] - (jnp.arange(q_len)[:, None] + q_start)
        bucket_TS = relative_position_bucket(rel_TS, self.bidirectional, self.num_buckets, self.max_distance)
        bias_TSH = jnp.take(self.table_NH[...], bucket_TS, axis=0)
        return jnp.einsum("TSH->HTS", bias_TSH)[None]


class T5Attention(nnx.Module):
    """Multi-head attention without score scaling; bias and mask are given by the stack."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        D, H, d = cfg.hidden_size, cfg.num_heads, cfg.dim_head
        self.q = Dense(D, H * d, rngs=rngs, dtype=dt)
        self.k = Dense(D, H * d, rngs=rngs, dtype=dt)
        self.v = Dense(D, H * d, rngs=rngs, dtype=dt)
        self.o = Dense(H * d, D, rngs=rngs, dtype=dt)
        self.num_heads, self.dim_head = H, d

    def project_kv(self, x_BSD):
        """Keys and values [B, S, H, d] of a key sequence (cached once for cross-attention)."""
        B, S, _ = x_BSD.shape
        shape = (B, S, self.num_heads, self.dim_head)
        return self.k(x_BSD).reshape(shape), self.v(x_BSD).reshape(shape)

    def __call__(self, x_BTD, kv, bias_1HTS, mask_BTS):
        B, T, _ = x_BTD.shape
        q_BTHd = self.q(x_BTD).reshape(B, T, self.num_heads, self.dim_head)
        k_BSHd, v_BSHd = kv
        scores = jnp.einsum("BTHd,BSHd->BHTS", q_BTHd, k_BSHd).astype(jnp.float32)
        scores = scores + bias_1HTS.astype(jnp.float32)
        scores = jnp.where(mask_BTS[:, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BSHd.dtype)
        y_BTHd = jnp.einsum("BHTS,BSHd->BTHd", probs, v_BSHd)
        return self.o(y_BTHd.reshape(B, T, -1))


class ReluMLP(nnx.Module):
    """Dense T5 feed-forward of non-sparse blocks: wo(relu(wi x))."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.wi = Dense(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.wo = Dense(d_ff, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x_BTD):
        return self.wo(jax.nn.relu(self.wi(x_BTD)))


@struct.dataclass
class SwitchCoreOut:
    """What the non-expert part of a block hands to the expert step (routing fields None if dense)."""

    h_BTD: jax.Array  # residual stream after attention (dense blocks: the block's output)
    xn_BTD: jax.Array  # MLP input, after the feed-forward layer norm
    router_logits_BTE: jax.Array | None  # float32, raw
    weights_BTK: jax.Array | None  # combine weight: router probability, 0 where capacity dropped the token
    ids_BTK: jax.Array | None  # int32 argmax expert
    keep_BTK: jax.Array | None  # False where capacity dropped the token


class SwitchBlockCore(nnx.Module):
    """Everything in a Switch block except the experts."""

    def __init__(self, cfg: ModelConfig, layer: int, is_decoder: bool, is_sparse: bool, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        D, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.rel_bias = RelativeBias(cfg, not is_decoder, rngs=rngs) if layer == 0 else None
        self.self_norm = RMSNorm(D, eps, dt)
        self.self_attn = T5Attention(cfg, rngs=rngs)
        if is_decoder:
            self.cross_norm = RMSNorm(D, eps, dt)
            self.cross_attn = T5Attention(cfg, rngs=rngs)
        else:
            self.cross_norm = self.cross_attn = None
        self.ff_norm = RMSNorm(D, eps, dt)
        self.is_sparse = is_sparse
        if is_sparse:
            self.router_DE = nnx.Param(init_normal(rngs, (D, cfg.num_experts), dt))
            self.mlp = None
        else:
            self.router_DE = None
            self.mlp = ReluMLP(D, cfg.intermediate_size, rngs=rngs, dtype=dt)
        self.expert_capacity = cfg.expert_capacity

    def __call__(self, x_BTD, bias_1HTS, mask_BTS, cross_kv=None, cross_mask_BTS=None, kv=None, start=0):
        """Attention(s) and routing. Returns (SwitchCoreOut, self-attention kv).

        With `kv` (decoder cache [B, C, H, d] each), the new keys are written at [start, start + T).
        """
        xn = self.self_norm(x_BTD)
        k_new, v_new = self.self_attn.project_kv(xn)
        if kv is None:
            kv = (k_new, v_new)
        else:
            kv = tuple(
                jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, start, 0, 0))
                for c, n in zip(kv, (k_new, v_new))
            )
        h = x_BTD + self.self_attn(xn, kv, bias_1HTS, mask_BTS)
        if self.cross_attn is not None:
            # Cross-attention has no position bias (the reference's zeros).
            zero_bias = jnp.zeros((1, 1, 1, 1), h.dtype)
            h = h + self.cross_attn(self.cross_norm(h), cross_kv, zero_bias, cross_mask_BTS)
        xn = self.ff_norm(h)
        if not self.is_sparse:
            return SwitchCoreOut(h + self.mlp(xn), xn, None, None, None, None), kv
        logits_BTE = jnp.einsum(
            "BTD,DE->BTE", xn.astype(jnp.float32), self.router_DE[...].astype(jnp.float32)
        )
        prob_BTK, ids_BTK, keep_BTK = switch_top1(logits_BTE, self.expert_capacity)
        weights_BTK = jnp.where(keep_BTK, prob_BTK, 0.0)
        return SwitchCoreOut(h, xn, logits_BTE, weights_BTK, ids_BTK, keep_BTK), kv


class SwitchBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, is_decoder: bool, is_sparse: bool, *, rngs: nnx.Rngs):
        self.core = SwitchBlockCore(cfg, layer, is_decoder, is_sparse, rngs=rngs)
        if is_sparse:
            self.experts = ExpertBank(
                cfg.num_experts,
                cfg.hidden_size,
                cfg.intermediate_size,
                rngs=rngs,
                dtype=DTYPES[cfg.dtype],
                gated=False,
            )
        else:
            self.experts = None

    def __call__(self, x_BTD, bias_1HTS, mask_BTS, cross_kv=None, cross_mask_BTS=None, kv=None, start=0):
        co, kv = self.core(x_BTD, bias_1HTS, mask_BTS, cross_kv, cross_mask_BTS, kv, start)
        if self.experts is None:
            return co.h_BTD, co, kv
        ins, out = self.experts.arrays()
        y = co.h_BTD + expert_step(co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out)
        return y, co, kv


@struct.dataclass
class Routing:
    """Routing decisions of a stack's sparse blocks, in block order."""

    router_logits: list  # float32 [B, T, E], raw
    expert_ids: list  # int32 [B, T, 1]
    expert_weights: list  # float32 [B, T, 1] combine weights (0 where dropped)
    expert_keep: list  # bool [B, T, 1]
    moe_inputs: list  # [B, T, D] hidden state entering each sparse MLP (after its layer norm)


def _collect(cos) -> Routing:
    cos = [co for co in cos if co.ids_BTK is not None]
    return Routing(
        [c.router_logits_BTE for c in cos],
        [c.ids_BTK for c in cos],
        [c.weights_BTK for c in cos],
        [c.keep_BTK for c in cos],
        [c.xn_BTD for c in cos],
    )


class SwitchStack(nnx.Module):
    """Encoder or decoder: blocks, then the final T5 layer norm.

    With untied embeddings transformers 5 gives each stack its own `embed_tokens` (`embed_VD` here);
    tied, both stacks read the model's shared table.
    """

    def __init__(self, cfg: ModelConfig, is_decoder: bool, *, rngs: nnx.Rngs):
        n = (cfg.num_decoder_layers or cfg.num_layers) if is_decoder else cfg.num_layers
        step = cfg.decoder_sparse_step_switch if is_decoder else cfg.encoder_sparse_step
        sparse = set(sparse_layers(n, step))
        self.layers = nnx.List([SwitchBlock(cfg, i, is_decoder, i in sparse, rngs=rngs) for i in range(n)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, DTYPES[cfg.dtype])
        self.embed_VD = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(init_normal(rngs, (cfg.vocab_size, cfg.hidden_size), DTYPES[cfg.dtype], std=1.0))
        )
        self.is_decoder = is_decoder

    def position_bias(self, q_len: int, k_len: int, q_start=0):
        return self.layers[0].core.rel_bias(q_len, k_len, q_start)

    def cross_kv(self, enc_h_BSD):
        """Every decoder block's cross-attention keys and values over the encoder output."""
        return [layer.core.cross_attn.project_kv(enc_h_BSD) for layer in self.layers]

    def __call__(self, x_BTD, mask_BTS, bias_1HTS, cross_kvs=None, cross_mask_BTS=None, kvs=None, start=0):
        """Returns (normed output, Routing, self-attention kvs)."""
        cos, new_kvs = [], []
        for i, layer in enumerate(self.layers):
            x_BTD, co, kv = layer(
                x_BTD,
                bias_1HTS,
                mask_BTS,
                None if cross_kvs is None else cross_kvs[i],
                cross_mask_BTS,
                None if kvs is None else kvs[i],
                start,
            )
            cos.append(co)
            new_kvs.append(kv)
        return self.final_norm(x_BTD), _collect(cos), new_kvs


@struct.dataclass
class SwitchOutput:
    """Full forward output. Lists hold one entry per sparse block, encoder and decoder apart."""

    logits: jax.Array  # float32 [B, T, V]
    encoder_router_logits: list  # float32 [B, S, E], raw
    decoder_router_logits: list  # float32 [B, T, E], raw
    encoder_expert_ids: list  # int32 [B, S, 1]
    decoder_expert_ids: list  # int32 [B, T, 1]
    encoder_expert_weights: list  # float32 [B, S, 1] (0 where capacity dropped the token)
    decoder_expert_weights: list  # float32 [B, T, 1]
    encoder_last_hidden_state: jax.Array  # [B, S, D]
    encoder_moe_inputs: list  # [B, S, D] input of each sparse MLP (after its layer norm)
    decoder_moe_inputs: list  # [B, T, D]

    @property
    def router_logits(self) -> list:
        """All sparse blocks in `ModelConfig.moe_layers` order: encoder first, then decoder."""
        return list(self.encoder_router_logits) + list(self.decoder_router_logits)


@struct.dataclass
class EncoderOutput:
    hidden_BSD: jax.Array  # encoder output after its final layer norm
    routing: Routing


@struct.dataclass
class SwitchCache:
    """Decoder state for generation: self-attention kv per block and cross-attention kv per block."""

    self_kv: list  # per decoder block: (k, v) each [B, C, H, d]
    cross_kv: list  # per decoder block: (k, v) each [B, S, H, d]
    enc_valid_BS: jax.Array  # bool, real encoder tokens


def lm_head(y_BTD, embed_VD, lm_head_DV, hidden_size: int):
    """LM head over the decoder output; tied weights rescale by d_model**-0.5 first (Mesh TF)."""
    if lm_head_DV is None:
        y_BTD = y_BTD * (hidden_size**-0.5)
        w_DV = embed_VD[...].T
    else:
        w_DV = lm_head_DV[...]
    return jnp.einsum("BTD,DV->BTV", y_BTD, w_DV).astype(jnp.float32)


def _valid(mask_BT, shape):
    return jnp.ones(shape, bool) if mask_BT is None else jnp.asarray(mask_BT).astype(bool)


class SwitchModel(nnx.Module):
    """Switch Transformers encoder-decoder: shared embedding, encoder, decoder, (tied) LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "switch":
            raise ValueError(f"SwitchModel takes family 'switch', got {cfg.family!r}")
        dt = DTYPES[cfg.dtype]
        self.cfg = cfg
        self.embed_VD = nnx.Param(init_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dt, std=1.0))
        self.encoder = SwitchStack(cfg, is_decoder=False, rngs=rngs)
        self.decoder = SwitchStack(cfg, is_decoder=True, rngs=rngs)
        self.lm_head_DV = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(init_normal(rngs, (cfg.hidden_size, cfg.vocab_size), dt))
        )

    def embed(self, ids_BT, stack: SwitchStack):
        table = self.embed_VD if stack.embed_VD is None else stack.embed_VD
        return jnp.take(table[...], ids_BT, axis=0)

    def head(self, y_BTD):
        return lm_head(y_BTD, self.embed_VD, self.lm_head_DV, self.cfg.hidden_size)

    def encode(self, input_ids_BS, attention_mask_BS=None) -> EncoderOutput:
        """Encoder only. Padding is masked as a key but still counts toward expert capacity (reference)."""
        B, S = input_ids_BS.shape
        valid_BS = _valid(attention_mask_BS, (B, S))
        mask_BSS = jnp.broadcast_to(valid_BS[:, None, :], (B, S, S))
        h, routing, _ = self.encoder(
            self.embed(input_ids_BS, self.encoder), mask_BSS, self.encoder.position_bias(S, S)
        )
        return EncoderOutput(h, routing)

    def decode(self, decoder_input_ids_BT, enc_h_BSD, attention_mask_BS=None, decoder_attention_mask_BT=None):
        """Decoder over a whole sequence (no cache): (logits, Routing)."""
        B, T = decoder_input_ids_BT.shape
        S = enc_h_BSD.shape[1]
        dec_valid_BT = _valid(decoder_attention_mask_BT, (B, T))
        causal_TT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
        mask_BTT = causal_TT[None] & dec_valid_BT[:, None, :]
        cross_BTS = jnp.broadcast_to(_valid(attention_mask_BS, (B, S))[:, None, :], (B, T, S))
        y, routing, _ = self.decoder(
            self.embed(decoder_input_ids_BT, self.decoder),
            mask_BTT,
            self.decoder.position_bias(T, T),
            self.decoder.cross_kv(enc_h_BSD),
            cross_BTS,
        )
        return self.head(y), routing

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
        enc = self.encode(input_ids, attention_mask)
        logits, dec = self.decode(decoder_input_ids, enc.hidden_BSD, attention_mask, decoder_attention_mask)
        er = enc.routing
        return SwitchOutput(
            logits,
            er.router_logits,
            dec.router_logits,
            er.expert_ids,
            dec.expert_ids,
            er.expert_weights,
            dec.expert_weights,
            enc.hidden_BSD,
            er.moe_inputs,
            dec.moe_inputs,
        )

    # ---- cached decoding ------------------------------------------------------------------------
    def init_cache(self, enc_h_BSD, attention_mask_BS, max_len: int) -> SwitchCache:
        """Empty self-attention cache of C = max_len slots; cross-attention keys/values computed once."""
        B, S, _ = enc_h_BSD.shape
        H, d = self.cfg.num_heads, self.cfg.dim_head
        zeros = jnp.zeros((B, max_len, H, d), enc_h_BSD.dtype)
        self_kv = [(zeros, zeros) for _ in self.decoder.layers]
        return SwitchCache(self_kv, self.decoder.cross_kv(enc_h_BSD), _valid(attention_mask_BS, (B, S)))

    def decode_step(self, tokens_BT, cache: SwitchCache, start):
        """Decoder over tokens at positions [start, start + T) with the cache: (logits, cache, Routing)."""
        B, T = tokens_BT.shape
        C = cache.self_kv[0][0].shape[1]
        S = cache.enc_valid_BS.shape[1]
        q_pos_T = start + jnp.arange(T)
        mask_BTC = jnp.broadcast_to(jnp.arange(C)[None, :] <= q_pos_T[:, None], (B, T, C))
        cross_BTS = jnp.broadcast_to(cache.enc_valid_BS[:, None, :], (B, T, S))
        y, routing, self_kv = self.decoder(
            self.embed(tokens_BT, self.decoder),
            mask_BTC,
            self.decoder.position_bias(T, C, start),
            cache.cross_kv,
            cross_BTS,
            cache.self_kv,
            start,
        )
        return self.head(y), SwitchCache(self_kv, cache.cross_kv, cache.enc_valid_BS), routing


# ---- jitted entry points -----------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask):
    return nnx.merge(graphdef, state)(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)


def switch_forward(
    model: SwitchModel, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None
) -> SwitchOutput:
    """`model(...)` compiled once per shape: split the module and jit a pure function of its state."""
    graphdef, state = nnx.split(model)
    B, S = input_ids.shape
    T = decoder_input_ids.shape[1]
    return _forward(
        graphdef,
        state,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(decoder_input_ids, jnp.int32),
        _valid(attention_mask, (B, S)),
        _valid(decoder_attention_mask, (B, T)),
    )


@struct.dataclass
class SwitchGeneration:
    tokens: jax.Array  # int32 [B, T_new], without the decoder start token; pad after EOS
    logits: jax.Array  # float32 [B, T_new, V], the logits each token was chosen from
    encoder_expert_ids: list  # per encoder sparse block: int32 [B, S, 1]
    decoder_expert_ids: list  # per decoder sparse block: int32 [B, T_new, 1]


@partial(jax.jit, static_argnums=(0, 4))
def _encode_and_cache(graphdef, state, input_ids_BS, valid_BS, max_len: int):
    model = nnx.merge(graphdef, state)
    enc = model.encode(input_ids_BS, valid_BS)
    return model.init_cache(enc.hidden_BSD, valid_BS, max_len), enc.routing.expert_ids


@partial(jax.jit, static_argnums=(0,))
def _greedy_step(graphdef, state, tokens_B1, cache, start):
    model = nnx.merge(graphdef, state)
    logits_B1V, cache, routing = model.decode_step(tokens_B1, cache, start)
    logits_BV = logits_B1V[:, 0]
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), logits_BV, cache, routing.expert_ids


def switch_generate(
    model: SwitchModel, input_ids, max_new_tokens: int, attention_mask=None
) -> SwitchGeneration:
    """Greedy decoding as transformers' `generate(do_sample=False)`: start from `decoder_start_token_id`,
    one token per step with the cache; after EOS a row emits pad; stop early once every row has ended.

    In the cached decoder each step routes only its own token, so expert capacity never drops there
    (as in the reference); a full no-cache forward over the same tokens can differ when capacity bites.
    """
    if max_new_tokens < 1:
        raise ValueError(f"switch_generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.cfg
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, S = input_ids.shape
    valid_BS = _valid(attention_mask, (B, S))
    graphdef, state = nnx.split(model)
    cache, enc_ids = _encode_and_cache(graphdef, state, input_ids, valid_BS, max_new_tokens)
    tok_B = np.full((B,), cfg.decoder_start_token_id, np.int32)
    done_B = np.zeros((B,), bool)
    toks, logits, dec_ids = [], [], []
    for t in range(max_new_tokens):
        nxt, lg, cache, ids = _greedy_step(graphdef, state, jnp.asarray(tok_B)[:, None], cache, jnp.int32(t))
        nxt = np.asarray(nxt)
        if cfg.eos_token_id is not None:
            nxt = np.where(done_B, cfg.pad_token_id, nxt).astype(np.int32)
            done_B = done_B | (nxt == cfg.eos_token_id)
        toks.append(nxt)
        logits.append(lg)
        dec_ids.append(ids)
        tok_B = nxt
        if done_B.all():
            break
    dec_ids = [jnp.concatenate([step[j] for step in dec_ids], axis=1) for j in range(len(dec_ids[0]))]
    return SwitchGeneration(jnp.asarray(np.stack(toks, axis=1)), jnp.stack(logits, axis=1), enc_ids, dec_ids)
