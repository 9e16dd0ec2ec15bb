"""The MoE block as visible steps: route (router logits -> top-k), expert_ffn (dispatch, combine).

`ExpertBank` holds one layer's stacked expert weights; it is kept apart from the rest of the layer so
that the offload runtime can own the experts while the model code stays unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moecxl.config import ModelConfig
from moecxl.model.expert_format import ExpertArray, ExpertFormat
from moecxl.model.experts import moe_ffn
from moecxl.model.layers import DTYPES, init_normal
from moecxl.model.router import deepseek_v2, deepseek_v3, softmax_topk, topk_softmax


class ExpertParam(nnx.Param):
    """Expert weights: the variables the offload runtime may keep outside device memory."""


class ExpertBank(nnx.Module):
    """SwiGLU experts stacked on a leading E axis: gate/up [E, D, F], down [E, F, D]."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        gated: bool = True,
        fmt: ExpertFormat | None = None,
    ):
        E, D, F = num_experts, d_model, d_ff
        self.fmt = fmt if fmt is not None and not fmt.legacy else None
        if self.fmt is not None:  # GPT-OSS: the format's arrays by name, in its order
            for a in self.fmt.arrays:
                setattr(self, a.name, ExpertParam(_init_array(rngs, E, a)))
            self.gated = True
            return
        if gated:
            self.w_gate_EDF = ExpertParam(init_normal(rngs, (E, D, F), dtype))
            self.w_up_EDF = ExpertParam(init_normal(rngs, (E, D, F), dtype))
        else:
            self.w_in_EDF = ExpertParam(init_normal(rngs, (E, D, F), dtype))
        self.w_down_EFD = ExpertParam(init_normal(rngs, (E, F, D), dtype))
        self.gated = gated

    def arrays(self) -> tuple[tuple, object]:
        """(ins, out): the input matrices ([E, D, F] each) and the output matrix [E, F, D]; with a
        format, its arrays in order, the last one as `out`."""
        if self.fmt is not None:
            ws = [getattr(self, a.name)[...] for a in self.fmt.arrays]
            return tuple(ws[:-1]), ws[-1]
        if self.gated:
            return (self.w_gate_EDF[...], self.w_up_EDF[...]), self.w_down_EFD[...]
        return (self.w_in_EDF[...],), self.w_down_EFD[...]

    @property
    def num_experts(self) -> int:
        return self.arrays()[1].shape[0]


def _init_array(rngs: nnx.Rngs, E: int, a: ExpertArray):
    """Random expert array of a format: normal floats; MXFP4 random codes with scales near 2^-6;
    biases as the bytes of small floats."""
    if a.dtype != "uint8":
        return init_normal(rngs, (E, *a.shape), DTYPES[a.dtype])
    key = rngs.params()
    if a.name.endswith("_blocks"):
        return jax.random.randint(key, (E, *a.shape), 0, 256, jnp.int32).astype(jnp.uint8)
    if a.name.endswith("_scales"):
        return jax.random.randint(key, (E, *a.shape), 119, 123, jnp.int32).astype(jnp.uint8)
    dt = {4: jnp.float32, 2: jnp.bfloat16}[a.shape[-1]]
    b = (0.02 * jax.random.normal(key, (E, *a.shape[:-1]), jnp.float32)).astype(dt)
    return jax.lax.bitcast_convert_type(b, jnp.uint8)


def route(router_logits_NE, cfg: ModelConfig, bias_E=None):
    """Family routing semantics: (weights_NK, ids_NK, keep_NK). `bias_E`: V3's score correction."""
    if cfg.family == "gpt_oss":
        return topk_softmax(router_logits_NE, cfg.top_k)
    g, tg, scale = cfg.n_groups, cfg.topk_group or 1, cfg.routed_scaling_factor
    if cfg.topk_method == "noaux_tc":
        return deepseek_v3(router_logits_NE, bias_E, cfg.top_k, g, tg, cfg.norm_topk_prob, scale)
    if cfg.topk_method == "group_limited_greedy" or scale != 1.0:
        return deepseek_v2(router_logits_NE, cfg.top_k, cfg.topk_method, g, tg, cfg.norm_topk_prob, scale)
    return softmax_topk(router_logits_NE, cfg.top_k, cfg.norm_topk_prob or cfg.family == "mixtral")


def expert_step(
    xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E=None, fmt: ExpertFormat | None = None, dtype=None
):
    """The expert half of an MoE layer over slot arrays: out_BTD = sum_k w·FFN_k(xn) (`fmt`: the
    experts' format, `expert_format.expert_format(cfg)`; None: SwiGLU or ReLU; `dtype`: the experts'
    dtype when the arrays hold its bits, as the engine's slots do)."""
    B, T, D = xn_BTD.shape
    K = ids_BTK.shape[-1]
    x_ND, ids_NK, w_NK = xn_BTD.reshape(B * T, D), ids_BTK.reshape(B * T, K), weights_BTK.reshape(B * T, K)
    y_ND = moe_ffn(x_ND, ids_NK, w_NK, ins, out, slot_E, fmt, dtype)
    return y_ND.reshape(B, T, D).astype(xn_BTD.dtype)


class DenseMLP(nnx.Module):
    """SwiGLU MLP of dense (non-MoE) layers (Qwen3-MoE `mlp_only_layers`)."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.w_gate_DF = nnx.Param(init_normal(rngs, (d_model, d_ff), dtype))
        self.w_up_DF = nnx.Param(init_normal(rngs, (d_model, d_ff), dtype))
        self.w_down_FD = nnx.Param(init_normal(rngs, (d_ff, d_model), dtype))

    def __call__(self, x_BTD):
        import jax

        g = jnp.einsum("BTD,DF->BTF", x_BTD, self.w_gate_DF[...])
        u = jnp.einsum("BTD,DF->BTF", x_BTD, self.w_up_DF[...])
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(g) * u, self.w_down_FD[...])


def param_dtype(cfg: ModelConfig):
    return DTYPES[cfg.dtype]
