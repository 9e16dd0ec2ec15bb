"""Grouped-query self-attention with RoPE, optional q/k norm and a KV cache (decoder families)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moecxl.config import ModelConfig
from moecxl.model.layers import DTYPES, Dense, RMSNorm, apply_rope, rope_cos_sin

NEG_INF = -1e30


def attention_mask(key_valid_BS, q_index_BT, sliding_window: int | None = None):
    """Boolean [B, T, S]: key j is visible to query i when valid, j <= i and (window) i - j < w."""
    S = key_valid_BS.shape[1]
    j_S = jnp.arange(S)
    mask = (j_S[None, None, :] <= q_index_BT[:, :, None]) & key_valid_BS[:, None, :]
    if sliding_window is not None:
        mask = mask & (q_index_BT[:, :, None] - j_S[None, None, :] < sliding_window)
    return mask


def sdpa(q_BTHd, k_BSGd, v_BSGd, mask_BTS):
    """Softmax attention in float32; H query heads share G = H / rep key-value heads."""
    B, T, H, Dh = q_BTHd.shape
    G = k_BSGd.shape[2]
    q_BTGRd = q_BTHd.reshape(B, T, G, H // G, Dh)
    scores = jnp.einsum("BTGRd,BSGd->BGRTS", q_BTGRd, k_BSGd).astype(jnp.float32) / jnp.sqrt(jnp.float32(Dh))
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGd.dtype)
    out = jnp.einsum("BGRTS,BSGd->BTGRd", probs, v_BSGd)
    return out.reshape(B, T, H * Dh)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        D, H, G, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
        self.q_proj = Dense(D, H * Dh, rngs=rngs, dtype=dt, bias=cfg.attention_bias)
        self.k_proj = Dense(D, G * Dh, rngs=rngs, dtype=dt, bias=cfg.attention_bias)
        self.v_proj = Dense(D, G * Dh, rngs=rngs, dtype=dt, bias=cfg.attention_bias)
        self.o_proj = Dense(H * Dh, D, rngs=rngs, dtype=dt, bias=cfg.attention_bias)  # HF: o_proj too
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps, dt), RMSNorm(Dh, cfg.rms_norm_eps, dt)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(H * Dh, cfg.rms_norm_eps, dt)
            self.k_norm = RMSNorm(G * Dh, cfg.rms_norm_eps, dt)
        else:
            self.q_norm = self.k_norm = None
        self.qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        self.num_heads, self.num_kv_heads, self.dim_head = H, G, Dh
        self.rope_theta = cfg.rope_theta

    def __call__(self, x_BTD, pos_BT, mask_BTS, kv=None, start=0):
        """Returns (y_BTD, (k_BSGd, v_BSGd)). With `kv`, new keys are written at [start, start+T)."""
        B, T, _ = x_BTD.shape
        H, G, Dh = self.num_heads, self.num_kv_heads, self.dim_head
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.qk_norm == "full":  # OLMoE: norm over all heads at once, then clip
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
        q_BTHd, k_BTGd, v_BTGd = q.reshape(B, T, H, Dh), k.reshape(B, T, G, Dh), v.reshape(B, T, G, Dh)
        if self.qk_norm == "head":  # Qwen3: norm per head
            q_BTHd, k_BTGd = self.q_norm(q_BTHd), self.k_norm(k_BTGd)
        cos, sin = rope_cos_sin(pos_BT, Dh, self.rope_theta)
        q_BTHd, k_BTGd = apply_rope(q_BTHd, cos, sin), apply_rope(k_BTGd, cos, sin)
        if kv is None:
            k_all, v_all = k_BTGd, v_BTGd
        else:
            k_cache, v_cache = kv
            k_all = jax.lax.dynamic_update_slice(k_cache, k_BTGd.astype(k_cache.dtype), (0, start, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache, v_BTGd.astype(v_cache.dtype), (0, start, 0, 0))
        y = sdpa(q_BTHd, k_all, v_all, mask_BTS)
        return self.o_proj(y), (k_all, v_all)
