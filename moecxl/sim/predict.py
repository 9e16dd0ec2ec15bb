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


def _bucket(n: int, least: int = 16) -> int:
    """Padded length for a sequence of n tokens: the next power of two (few shapes, few compiles)."""
    return max(least, 1 << max(0, int(n - 1).bit_length()))


def _pregate_fn(L: int, K: int, horizon: int):
    """Jitted forward + every later router on every MoE input: [H][L-h, B, S, K] top-k ids."""

    @nnx.jit
    def run(model, ids_BS, routers_LDE):
        xs_LBSD = jnp.stack(model(ids_BS).moe_inputs).astype(jnp.float32)
        tops = []
        for h in range(1, horizon + 1):
            if h >= L:
                break
            scores_LBSE = jnp.einsum("LBSD,LDE->LBSE", xs_LBSD[: L - h], routers_LDE[h:])
            tops.append(jax.lax.top_k(scores_LBSE, K)[1])
        return tops

    return run


def pregate_tops_for_ids(model, ids_BS: np.ndarray, horizon: int) -> np.ndarray:
    """int16 [B, S, L, H, K]: top-k ids of layer m+h's router on layer m's MoE input (-1 past the last layer)."""
    moe, routers_LDE = _routers(model)
    L, K = len(moe), model.cfg.top_k
    return _tops(_pregate_fn(L, K, horizon), model, routers_LDE, np.asarray(ids_BS), L, K, horizon)


def _tops(fn, model, routers_LDE, ids_BS, L, K, horizon) -> np.ndarray:
    out = np.full((*ids_BS.shape, L, horizon, K), -1, np.int16)
    tops = fn(model, jnp.asarray(ids_BS, jnp.int32), routers_LDE.astype(jnp.float32))
    for h, top_LBSK in enumerate(tops, start=1):
        out[:, :, : L - h, h - 1] = np.asarray(top_LBSK).transpose(1, 2, 0, 3)
    return out


def pregate_tops_for_trace(model, ts, horizon: int, batch: int = 8) -> np.ndarray:
    """int16 [N, L, H, K] for every row of a TraceSet.

    Sequences are right-padded to a power-of-two length and run `batch` at a time: the model is
    causal, so padding after a token changes nothing at or before it, and a handful of shapes means
    a handful of compilations (one per distinct sequence length took minutes on a 2-core machine)."""
    moe, routers_LDE = _routers(model)
    L, K = len(moe), model.cfg.top_k
    tok = ts.column("token_id")
    b = ts.seq_bounds()
    if len(b) < 2:
        raise PredictError(f"{ts.path}: empty trace")
    fn = _pregate_fn(L, K, horizon)
    out = np.full((len(tok), L, horizon, K), -1, np.int16)
    spans = sorted(zip(b[:-1], b[1:]), key=lambda s: s[1] - s[0])
    groups: dict = {}
    for a, c in spans:
        groups.setdefault(_bucket(int(c - a)), []).append((int(a), int(c)))
    for P, seqs in groups.items():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i : i + batch]
            ids_BP = np.zeros((batch, P), np.int32)
            for j, (a, c) in enumerate(chunk):
                ids_BP[j, : c - a] = tok[a:c]
            tops = _tops(fn, model, routers_LDE, ids_BP, L, K, horizon)
            for j, (a, c) in enumerate(chunk):
                out[a:c] = tops[j, : c - a]
    return out
