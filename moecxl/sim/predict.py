"""Pre-gating predictions for replay: later layers' routers applied to each MoE layer's input, per token.

The engine's `pregate` prefetch votes with each token's top-k under the routers of layers m+1..m+H
applied to layer m's MoE input (`co.xn_BTD`). A trace stores routing, not MoE inputs, so we recompute
them with the small model that produced the trace (one causal forward per sequence gives the same
hidden states as prefill + incremental decode, up to float rounding) and keep only the top-k ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class PredictError(ValueError):
    """Predictions cannot be made for this model or trace; the message says why."""


def _routers(model) -> tuple[list[int], jnp.ndarray]:
    if not hasattr(model, "layers") or getattr(model.cfg, "family", "") == "switch":
        raise PredictError(
            f"pre-gating replay needs a decoder-only model with per-layer MoE inputs; got family "
            f"{getattr(model.cfg, 'family', '?')!r} (Switch traces: run policies without pre-gating)"
        )
    moe = [i for i, layer in enumerate(model.layers) if getattr(layer, "experts", None) is not None]
    return moe, jnp.stack([model.layers[i].core.router_DE[...] for i in moe])


def pregate_tops_for_ids(model, ids_BS: np.ndarray, horizon: int) -> np.ndarray:
    """int16 [B, S, L, H, K]: top-k ids of layer m+h's router on layer m's MoE input (-1 past the last layer)."""
    moe, routers_LDE = _routers(model)
    L, K = len(moe), model.cfg.top_k
    forward = nnx.jit(lambda m, ids: m(ids).moe_inputs)
    xs = forward(model, jnp.asarray(ids_BS, jnp.int32))
    out = np.full((*ids_BS.shape, L, horizon, K), -1, np.int16)
    for m in range(L):
        for h in range(1, horizon + 1):
            if m + h >= L:
                break
            scores = jnp.einsum(
                "BSD,DE->BSE", xs[m].astype(jnp.float32), routers_LDE[m + h].astype(jnp.float32)
            )
            out[:, :, m, h - 1] = np.asarray(jax.lax.top_k(scores, K)[1])
    return out


def pregate_tops_for_trace(model, ts, horizon: int) -> np.ndarray:
    """int16 [N, L, H, K] for every row of a TraceSet (each sequence's tokens in one forward)."""
    tok = ts.column("token_id")
    b = ts.seq_bounds()
    parts = [pregate_tops_for_ids(model, tok[a:c][None], horizon)[0] for a, c in zip(b[:-1], b[1:])]
    if not parts:
        raise PredictError(f"{ts.path}: empty trace")
    return np.concatenate(parts)
