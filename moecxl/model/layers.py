"""Small building blocks shared by every family: parameter init, RMSNorm, dense projections, RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def init_normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def rms_norm(x, scale_D, eps: float):
    """HF RMSNorm: normalise in float32, cast back, then scale (Mixtral, OLMoE, Qwen3, T5)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return scale_D.astype(x.dtype) * y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.scale_D = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale_D[...], self.eps)


class Dense(nnx.Module):
    """y = x @ w (+ b), w stored [in, out]."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bias: bool = False,
        std: float = 0.02,
    ):
        self.w = nnx.Param(init_normal(rngs, (d_in, d_out), dtype, std))
        self.b = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.w[...])
        if self.b is not None:
            y = y + self.b[...]
        return y


def rope_cos_sin(pos_BT, dim_head: int, theta: float):
    """HF default rotary embedding tables, float32: cos, sin of shape [B, T, dim_head]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim_head, 2, dtype=jnp.float32) / dim_head))
    freqs_BTh = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTHd, cos_BTd, sin_BTd):
    """Rotate-half RoPE (not interleaved), as in transformers' Llama-style models."""
    half = x_BTHd.shape[-1] // 2
    rot = jnp.concatenate([-x_BTHd[..., half:], x_BTHd[..., :half]], axis=-1)
    cos = cos_BTd[:, :, None, :].astype(x_BTHd.dtype)
    sin = sin_BTd[:, :, None, :].astype(x_BTHd.dtype)
    return x_BTHd * cos + rot * sin
