"""Workloads for the simulator: router traces cut into requests of MoE-layer visits, in engine order.

A request is what one `generate` call does: one prefill visit per MoE layer (all prompt tokens of the
batch at once), then one visit per layer per decode step (one token per sequence). Routing ids come
from the trace; the target model only sets bytes and FLOPs, so its L, E and K must match the trace's
(`check_topology`), unless a layer mapping is asked for explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecxl.runtime.visit import Visit
from moecxl.sim.costmodel import ModelShape

LAYER_MAPS = (None, "tile")


class WorkloadError(ValueError):
    """A trace does not fit the simulated model or request; the message names both sides."""


@dataclass(frozen=True)
class Request:
    """One generate call: its visits in engine order, and per visit the rows of the arrays it was cut
    from (trace rows for `requests_from_trace`): what a stored predictor looks its predictions up by."""

    seq_ids: tuple[int, ...]
    batch: int
    prompt_len: int
    new_tokens: int
    visits: tuple[Visit, ...]
    rows: tuple[np.ndarray, ...] = ()  # int64 [tokens of visit j], parallel to `visits`


def check_topology(trace_LEK: tuple[int, int, int], shape: ModelShape, layer_map: str | None = None) -> None:
    """Trace (L, E, K) against the target's; a mismatch is an error unless `layer_map="tile"` maps
    target layer l to trace layer l mod L_trace (E and K must always match: ids cannot be remapped)."""
    L, E, K = trace_LEK
    if layer_map not in LAYER_MAPS:
        raise WorkloadError(f"unknown layer_map {layer_map!r}; known: {LAYER_MAPS}")
    if (E, K) != (shape.E, shape.K):
        raise WorkloadError(
            f"trace has E={E}, K={K} but target model {shape.name!r} has E={shape.E}, K={shape.K}; "
            "routing ids cannot be mapped across expert counts: use a trace of a topology-matched model"
        )
    if L != shape.L and layer_map is None:
        raise WorkloadError(
            f"trace has L={L} MoE layers but target model {shape.name!r} has L={shape.L}; use a trace of a "
            "topology-matched model, or pass layer_map='tile' to repeat trace layers (target layer l <- "
            "trace layer l mod L)"
        )


def map_layers(ids_NLK: np.ndarray, target_L: int, layer_map: str | None) -> np.ndarray:
    """Trace layers to target layers: identity, or tiled (l <- l mod L_trace) when asked."""
    if ids_NLK.shape[1] == target_L:
        return ids_NLK
    if layer_map != "tile":
        raise WorkloadError(f"trace has {ids_NLK.shape[1]} layers, target {target_L}; pass layer_map='tile'")
    return ids_NLK[:, np.arange(target_L) % ids_NLK.shape[1]]


def _visit(phase, step, layer, ids_NK, w_NK, n_tokens, context, batch, top_HNK) -> Visit | None:
    valid = ids_NK >= 0
    if not valid.any():
        return None  # a layer these tokens do not pass (Switch encoder vs decoder)
    flat, wflat = ids_NK[valid], w_NK[valid]
    experts = np.unique(flat)
    counts = np.bincount(flat, minlength=int(experts.max()) + 1)[experts]
    maxw = [float(wflat[flat == e].max()) for e in experts]
    return Visit(
        phase,
        step,
        layer,
        tuple(int(e) for e in experts),
        tuple(int(c) for c in counts),
        tuple(maxw),
        n_tokens,
        context,
        batch,
        top_HNK,
    )


def requests_from_arrays(
    ids_NLK: np.ndarray,
    seq_id_N: np.ndarray,
    is_decode_N: np.ndarray,
    *,
    weights_NLK: np.ndarray | None = None,
    pregate_NLHK: np.ndarray | None = None,
    batch: int = 1,
    max_requests: int | None = None,
    decode_tokens: int | None = None,
    prompt_tokens: int | None = None,
    skip_sequences: int = 0,
) -> list[Request]:
    """Requests of `batch` sequences each (only sequences with decode rows), in trace order.

    `decode_tokens`: cap on decode steps; `prompt_tokens`: model a longer prompt per sequence than the
    trace holds (long context): the prefill visit then needs the union of the experts routed by
    prompt rows gathered from this and the following sequences (cyclically) up to that many tokens per
    sequence, and compute and context are costed at that length. `skip_sequences`: leave the first
    decoded sequences out (e.g. for a library of past requests).
    """
    N, L, K = ids_NLK.shape
    w = weights_NLK if weights_NLK is not None else np.ones(ids_NLK.shape, np.float32)
    bounds = np.r_[np.flatnonzero(np.r_[True, seq_id_N[1:] != seq_id_N[:-1]]), N]
    seqs = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with_decode = [(a, b) for a, b in seqs if is_decode_N[a:b].any()][skip_sequences:]
    prefill_rows_all = [np.arange(a, b)[~is_decode_N[a:b]] for a, b in seqs]
    if len(with_decode) < batch:
        raise WorkloadError(
            f"trace has {len(with_decode)} sequences with decode rows (after skipping {skip_sequences}); "
            f"batch {batch} needs at least {batch}"
        )
    out = []
    for r in range(len(with_decode) // batch):
        if max_requests is not None and r >= max_requests:
            break
        group = with_decode[r * batch : (r + 1) * batch]
        pre = [np.arange(a, b)[~is_decode_N[a:b]] for a, b in group]
        dec = [np.arange(a, b)[is_decode_N[a:b]] for a, b in group]
        T = max(len(p) for p in pre)
        n_new = min(len(d) for d in dec)
        if decode_tokens is not None:
            n_new = min(n_new, decode_tokens)
        if prompt_tokens is not None and prompt_tokens > T:
            start = next(i for i, (a, _) in enumerate(seqs) if a == group[0][0])
            rows, i = [], start
            while sum(len(x) for x in rows) < prompt_tokens * batch and i < start + len(seqs):
                rows.append(prefill_rows_all[i % len(seqs)])
                i += 1
            pre, T = rows, prompt_tokens
        pre_rows = np.concatenate(pre).astype(np.int64)
        visits, visit_rows = [], []
        for m in range(L):
            top = pregate_NLHK[pre_rows, m].transpose(1, 0, 2) if pregate_NLHK is not None else None
            v = _visit("prefill", 0, m, ids_NLK[pre_rows, m], w[pre_rows, m], batch * T, T, batch, top)
            if v is not None:
                visits.append(v)
                visit_rows.append(pre_rows)
        for i in range(n_new):
            rows = np.array([d[i] for d in dec], np.int64)
            for m in range(L):
                top = pregate_NLHK[rows, m].transpose(1, 0, 2) if pregate_NLHK is not None else None
                v = _visit("decode", i + 1, m, ids_NLK[rows, m], w[rows, m], batch, T + i + 1, batch, top)
                if v is not None:
                    visits.append(v)
                    visit_rows.append(rows)
        seqs_of = tuple(int(seq_id_N[a]) for a, _ in group)
        out.append(Request(seqs_of, batch, T, n_new + 1, tuple(visits), tuple(visit_rows)))
    return out


def requests_from_trace(
    ts, shape: ModelShape, *, layer_map: str | None = None, pregate_NLHK=None, **kw
) -> list[Request]:
    """Requests from a `moecxl.traces.TraceSet` for target `shape` (topology checked first)."""
    meta = ts.metadata
    check_topology((meta["L"], meta["E"], meta["K"]), shape, layer_map)
    ids = map_layers(ts.expert_ids, shape.L, layer_map)
    w = map_layers(ts.expert_weights, shape.L, layer_map)
    if pregate_NLHK is not None:
        pregate_NLHK = map_layers(pregate_NLHK, shape.L, layer_map)
    return requests_from_arrays(ids, ts.seq_id, ts.is_decode, weights_NLK=w, pregate_NLHK=pregate_NLHK, **kw)


def requests_from_generate(res, pregate_NLHK: np.ndarray | None = None) -> list[Request]:
    """One request from a resident `GenerateResult` (its routing per layer [B, T+T_new-1, K]): the
    exact visits an engine sees when it runs the same prompt (used to validate against the engine).
    Its rows (`Request.rows`) count sequence-major: sequence b's prompt tokens, then its decode tokens."""
    L = len(res.expert_ids)
    B, T = res.expert_ids[0].shape[0], res.prompt_len
    ids_BSLK = np.stack([np.asarray(x) for x in res.expert_ids], axis=2)
    w_BSLK = np.stack([np.asarray(x) for x in res.expert_weights], axis=2)
    # Rows sequence-major: seq b's prompt rows then its decode rows.
    ids = ids_BSLK.reshape(-1, L, ids_BSLK.shape[-1])
    w = w_BSLK.reshape(ids.shape)
    S = ids_BSLK.shape[1]
    seq = np.repeat(np.arange(B), S)
    dec = np.tile(np.arange(S) >= T, B)
    top = None
    if pregate_NLHK is not None:
        top = pregate_NLHK.reshape(-1, *pregate_NLHK.shape[-3:])
    return requests_from_arrays(ids, seq, dec, weights_NLK=w, pregate_NLHK=top, batch=B)


def oracle_future(requests: list[Request]) -> list[tuple[int, tuple[int, ...]]]:
    """Every visit (layer, experts) of the workload in order: what the oracle policy knows."""
    return [(v.layer, v.experts) for r in requests for v in r.visits]


def activation_matrix(req: Request, L: int, E: int) -> np.ndarray:
    """[L, E] routed-token counts of one request (MoE-Infinity's expert activation matrix)."""
    eam = np.zeros((L, E))
    for v in req.visits:
        eam[v.layer, list(v.experts)] += v.tokens_per_expert
    return eam
