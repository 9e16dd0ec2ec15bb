"""The MoE block as visible steps: route (router logits -> top-k), expert_ffn (dispatch, combine).

`ExpertBank` holds one layer's stacked expert weights; it is kept apart from the rest of the layer so
that the offload runtime can own the experts while the model code stays unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moecxl.config import ModelConfig
from moecxl.model.experts import moe_ffn
from moecxl.model.layers import DTYPES, init_normal
from moecxl.model.router import softmax_topk


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
    ):
        E, D, F = num_experts, d_model, d_ff
        if gated:
            self.w_gate_EDF = ExpertParam(init_normal(rngs, (E, D, F), dtype))
            self.w_up_EDF = ExpertParam(init_normal(rngs, (E, D, F), dtype))
        else:
            self.w_in_EDF = ExpertParam(init_normal(rngs, (E, D, F), dtype))
        self.w_down_EFD = ExpertParam(init_normal(rngs, (E, F, D), dtype))
        self.gated = gated

    def arrays(self) -> tuple[tuple, object]:
        """(ins, out): the input matrices ([E, D, F] each) and the output matrix [E, F, D]."""
        if self.gated:
            return (self.w_gate_EDF[...], self.w_up_EDF[...]), self.w_down_EFD[...]
        return (self.w_in_EDF[...],), self.w_down_EFD[...]

    @property
    def num_experts(self) -> int:
        return self.w_down_EFD.shape[0]


def route(router_logits_NE, cfg: ModelConfig):
    """Family routing semantics: (weights_NK, ids_NK, keep_NK)."""
    return softmax_topk(router_logits_NE, cfg.top_k, cfg.norm_topk_prob or cfg.family == "mixtral")


def expert_step(xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E=None):
    """The expert half of an MoE layer over slot arrays: out_BTD = sum_k w·FFN_k(xn)."""
    B, T, D = xn_BTD.shape
    K = ids_BTK.shape[-1]
    y_ND = moe_ffn(
        xn_BTD.reshape(B * T, D), ids_BTK.reshape(B * T, K), weights_BTK.reshape(B * T, K), ins, out, slot_E
    )
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
