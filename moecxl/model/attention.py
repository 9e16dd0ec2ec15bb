"""Grouped-query self-attention with RoPE, optional q/k norm and a KV cache (decoder families)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
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


def sdpa(q_BTHd, k_BSGd, v_BSGd, mask_BTS, sinks_H=None):
    """Softmax attention in float32; H query heads share G = H / rep key-value heads. `sinks_H` (GPT-OSS):
    a per-head logit that joins each softmax's denominator and attends to nothing."""
    B, T, H, Dh = q_BTHd.shape
    G = k_BSGd.shape[2]
    q_BTGRd = q_BTHd.reshape(B, T, G, H // G, Dh)
    scores = jnp.einsum("BTGRd,BSGd->BGRTS", q_BTGRd, k_BSGd).astype(jnp.float32) / jnp.sqrt(jnp.float32(Dh))
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, NEG_INF)
    if sinks_H is not None:
        S = scores.shape[-1]
        sink = jnp.broadcast_to(sinks_H.astype(jnp.float32).reshape(1, G, H // G, 1, 1), (B, G, H // G, T, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :S]
        probs = probs.astype(v_BSGd.dtype)
    else:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGd.dtype)
    out = jnp.einsum("BGRTS,BSGd->BTGRd", probs, v_BSGd)
    return out.reshape(B, T, H * Dh)


def yarn_rope(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2] float32, cos/sin scale) of `cfg.rope_scaling`: default, or YaRN as transformers
    5.25 computes it (`_compute_yarn_parameters`; GPT-OSS passes truncate=False)."""
    base = cfg.rope_theta
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    p = dict(cfg.rope_scaling)
    if p.get("rope_type", p.get("type", "default")) == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = float(p["factor"])
    scale = p.get("attention_factor") or (1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0)
    original = p.get("original_max_position_embeddings") or cfg.max_position_embeddings

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1 - ramp)
    return inv_freq.astype(np.float32), float(scale)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
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
        # GPT-OSS: a window of this layer's own (the mask the caller builds is causal only), sinks, YaRN
        self.window = cfg.layer_window_of(layer)
        self.sinks_H = nnx.Param(jnp.zeros((H,), dt)) if cfg.attention_sinks else None
        self.yarn = cfg.family == "gpt_oss"
        if self.yarn:
            inv_freq, self.rope_scale = yarn_rope(cfg, Dh)
            self.inv_freq = tuple(float(f) for f in inv_freq)  # static: not a parameter

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
        if self.yarn:
            freqs_BTh = pos_BT.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq, jnp.float32)
            emb = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
            cos, sin = jnp.cos(emb) * self.rope_scale, jnp.sin(emb) * self.rope_scale
        else:
            cos, sin = rope_cos_sin(pos_BT, Dh, self.rope_theta)
        q_BTHd, k_BTGd = apply_rope(q_BTHd, cos, sin), apply_rope(k_BTGd, cos, sin)
        if kv is None:
            k_all, v_all = k_BTGd, v_BTGd
        else:
            k_cache, v_cache = kv
            k_all = jax.lax.dynamic_update_slice(k_cache, k_BTGd.astype(k_cache.dtype), (0, start, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache, v_BTGd.astype(v_cache.dtype), (0, start, 0, 0))
        if self.window is not None:  # key j visible to query start + t when (start + t) - j < window
            S = k_all.shape[1]
            near_TS = (start + jnp.arange(T))[:, None] - jnp.arange(S)[None, :] < self.window
            mask_BTS = mask_BTS & near_TS[None]
        y = sdpa(q_BTHd, k_all, v_all, mask_BTS, None if self.sinks_H is None else self.sinks_H[...])
        return self.o_proj(y), (k_all, v_all)
