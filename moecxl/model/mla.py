"""Multi-head latent attention (DeepSeek-V2 / V3) with its compressed KV cache.

Keys and values come from a low-rank latent: per token the cache keeps the normalised latent c [C]
(C = kv_lora_rank) and one roped key r [R] shared by every head, not per-head K/V. The up-projection
`kv_b_proj` is absorbed into the query (scores = q_nope·W_k·c + q_rope·r) and the output (o = p·c·W_v),
so neither prefill nor decode expands the cache to H heads.

Rope acts on the R dims only. DeepSeek lays them out in interleaved pairs; with `rope_interleave` we
de-interleave (evens, then odds) and rotate halves, as transformers does: q and k get the same
permutation, so the scores are those of the pairwise rotation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.config import ModelConfig
from moecxl.model.attention import NEG_INF
from moecxl.model.layers import DTYPES, Dense, RMSNorm, apply_rope

LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm keep their default eps


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [R/2] float32, attention factor) of the rope part: default or YaRN, as transformers
    5.25 computes them (`_compute_yarn_parameters`)."""
    R, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = np.float32(base) ** (np.arange(0, R, 2, dtype=np.float32) / np.float32(R))
    p = dict(cfg.rope_scaling)
    if p.get("rope_type", p.get("type", "default")) == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = float(p["factor"])
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    original = p.get("original_max_position_embeddings") or cfg.max_position_embeddings

    def correction_dim(rotations):
        return R * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, R - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(R // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 when scaled (DeepSeek's)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    p = dict(cfg.rope_scaling)
    if p.get("rope_type", p.get("type", "default")) != "default" and p.get("mscale_all_dim"):
        m = _yarn_mscale(float(p["factor"]), p["mscale_all_dim"])
        scale = scale * m * m
    return scale


def mla_kv_cache(cfg: ModelConfig, B: int, S: int, dtype) -> tuple:
    """Empty compressed cache of one layer: latent [B, S, C] and shared roped key [B, S, R]."""
    return (jnp.zeros((B, S, cfg.kv_lora_rank), dtype), jnp.zeros((B, S, cfg.qk_rope_head_dim), dtype))


class MLAttention(nnx.Module):
    """DeepSeek's attention: low-rank q (optional) and kv, rope on a part of each head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        D, H = cfg.hidden_size, cfg.num_heads
        C, R, Pn, V = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = Dense(D, H * (Pn + R), rngs=rngs, dtype=dt)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Dense(D, cfg.q_lora_rank, rngs=rngs, dtype=dt, bias=bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, dt)
            self.q_b_proj = Dense(cfg.q_lora_rank, H * (Pn + R), rngs=rngs, dtype=dt)
        self.kv_a_proj = Dense(D, C + R, rngs=rngs, dtype=dt, bias=bias)
        self.kv_a_norm = RMSNorm(C, LATENT_NORM_EPS, dt)
        self.kv_b_proj = Dense(C, H * (Pn + V), rngs=rngs, dtype=dt)
        self.o_proj = Dense(H * V, D, rngs=rngs, dtype=dt, bias=bias)
        self.shape = (H, C, R, Pn, V)
        self.interleave = cfg.rope_interleave
        inv_freq, self.rope_factor = rope_tables(cfg)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static: a constant of the compiled step
        self.scale = softmax_scale(cfg)

    def _rope(self, x_BTHr, pos_BT):
        if self.interleave:  # pairs (x0, x1), ... -> evens then odds, then rotate halves
            x_BTHr = jnp.concatenate([x_BTHr[..., 0::2], x_BTHr[..., 1::2]], axis=-1)
        freqs_BTh = pos_BT.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq, jnp.float32)
        emb_BTr = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
        cos, sin = jnp.cos(emb_BTr) * self.rope_factor, jnp.sin(emb_BTr) * self.rope_factor
        return apply_rope(x_BTHr, cos, sin)

    def __call__(self, x_BTD, pos_BT, mask_BTS, kv=None, start=0):
        """Returns (y_BTD, (c_BSC, r_BSR)). With `kv`, the new latents are written at [start, start+T)."""
        B, T, _ = x_BTD.shape
        H, C, R, Pn, V = self.shape
        if self.q_proj is not None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))
        q_BTHq = q.reshape(B, T, H, Pn + R)
        q_nope_BTHn, q_rope_BTHr = q_BTHq[..., :Pn], self._rope(q_BTHq[..., Pn:], pos_BT)
        ckv_BTX = self.kv_a_proj(x_BTD)
        c_BTC = self.kv_a_norm(ckv_BTX[..., :C])
        r_BTR = self._rope(ckv_BTX[..., None, C:], pos_BT)[:, :, 0, :]
        if kv is None:
            c_BSC, r_BSR = c_BTC, r_BTR
        else:
            c_cache, r_cache = kv
            c_BSC = jax.lax.dynamic_update_slice(c_cache, c_BTC.astype(c_cache.dtype), (0, start, 0))
            r_BSR = jax.lax.dynamic_update_slice(r_cache, r_BTR.astype(r_cache.dtype), (0, start, 0))
        w_CHx = self.kv_b_proj.w[...].reshape(C, H, Pn + V)
        w_k_CHn, w_v_CHv = w_CHx[..., :Pn], w_CHx[..., Pn:]
        q_lat_BTHC = jnp.einsum("BTHn,CHn->BTHC", q_nope_BTHn, w_k_CHn)
        scores_BHTS = jnp.einsum("BTHC,BSC->BHTS", q_lat_BTHC, c_BSC) + jnp.einsum(
            "BTHr,BSr->BHTS", q_rope_BTHr, r_BSR
        )
        scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS.astype(jnp.float32) * self.scale, NEG_INF)
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(c_BSC.dtype)
        o_lat_BTHC = jnp.einsum("BHTS,BSC->BTHC", probs_BHTS, c_BSC)
        y_BTHv = jnp.einsum("BTHC,CHv->BTHv", o_lat_BTHC, w_v_CHv)
        return self.o_proj(y_BTHv.reshape(B, T, H * V)), (c_BSC, r_BSR)
