"""The host kernel's batched path: an expert's FFN for many tokens as XLA:CPU GEMMs on its stored bytes.

From about 8-16 tokens an expert is compute-bound on the host, and the row-streaming loops of
`memory.hostkernel` (float32 FMAs on widened weights) reach a third of the float32 peak. XLA's CPU
backend hands bf16 x bf16 and int8 x int8 dots to its GEMM library (YNNPACK, with AVX-512 BF16 / VNNI /
AMX where the CPU has them), which packs the weights panel by panel (no whole-matrix temporary: measured
+6 MB of peak RSS on a 117 MB matrix). The stored matrices are handed to XLA in place: `jax.device_put(
..., may_alias=True)` on the CPU device aliases a 64-byte-aligned host buffer, and `aliased` checks that it
did (a copy would be a second copy of the expert; the caller falls back to the loops instead).

Activations stay float32-accurate though the GEMMs take 16- or 8-bit operands: each activation row is
split into a high and a low part (bf16: x = hi + lo, both bf16; int8: x*s = a*q1 + b*q2 with per-row
scales a, b and the stored per-row weight scales s folded in first), both parts go through one GEMM of
2N rows (the weights are read once; at these shapes the extra rows cost ~nothing), and the halves are
summed. Error per activation: ~2^-17 of itself (bf16 pair); at most 1/(4*127^2) ~ 1.6e-5 of its row's
largest (int8 pair): measured 6e-6 (bf16) and 6e-5 (int8) of the largest output against the float64
reference, well under the stored weights' own rounding (2^-9; 1/254 of a row's largest for int8).

Token counts are padded to a power of two (at least MIN_ROWS) so a decode-to-prefill mix compiles a
handful of shapes, not one per count; batches over MAX_ROWS go in chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MIN_ROWS = 8  # smallest padded token count (one compile covers 1..8)
MAX_ROWS = 1024  # tokens per call; more go in chunks
INT32_SAFE_K = (2**31 - 1) // (127 * 127)  # longest int8 x int8 dot an int32 accumulator holds exactly


@functools.cache
def _cpu():
    return jax.devices("cpu")[0]


def aliased(w: np.ndarray) -> jax.Array | None:
    """`w` as a CPU jax.Array over the same bytes, or None where XLA would have copied it (a buffer not
    64-byte aligned, or not contiguous)."""
    if not w.flags.c_contiguous:
        return None
    a = jax.device_put(w, _cpu(), may_alias=True)
    if a.unsafe_buffer_pointer() != w.ctypes.data:
        a.delete()
        return None
    return a


def _split_bf16(x_NR):
    """x_NR (f32) as [hi; lo] bf16 rows with hi + lo == x to ~2^-16."""
    hi = x_NR.astype(jnp.bfloat16)
    lo = (x_NR - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.concatenate([hi, lo], axis=0)


def _row_scale(z_NR):
    """Per-row symmetric int8 scale of z (1 for an all-zero row, the padding)."""
    a = jnp.max(jnp.abs(z_NR), axis=1, keepdims=True) / 127.0
    return jnp.where(a > 0, a, 1.0)


def _mm(x_NR, w_RC, s_R):
    """x_NR @ diag(s_R) @ w_RC in float32 from w's stored dtype (bf16, float32, or int8 with s_R)."""
    N = x_NR.shape[0]
    if w_RC.dtype == jnp.float32:
        return jnp.dot(x_NR, w_RC, preferred_element_type=jnp.float32)
    if w_RC.dtype == jnp.bfloat16:
        y2 = jnp.dot(_split_bf16(x_NR), w_RC, preferred_element_type=jnp.float32)
        return y2[:N] + y2[N:]
    z = x_NR * s_R[None, :]  # int8: the row scales fold into the activations
    a = _row_scale(z)
    q1 = jnp.round(z / a)
    r = z - q1 * a
    b = _row_scale(r)
    q2 = jnp.round(r / b)
    q = jnp.concatenate([q1, q2], axis=0).astype(jnp.int8)
    y2 = jnp.dot(q, w_RC, preferred_element_type=jnp.int32).astype(jnp.float32)
    return y2[:N] * a + y2[N:] * b


@functools.partial(jax.jit, static_argnames=("act",))
def _ffn(x_ND, mats, scales, act: str):
    """SwiGLU (gate, up, down) or ReLU (in, down) over stored matrices; float32 out."""
    if act == "silu":
        g, u = _mm(x_ND, mats[0], scales[0]), _mm(x_ND, mats[1], scales[1])
        h = g * jax.nn.sigmoid(g) * u
    else:
        h = jnp.maximum(_mm(x_ND, mats[0], scales[0]), 0.0)
    return _mm(h, mats[-1], scales[-1])


def _rows_for(n: int) -> int:
    """Padded token count: the next power of two, at least MIN_ROWS."""
    return max(MIN_ROWS, 1 << (n - 1).bit_length())


def ffn(x_ND: np.ndarray, mats, act: str) -> np.ndarray | None:
    """One expert's FFN over N tokens (float32 [N, D] in, float32 out) by XLA GEMMs on the stored
    matrices `mats` ([(w_RC, scales_R or None)], numpy views of the stored bytes: bf16, float32, or
    int8 with scales). None when a matrix cannot be read in place (the caller uses the loops)."""
    held = []
    for w, s in mats:
        if w.dtype == np.int8 and w.shape[0] > INT32_SAFE_K:
            return None  # an int32 accumulator could overflow on rows this long
        a = aliased(w)
        if a is None:
            return None
        held.append((a, None if s is None else jax.device_put(np.asarray(s, np.float32), _cpu())))
    ws = tuple(a for a, _ in held)
    ss = tuple(s for _, s in held)
    N = x_ND.shape[0]
    out = []
    for lo in range(0, N, MAX_ROWS):
        chunk = x_ND[lo : lo + MAX_ROWS]
        n = chunk.shape[0]
        rows = _rows_for(n)
        x = np.zeros((rows, chunk.shape[1]), np.float32)
        x[:n] = chunk
        y = _ffn(jax.device_put(x, _cpu()), ws, ss, act)
        out.append(np.asarray(y)[:n])
    return out[0] if len(out) == 1 else np.concatenate(out, axis=0)
