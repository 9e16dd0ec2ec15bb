"""Decoder-only MoE language model: Mixtral, OLMoE, Qwen3-MoE and DeepSeek-V2/V3 are one class, configured.

A layer is `core` (norms, attention, router, shared experts or dense MLP) plus `experts` (an `ExpertBank`
of the routed experts only, what the offload runtime sees). The
forward returns logits and each MoE layer's routing decisions; traces come from these return values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moecxl.config import ModelConfig
from moecxl.model.attention import Attention, attention_mask
from moecxl.model.expert_format import expert_format
from moecxl.model.family import family_of
from moecxl.model.layers import DTYPES, RMSNorm, init_normal
from moecxl.model.mla import MLAttention, mla_kv_cache
from moecxl.model.moe import DenseMLP, ExpertBank, expert_step, route


def kv_cache(cfg: ModelConfig, B: int, S: int, dtype) -> tuple:
    """An empty KV cache of one layer, as its attention takes it: K, V [B, S, G, Dh] each, or MLA's
    compressed latent [B, S, C] and roped shared key [B, S, R]."""
    if cfg.is_mla:
        return mla_kv_cache(cfg, B, S, dtype)
    return tuple(jnp.zeros((B, S, cfg.num_kv_heads, cfg.dim_head), dtype) for _ in range(2))


@struct.dataclass
class MoEOutput:
    """Forward output. Per-MoE-layer lists are in layer order; shapes B batch, T tokens."""

    logits: jax.Array  # float32 [B, T, V]
    router_logits: list  # [B, T, E] raw, pre-softmax
    expert_ids: list  # int32 [B, T, K]
    expert_weights: list  # float32 [B, T, K] combine weights
    moe_inputs: list  # [B, T, D] hidden state entering each MoE block (post-attention norm)


@struct.dataclass
class CoreOut:
    """What the non-expert part of a layer hands to the expert step."""

    h_BTD: jax.Array  # residual stream after attention
    xn_BTD: jax.Array  # MoE (or MLP) input, post-attention norm
    router_logits_BTE: jax.Array | None
    weights_BTK: jax.Array | None
    ids_BTK: jax.Array | None


class LayerCore(nnx.Module):
    """Everything in a decoder layer except the experts."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.attn = MLAttention(cfg, rngs=rngs) if cfg.is_mla else Attention(cfg, rngs=rngs, layer=layer)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.is_moe = cfg.is_moe_layer(layer)
        # DeepSeek: shared experts run on every token and stay here, resident, outside `experts`;
        # V3's score correction bias picks experts (not weighs them).
        F_shared = cfg.n_shared_experts * cfg.intermediate_size
        has_shared, has_bias = self.is_moe and F_shared > 0, self.is_moe and cfg.topk_method == "noaux_tc"
        self.shared = DenseMLP(cfg.hidden_size, F_shared, rngs=rngs, dtype=dt) if has_shared else None
        self.router_bias_E = nnx.Param(jnp.zeros((cfg.num_experts,), jnp.float32)) if has_bias else None
        self.router_dtype = jnp.float32 if family_of(cfg).float32_router else None
        # GPT-OSS: the router is a biased linear layer
        self.router_logit_bias_E = (
            nnx.Param(jnp.zeros((cfg.num_experts,), dt)) if self.is_moe and cfg.router_bias else None
        )
        if self.is_moe:
            self.router_DE = nnx.Param(init_normal(rngs, (cfg.hidden_size, cfg.num_experts), dt))
            self.mlp = None
        else:
            self.router_DE = None
            d_ff = cfg.dense_intermediate_size or cfg.intermediate_size
            self.mlp = DenseMLP(cfg.hidden_size, d_ff, rngs=rngs, dtype=dt)
        self.cfg = cfg

    def __call__(self, x_BTD, pos_BT, mask_BTS, kv=None, start=0):
        """Attention and routing. Returns (CoreOut, kv). Dense layers finish the layer here."""
        a, kv = self.attn(self.input_norm(x_BTD), pos_BT, mask_BTS, kv, start)
        h = x_BTD + a
        xn = self.post_norm(h)
        if not self.is_moe:
            return CoreOut(h + self.mlp(xn), xn, None, None, None), kv
        if self.router_dtype is None:
            logits_BTE = jnp.einsum("BTD,DE->BTE", xn, self.router_DE[...])
        else:
            w_DE = self.router_DE[...].astype(self.router_dtype)
            logits_BTE = jnp.einsum("BTD,DE->BTE", xn.astype(self.router_dtype), w_DE)
        if self.router_logit_bias_E is not None:
            logits_BTE = logits_BTE + self.router_logit_bias_E[...]
        B, T, E = logits_BTE.shape
        bias_E = None if self.router_bias_E is None else self.router_bias_E[...]
        w_NK, ids_NK, _ = route(logits_BTE.reshape(B * T, E), self.cfg, bias_E)
        if self.shared is not None:
            h = h + self.shared(xn)
        K = ids_NK.shape[-1]
        return CoreOut(h, xn, logits_BTE, w_NK.reshape(B, T, K), ids_NK.reshape(B, T, K)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.core = LayerCore(cfg, layer, rngs=rngs)
        if self.core.is_moe:
            self.experts = ExpertBank(
                cfg.num_experts,
                cfg.hidden_size,
                cfg.intermediate_size,
                rngs=rngs,
                dtype=DTYPES[cfg.dtype],
                fmt=expert_format(cfg),
            )
        else:
            self.experts = None

    def __call__(self, x_BTD, pos_BT, mask_BTS, kv=None, start=0):
        co, kv = self.core(x_BTD, pos_BT, mask_BTS, kv, start)
        if self.experts is None:
            return co.h_BTD, co, kv
        ins, out = self.experts.arrays()
        y = co.h_BTD + expert_step(co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, fmt=self.experts.fmt)
        return y, co, kv


def positions_from_mask(attention_mask_BT):
    """Positions counting only real tokens (left padding gets position 0), as HF does for generation."""
    m = attention_mask_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


class MoEDecoder(nnx.Module):
    """Mixtral / OLMoE / Qwen3-MoE / DeepSeek: embed, L x (attention + MoE or dense MLP), norm, LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not cfg.is_decoder_only:
            raise ValueError(f"MoEDecoder takes a decoder family, got {cfg.family!r}")
        dt = DTYPES[cfg.dtype]
        self.cfg = cfg
        self.embed_VD = nnx.Param(init_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dt))
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.lm_head_DV = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(init_normal(rngs, (cfg.hidden_size, cfg.vocab_size), dt))
        )

    def embed(self, input_ids_BT):
        return jnp.take(self.embed_VD[...], input_ids_BT, axis=0)

    def head(self, x_BTD):
        w_DV = self.embed_VD[...].T if self.lm_head_DV is None else self.lm_head_DV[...]
        return jnp.einsum("BTD,DV->BTV", self.norm(x_BTD), w_DV).astype(jnp.float32)

    def __call__(self, input_ids_BT, attention_mask_BT=None) -> MoEOutput:
        """Full-sequence forward (no cache). `attention_mask_BT` marks real tokens (left padding)."""
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((B, T), bool)
        valid_BT = attention_mask_BT.astype(bool)
        pos_BT = positions_from_mask(valid_BT)
        mask_BTS = attention_mask(valid_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), self.cfg.sliding_window)
        x = self.embed(input_ids_BT)
        rl, ids, ws, xs = [], [], [], []
        for layer in self.layers:
            x, co, _ = layer(x, pos_BT, mask_BTS)
            if co.ids_BTK is not None:
                rl.append(co.router_logits_BTE)
                ids.append(co.ids_BTK)
                ws.append(co.weights_BTK)
                xs.append(co.xn_BTD)
        return MoEOutput(self.head(x), rl, ids, ws, xs)
