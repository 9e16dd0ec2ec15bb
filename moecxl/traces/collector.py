"""Running a model over a batch of planned sequences: the routing of every MoE layer as trace rows.

Prefill rows come from one forward over the left-padded prompts (decoder-only: the decoder; Switch: the
encoder), decode rows from greedy generation (`moecxl.generate`; Switch: `switch_generate`, the decoder
inputs traced, start token first, positions continuing after the S encoder tokens so (seq_id, pos) stays a
key). With a `mesh`, each prefill batch is split over its `data` axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.model.family import family_of
from moecxl.traces.plan import TraceSeq


def _stacked_routing(r, proj_DP):
    """Per-layer routing lists (a decoder output or a Switch `Routing`) stacked on axis 2: logits [B, T, L, E],
    ids and weights [B, T, L, K], sketch [B, T, L, P] (each MoE input times the projection)."""
    st = partial(jnp.stack, axis=2)
    sketch = [jnp.einsum("BTD,DP->BTP", x.astype(jnp.float32), proj_DP) for x in r.moe_inputs]
    return (
        st(r.router_logits).astype(jnp.float32),
        st(r.expert_ids),
        st(r.expert_weights).astype(jnp.float32),
        st(sketch),
    )


def _decoder_routing_fn(graphdef, state, ids_BT, mask_BT, proj_DP):
    """Routing of every MoE layer of a decoder-only model, stacked: logits, ids, weights, sketch."""
    return _stacked_routing(nnx.merge(graphdef, state)(ids_BT, mask_BT), proj_DP)


def _switch_encoder_routing_fn(graphdef, state, ids_BS, mask_BS, proj_DP):
    """Routing of the encoder's sparse blocks of a Switch model, stacked as `_decoder_routing_fn`."""
    return _stacked_routing(nnx.merge(graphdef, state).encode(ids_BS, mask_BS).routing, proj_DP)


@partial(jax.jit, static_argnums=0)
def _switch_decoder_routing(graphdef, state, ids_BS, mask_BS, dec_in_BT, proj_DP):
    """Teacher-forced routing of the decoder's sparse blocks over `dec_in_BT`, stacked (the LM head is
    computed and dropped by XLA: only routing leaves the jit)."""
    model = nnx.merge(graphdef, state)
    enc = model.encode(ids_BS, mask_BS)
    _, routing = model.decode(dec_in_BT, enc.hidden_BSD, mask_BS)
    return _stacked_routing(routing, proj_DP)


_decoder_routing = jax.jit(_decoder_routing_fn, static_argnums=0)
_switch_encoder_routing = jax.jit(_switch_encoder_routing_fn, static_argnums=0)


@lru_cache(maxsize=8)
def _dp_routing(graphdef, mesh, switch: bool):
    """The prefill routing with the batch split over `mesh`'s `data` axis; cached, so a resumed or
    repeated collection on the same devices compiles it once."""
    from moecxl.distributed import data_parallel

    fn = _switch_encoder_routing_fn if switch else _decoder_routing_fn
    return data_parallel(partial(fn, graphdef), mesh, batch_args=(1, 2))


def _padded_batch(seqs: Sequence[TraceSeq], T: int, B: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [B, T]; missing rows repeat the first sequence (fixed shapes, one compile)."""
    ids = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), bool)
    for b in range(B):
        s = seqs[b] if b < len(seqs) else seqs[0]
        ids[b, T - len(s.ids) :] = s.ids
        mask[b, T - len(s.ids) :] = True
    return ids, mask


def _rows(seqs, phase, token_BT, pos_BT, valid_BT, ids_BTLK, w_BTLK, logits_BTLE, sketch_BTLP) -> dict:
    """Flatten the valid positions of the first len(seqs) batch rows into trace columns."""
    n = len(seqs)
    valid = valid_BT[:n]
    b_idx, t_idx = np.nonzero(valid)
    rows = {
        "seq_id": np.asarray([seqs[b].seq_id for b in b_idx], np.int64),
        "pos": pos_BT[:n][valid].astype(np.int32),
        "token_id": token_BT[:n][valid].astype(np.int32),
        "phase": np.asarray([phase] * len(b_idx), object),
        "domain": np.asarray([seqs[b].domain for b in b_idx], object),
        "doc_id": np.asarray([seqs[b].doc_id for b in b_idx], object),
        "expert_ids": ids_BTLK[:n][valid],
        "expert_weights": w_BTLK[:n][valid],
    }
    if logits_BTLE is not None:
        rows["router_logits"] = logits_BTLE[:n][valid]
    if sketch_BTLP is not None:
        rows["hidden_sketch"] = sketch_BTLP[:n][valid]
    return rows


def concat_rows(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _sort_rows(rows: dict) -> dict:
    order = np.lexsort((rows["pos"], rows["seq_id"]))
    return {k: v[order] for k, v in rows.items()}


class Collector:
    """Routing rows of a batch of sequences, for one model (decoder-only or Switch).

    With a `mesh`, each prefill batch is split over its `data` axis (one SPMD program, every device
    routes its rows; the batch is padded to a multiple of the axis size like a short last batch).
    Decode stays on one device: `generate` is the engine's per-layer loop with host hand-offs, and its
    batch (batch / decode_every sequences) is smaller than the device count at the defaults.
    """

    def __init__(
        self,
        model,
        prompt_len: int,
        decode_tokens: int,
        batch: int,
        decode_batch: int,
        proj_DP: np.ndarray,
        router_logits: bool,
        mesh=None,
        pad_id: int = 0,
    ):
        self.model, self.cfg, self.pad_id = model, model.cfg, pad_id
        self.T, self.M, self.B, self.Bd = prompt_len, decode_tokens, batch, decode_batch
        self.proj_DP = np.asarray(proj_DP, np.float32)
        self.want_logits, self.want_sketch = router_logits, proj_DP.shape[1] > 0
        self.graphdef, self.state = nnx.split(model)
        self.encoder_decoder = family_of(self.cfg).encoder_decoder
        if mesh is None:
            route = _switch_encoder_routing if self.encoder_decoder else _decoder_routing
            self._route, self._route_state = partial(route, self.graphdef), self.state
        else:
            from moecxl.distributed import DATA, replicate_tree

            n = mesh.shape[DATA]
            self.B = -(-batch // n) * n
            self._route = _dp_routing(self.graphdef, mesh, self.encoder_decoder)
            self._route_state = replicate_tree(self.state, mesh)

    def rows(self, seqs: Sequence[TraceSeq]) -> dict:
        """Prefill rows of every sequence and decode rows of those marked `decode`."""
        parts = [self._prefill(seqs)]
        dec = [s for s in seqs if s.decode]
        for i in range(0, len(dec), self.Bd):
            parts.append(self._decode(dec[i : i + self.Bd]))
        return _sort_rows(concat_rows(parts))

    def _pad_layers(self, x_BTLX: np.ndarray, fill, first: bool) -> np.ndarray:
        """Switch: place encoder (first) or decoder layers in the full layer axis, `fill` elsewhere."""
        L = self.cfg.num_moe_layers
        B, T, Lh, X = x_BTLX.shape
        out = np.full((B, T, L, X), fill, x_BTLX.dtype)
        if first:
            out[:, :, :Lh] = x_BTLX
        else:
            out[:, :, L - Lh :] = x_BTLX
        return out

    def _prefill(self, seqs):
        ids, mask = _padded_batch(seqs, self.T, self.B, self.pad_id)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        lg, e, w, sk = (np.asarray(a) for a in self._route(self._route_state, ids, mask, self.proj_DP))
        if self.encoder_decoder:  # encoder rows: the encoder's layers first; the decoder's not passed
            lg, e, w, sk = (
                self._pad_layers(lg, np.nan, True),
                self._pad_layers(e, -1, True),
                self._pad_layers(w, 0, True),
                self._pad_layers(sk, np.nan, True),
            )
        return _rows(
            seqs,
            "prefill",
            ids,
            pos,
            mask,
            e,
            w,
            lg if self.want_logits else None,
            sk if self.want_sketch else None,
        )

    def _decode(self, seqs):
        if self.encoder_decoder:
            return self._decode_switch(seqs)
        from moecxl.generate import generate

        T, M = self.T, self.M
        ids, mask = _padded_batch(seqs, T, self.Bd, self.pad_id)
        res = generate(self.model, ids, max_new_tokens=M + 1, attention_mask=mask)
        new_BM = res.tokens[:, :M]
        e = np.stack([a[:, T : T + M] for a in res.expert_ids], axis=2)
        w = np.stack([a[:, T : T + M] for a in res.expert_weights], axis=2).astype(np.float32)
        pos = mask.sum(axis=1, keepdims=True) + np.arange(M)[None, :]
        lg = sk = None
        if self.want_logits or self.want_sketch:
            # generate returns ids and weights only: logits and sketches come from a teacher-forced
            # forward over prompt + generated tokens (the same causal computation, without the cache).
            full = np.concatenate([ids, new_BM], axis=1)
            full_mask = np.concatenate([mask, np.ones_like(new_BM, bool)], axis=1)
            lg, _, _, sk = (
                np.asarray(a)[:, T:]
                for a in _decoder_routing(self.graphdef, self.state, full, full_mask, self.proj_DP)
            )
        return _rows(
            seqs,
            "decode",
            new_BM,
            pos,
            np.ones_like(new_BM, bool),
            e,
            w,
            lg if self.want_logits else None,
            sk if self.want_sketch else None,
        )

    def _decode_switch(self, seqs):
        from moecxl.model.switch import switch_generate

        cfg, M = self.cfg, self.M
        ids, mask = _padded_batch(seqs, self.T, self.Bd, self.pad_id)
        gen = switch_generate(self.model, ids, M, mask)
        toks = np.asarray(gen.tokens)  # [B, M'] (M' < M when every row ended)
        Mg = toks.shape[1]
        dec_in = np.concatenate(
            [np.full((len(toks), 1), cfg.decoder_start_token_id, np.int32), toks[:, :-1]], axis=1
        )
        e = np.stack([np.asarray(a) for a in gen.decoder_expert_ids], axis=2)
        # Logits and sketches: a teacher-forced decoder over the generated tokens (as the decoder-only path).
        lg, _, _, sk = (
            np.asarray(a)
            for a in _switch_decoder_routing(self.graphdef, self.state, ids, mask, dec_in, self.proj_DP)
        )
        # The cached decoder routes one token at a time, so capacity never drops it: weight = top-1 prob.
        prob = np.exp(lg - lg.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        w = np.take_along_axis(prob, e, axis=-1).astype(np.float32)
        alive = np.ones_like(toks, bool)
        if cfg.eos_token_id is not None:  # rows after a row's EOS feed padding: not traced
            alive[:, 1:] = np.cumsum(toks[:, :-1] == cfg.eos_token_id, axis=1) == 0
        # Positions continue after the encoder tokens, so (seq_id, pos) stays a key; decoder position = pos - S.
        pos = mask.sum(axis=1, keepdims=True) + np.arange(Mg)[None, :]
        e, w, lg, sk = (
            self._pad_layers(e, -1, False),
            self._pad_layers(w, 0, False),
            self._pad_layers(lg, np.nan, False),
            self._pad_layers(sk, np.nan, False),
        )
        return _rows(
            seqs,
            "decode",
            dec_in,
            pos,
            alive,
            e,
            w,
            lg if self.want_logits else None,
            sk if self.want_sketch else None,
        )
