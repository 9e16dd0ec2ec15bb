"""Pre-gating predictions for replay: later layers' routers applied to each MoE layer's input, per token.

The engine's `pregate` prefetch votes with each token's top-k under the routers of layers m+1..m+H
applied to layer m's MoE input (`co.xn_BTD`). A trace stores routing, not MoE inputs, so we recompute
them with the small model that produced the trace (one causal forward per sequence gives the same
hidden states as prefill + incremental decode, up to float rounding) and keep only the top-k ids.

Switch (encoder-decoder): the traced layers are the encoder's sparse blocks, then the decoder's. A router
is applied only within the stack its input came from (encoder layers among themselves, decoder layers
among themselves): nothing carries an encoder token's hidden state into the decoder's routers, so across
the boundary there is no pre-gate (ids -1, as past the last layer). The MoE inputs are recomputed the way
`traces.collect` computed the routing: the encoder over the prompt left-padded to the collection's
`prompt_len` (padding counts toward expert capacity, so the padding must match), the decoder
teacher-forced over the traced decoder inputs.

Key: B sequences, S encoder tokens, T tokens (decoder tokens for Switch), L MoE layers (n of one stack),
D model, E experts, K top-k, H horizon, G = H + 1 (g = 0: the layer's own router), R trace rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class PredictError(ValueError):
    """Predictions cannot be made for this model or trace; the message says why."""


def _routers(model) -> tuple[list[int], jnp.ndarray]:
    if not hasattr(model, "layers"):
        raise PredictError(
            f"pre-gating replay needs per-layer routers and MoE inputs (a decoder-only or Switch model); "
            f"got {type(model).__name__} of family {getattr(model.cfg, 'family', '?')!r}"
        )
    moe = [i for i, layer in enumerate(model.layers) if getattr(layer, "experts", None) is not None]
    return moe, jnp.stack([model.layers[i].core.router_DE[...] for i in moe])


def is_switch(model) -> bool:
    return getattr(getattr(model, "cfg", None), "family", "") == "switch"


def switch_routers(model) -> tuple[jnp.ndarray, int]:
    """(float32 [L, D, E] routers in trace order: encoder sparse blocks, then decoder's; Le encoder layers)."""
    enc, dec = (
        [b.core.router_DE[...] for b in stack.layers if b.core.router_DE is not None]
        for stack in (model.encoder, model.decoder)
    )
    return jnp.stack(enc + dec).astype(jnp.float32), len(enc)


def stack_pregate_logits(x_BTLD, routers_LDE, G: int):
    """float32 [B, T, L, G, E]: router l+g on layer l's MoE input, 0 where l + g >= L (past this stack)."""
    L, D, E = routers_LDE.shape
    padded = jnp.concatenate([routers_LDE, jnp.zeros((G, D, E), routers_LDE.dtype)])  # [L + G, D, E]
    idx_LG = jnp.arange(L)[:, None] + jnp.arange(G)[None, :]
    return jnp.einsum("BTLD,LGDE->BTLGE", x_BTLD.astype(jnp.float32), padded[idx_LG].astype(jnp.float32))


@partial(jax.jit, static_argnums=(0, 6, 7))
def _switch_stack_logits(graphdef, state, ids_BS, mask_BS, dec_in_BT, routers_LDE, Le: int, G: int):
    """Encoder over ids_BS, decoder teacher-forced over dec_in_BT; per stack (pre-gate logits
    [B, S|T, n, G, E], routed ids [B, S|T, n])."""
    model = nnx.merge(graphdef, state)
    enc = model.encode(ids_BS, mask_BS)
    _, dec = model.decode(dec_in_BT, enc.hidden_BSD, mask_BS)
    out = []
    for r, routers in ((enc.routing, routers_LDE[:Le]), (dec, routers_LDE[Le:])):
        x_BTnD = jnp.stack(r.moe_inputs, axis=2)
        out.append((stack_pregate_logits(x_BTnD, routers, G), jnp.stack(r.expert_ids, axis=2)[..., 0]))
    return out


def switch_pregate_logits(model, ts, G: int, batch: int = 8) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
    """Pre-gate logits of a Switch trace, `batch` sequences at a time: yields (rows [R], first layer lo,
    logits float32 [R, n, G, E] of layers lo..lo+n-1, routed ids int32 [R, n]) per stack and batch.

    Encoder rows (prefill) are left-padded to the collection's `prompt_len` as `traces.collect` did;
    decoder rows (decode: the decoder inputs, start token first) are right-padded, which changes nothing
    before them (the decoder is causal and capacity counts tokens in order)."""
    routers_LDE, Le = switch_routers(model)
    cfg = model.cfg
    b = ts.seq_bounds()
    if len(b) < 2:
        raise PredictError(f"{ts.path}: empty trace")
    tok, dec = ts.column("token_id"), ts.is_decode
    spans = [np.arange(a, z) for a, z in zip(b[:-1], b[1:])]
    enc_rows = [r[~dec[r]] for r in spans]
    dec_rows = [r[dec[r]] for r in spans]
    S = max([len(r) for r in enc_rows] + [int(ts.metadata.get("args", {}).get("prompt_len") or 1)])
    T = max(1, max(len(r) for r in dec_rows))
    graphdef, state = nnx.split(model)
    for i in range(0, len(spans), batch):
        ids_BS = np.full((batch, S), cfg.pad_token_id, np.int32)
        mask_BS = np.zeros((batch, S), bool)
        dec_BT = np.full((batch, T), cfg.pad_token_id, np.int32)
        dec_BT[:, 0] = cfg.decoder_start_token_id
        chunk = range(i, min(i + batch, len(spans)))
        for j, s in enumerate(chunk):
            e, d = enc_rows[s], dec_rows[s]
            ids_BS[j, S - len(e) :], mask_BS[j, S - len(e) :] = tok[e], True
            dec_BT[j, : len(d)] = tok[d]
        mask_BS[len(chunk) :] = True  # unused batch rows: any valid input
        stacks = _switch_stack_logits(graphdef, state, ids_BS, mask_BS, dec_BT, routers_LDE, Le, G)
        (enc_lg, enc_id), (dec_lg, dec_id) = (tuple(np.asarray(a) for a in st) for st in stacks)
        for j, s in enumerate(chunk):
            e, d = enc_rows[s], dec_rows[s]
            if len(e):
                yield e, 0, enc_lg[j, S - len(e) :], enc_id[j, S - len(e) :]
            if len(d):
                yield d, Le, dec_lg[j, : len(d)], dec_id[j, : len(d)]


def _switch_tops_for_trace(model, ts, horizon: int, batch: int) -> np.ndarray:
    L, K = ts.metadata["L"], 1
    out = np.full((len(ts), L, horizon, K), -1, np.int16)
    for rows, lo, lg_RnGE, _ in switch_pregate_logits(model, ts, horizon + 1, batch):
        n = lg_RnGE.shape[1]
        for h in range(1, horizon + 1):
            if h >= n:
                break
            top = np.argsort(-lg_RnGE[:, : n - h, h], axis=-1, kind="stable")[..., :K]
            out[rows, lo : lo + n - h, h - 1] = top  # layers l + h past this stack stay -1
    return out


def _bucket(n: int, least: int = 16) -> int:
    """Padded length for a sequence of n tokens: the next power of two (few shapes, few compiles)."""
    return max(least, 1 << max(0, int(n - 1).bit_length()))


def _pregate_fn(L: int, K: int, horizon: int):
    """Jitted forward + every later router on every MoE input: [H][L-h, B, S, K] top-k ids (decoder-only)."""

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
    """int16 [B, S, L, H, K]: top-k ids of layer m+h's router on layer m's MoE input (-1 past the last layer).
    Decoder-only models; a Switch trace goes through `pregate_tops_for_trace`."""
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
    """int16 [N, L, H, K] for every row of a TraceSet (-1 where layer m+h is past the last layer, or, for
    Switch, in the other stack).

    Decoder-only: sequences are right-padded to a power-of-two length and run `batch` at a time: the model
    is causal, so padding after a token changes nothing at or before it, and a handful of shapes means
    a handful of compilations (one per distinct sequence length took minutes on a 2-core machine)."""
    if is_switch(model):
        return _switch_tops_for_trace(model, ts, horizon, batch)
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
