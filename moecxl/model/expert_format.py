"""Expert formats: what one expert is, as the model, the host store and the device cache hold it.

A format lists an expert's arrays in order (name, shape without the E axis, dtype) and names the FFN
that consumes them once gathered. The runtime packs the arrays in this order into one slab and keeps
the last one as `out` (its (ins, out) convention); the FFN reads them all. Formats:

- `swiglu` (Mixtral, OLMoE, Qwen3-MoE, DeepSeek): gate [D, F], up [D, F], down [F, D].
- `relu` (Switch): wi [D, F], wo [F, D].
- `gptoss`: gate_up [D, 2F] (gate and up interleaved: even / odd columns) and its bias [2F], down's
  bias [D], down [F, D]; clamped SwiGLU `(up + 1) * gate * sigmoid(alpha * gate)`.
- `gptoss_mxfp4`: the same FFN over the checkpoint's MXFP4 bytes, dequantised inside the step:
  blocks uint8 [rows, cols/32, 16] (two E2M1 values a byte, low nibble first) and E8M0 scales uint8
  [rows, cols/32] (2^(s-127)) per projection, torch [out, in] rows; biases kept as their bytes
  ([n, itemsize] uint8), so every array is uint8 and an expert's bytes on the link are the stored ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moecxl.config import ModelConfig

MXFP4_BLOCK = 32  # values per E8M0 scale
# E2M1 code -> value (sign bit 3, then exponent 2 bits, mantissa 1 bit)
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
DTYPE_NAMES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "uint8": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class ExpertArray:
    """One per-expert array: its name in `ExpertBank`, its shape without the E axis, its stored dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ExpertFormat:
    """An expert's arrays in order and the FFN over them (hashable: a static argument of jitted steps)."""

    kind: str  # swiglu | relu | gptoss | gptoss_mxfp4
    arrays: tuple[ExpertArray, ...]
    compute_dtype: str  # dtype the FFN computes in (a bias's dtype for MXFP4)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def nbytes(self) -> int:
        """Bytes of one expert as stored (what a copy moves)."""
        return sum(int(np.prod(a.shape)) * DTYPE_NAMES[a.dtype].itemsize for a in self.arrays)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(a.shape for a in self.arrays)

    @property
    def legacy(self) -> bool:
        """The (ins [E, D, F]..., out [E, F, D]) matrices of the SwiGLU / ReLU experts."""
        return self.kind in ("swiglu", "relu")

    @property
    def host_kernel(self) -> bool:
        """Whether `memory.hostkernel` can compute this format on the host."""
        return self.legacy

    def ffn(self, x, ws, eq_in: str, eq_out: str):
        """Experts' outputs for gathered arrays `ws` (format order, a leading group axis each)."""
        if self.legacy:
            return legacy_ffn(x, ws[:-1], ws[-1], eq_in, eq_out)
        if self.kind == "gptoss":
            w_gate_up, b_gate_up, b_down, w_down = ws
        else:
            gu_blocks, gu_scales, b_gate_up, b_down, d_blocks, d_scales = ws
            dt = DTYPE_NAMES[self.compute_dtype]
            w_gate_up = jnp.swapaxes(mxfp4_dequantize(gu_blocks, gu_scales, dt), -1, -2)  # [G, D, 2F]
            w_down = jnp.swapaxes(mxfp4_dequantize(d_blocks, d_scales, dt), -1, -2)  # [G, F, D]
            b_gate_up = jax.lax.bitcast_convert_type(b_gate_up, dt)
            b_down = jax.lax.bitcast_convert_type(b_down, dt)
        h = expert_einsum(eq_in, x, w_gate_up) + b_gate_up[:, None, :]
        h = clamped_swiglu(h, self.swiglu_alpha, self.swiglu_limit)
        return expert_einsum(eq_out, h, w_down) + b_down[:, None, :]


WIDEN_MAX_BYTES = 64 << 20  # bf16 weight operands up to this size go through XLA's own einsum


def expert_einsum(eq: str, x, w):
    """An expert matmul. bf16 weights over WIDEN_MAX_BYTES are read as stored, with float32 sums: XLA:CPU
    computes a bf16 einsum through a float32 copy of the weights (smaller operands keep XLA's einsum and its
    exact rounding). bf16 activations give the bf16 result a bf16 einsum rounds to; float32 ones go as
    hi + lo bf16 parts stacked on the token axis (x's and the result's second-last), so products are
    exact, sums float32, and x is carried to ~2^-17 of itself."""
    small = w.size * w.dtype.itemsize <= WIDEN_MAX_BYTES
    if w.dtype != jnp.bfloat16 or x.dtype not in (jnp.bfloat16, jnp.float32) or small:
        return jnp.einsum(eq, x, w)
    if x.dtype == jnp.bfloat16:
        if x.shape[-2] > 1:
            return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        # one row: XLA:CPU's bf16 matrix-vector product widens the weights; a zero second row avoids it
        x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=-2)
        return jnp.einsum(eq, x2, w, preferred_element_type=jnp.float32)[..., :1, :].astype(jnp.bfloat16)
    hi = x.astype(jnp.bfloat16)
    lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    y = jnp.einsum(eq, jnp.concatenate([hi, lo], axis=-2), w, preferred_element_type=jnp.float32)
    n = x.shape[-2]
    return y[..., :n, :] + y[..., n:, :]


def legacy_ffn(x, w_ins, w_out, eq_in: str, eq_out: str):
    """SwiGLU when two input matrices (gate, up), ReLU MLP when one (Switch's wi)."""
    if len(w_ins) == 2:
        g = expert_einsum(eq_in, x, w_ins[0])
        u = expert_einsum(eq_in, x, w_ins[1])
        h = jax.nn.silu(g) * u
    else:
        h = jax.nn.relu(expert_einsum(eq_in, x, w_ins[0]))
    return expert_einsum(eq_out, h, w_out)


def clamped_swiglu(gate_up, alpha: float, limit: float):
    """GPT-OSS: gate = even columns clamped above at `limit`, up = odd ones clamped to +-limit;
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = jnp.minimum(gate_up[..., ::2], limit)
    up = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def mxfp4_dequantize(blocks, scales, dtype):
    """MXFP4 -> `dtype` [..., rows, cols]: blocks uint8 [..., rows, cols/32, 16], scales uint8 E8M0
    [..., rows, cols/32]. Exact: an E2M1 value times a power of two (jnp; numpy twin below)."""
    lut = jnp.asarray(FP4_VALUES, dtype)
    lo, hi = lut[(blocks & 0x0F).astype(jnp.int32)], lut[(blocks >> 4).astype(jnp.int32)]
    vals = jnp.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])
    exp = scales.astype(jnp.int32) - 127
    out = jnp.ldexp(vals.astype(jnp.float32), exp[..., None]).astype(dtype)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 2 * blocks.shape[-1])


def mxfp4_dequantize_np(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Host twin of `mxfp4_dequantize` (checkpoint conversion, tests)."""
    vals = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)
    vals = vals.reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])
    out = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    return out.reshape(*blocks.shape[:-2], -1).astype(dtype)


def bytes_of(a: np.ndarray) -> np.ndarray:
    """A float array's bytes as uint8 [..., itemsize] (how the MXFP4 format keeps its biases)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize)


def expert_format(cfg: ModelConfig) -> ExpertFormat:
    """The expert format of a config's family (and `expert_dtype`)."""
    D, F, dt = cfg.hidden_size, cfg.intermediate_size, cfg.dtype
    if cfg.family == "switch":
        arrays = (ExpertArray("w_in_EDF", (D, F), dt), ExpertArray("w_down_EFD", (F, D), dt))
        return ExpertFormat("relu", arrays, dt)
    if cfg.family != "gpt_oss":
        names = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
        return ExpertFormat(
            "swiglu", tuple(ExpertArray(n, s, dt) for n, s in zip(names, ((D, F), (D, F), (F, D)))), dt
        )
    act = dict(swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)
    if cfg.expert_dtype is None:
        arrays = (
            ExpertArray("w_gate_up_EDI", (D, 2 * F), dt),
            ExpertArray("b_gate_up_EI", (2 * F,), dt),
            ExpertArray("b_down_ED", (D,), dt),
            ExpertArray("w_down_EFD", (F, D), dt),
        )
        return ExpertFormat("gptoss", arrays, dt, **act)
    n = DTYPE_NAMES[dt].itemsize
    arrays = (
        ExpertArray("gate_up_blocks", (2 * F, D // MXFP4_BLOCK, 16), "uint8"),
        ExpertArray("gate_up_scales", (2 * F, D // MXFP4_BLOCK), "uint8"),
        ExpertArray("gate_up_bias", (2 * F, n), "uint8"),
        ExpertArray("down_bias", (D, n), "uint8"),
        ExpertArray("down_blocks", (D, F // MXFP4_BLOCK, 16), "uint8"),
        ExpertArray("down_scales", (D, F // MXFP4_BLOCK), "uint8"),
    )
    return ExpertFormat("gptoss_mxfp4", arrays, dt, **act)
