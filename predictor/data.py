"""Training windows from router traces: what a predictor sees at (token n, MoE layer l), and its targets.

At (n, l) the predictor may use, in `features`:
  "current"  the token's routing (expert weights as multi-hot [E]) at layers l-C+1..l
  "history"  the previous token's experts at layers l+1..l+H. Live, a prefill forward runs every token
             through layer l before any reaches l+1, so there only decode rows have it: `gather(...,
             history="decode")` measures that case; training drops history at random to cover it.
  "sketch"   the hidden-state sketch of layer l's MoE input [P] (trace column `hidden_sketch`)
  "pregate"  router l+g applied to layer l's MoE input, g = 0..H ([H+1, E] raw logits; g = 0 is the
             layer's own router). Needs the model: the traces hold only [P]-dim sketches.
Targets: the expert sets at layers l+1..l+H. Windows are (row, layer) pairs; arrays stay per row and a
batch is gathered on demand, so nothing of size windows x E is ever materialised.

Key: N trace rows, L MoE layers, E experts, K top-k, H horizon, G = H + 1, C current layers, P sketch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.sim.predict import stack_pregate_logits, switch_pregate_logits
from moecxl.traces import TraceSet, previous_token, read_traces

FEATURES = ("current", "history", "sketch", "pregate")
SPLITS = ("train", "validation", "test")


class PredictorDataError(ValueError):
    """Traces that cannot feed the requested predictor: a missing column, an empty split, another model."""


@dataclass(frozen=True)
class TraceArrays:
    """Per-row arrays of one trace directory (see module key)."""

    path: str
    L: int
    E: int
    K: int
    P: int
    ids_NLK: np.ndarray  # int32, -1 where a token does not pass a layer
    w_NLK: np.ndarray  # float32
    prev_N: np.ndarray  # int64 row of the previous token of the same sequence, or -1
    seq_N: np.ndarray  # int64
    decode_N: np.ndarray  # bool
    domain_N: np.ndarray  # str
    sketch_NLP: np.ndarray | None = None  # float32
    pregate_NLGE: np.ndarray | None = None  # float16 (or 32) raw logits of router l+g on layer l's input
    sketch_DP: np.ndarray | None = None  # float32 projection from the trace metadata
    meta: dict = field(default_factory=dict)

    @property
    def N(self) -> int:
        return len(self.ids_NLK)


def load_arrays(
    traces: str | os.PathLike | TraceSet,
    features: tuple[str, ...] = FEATURES,
    horizon: int = 4,
    model=None,
    pregate_dtype=np.float16,
) -> TraceArrays:
    """Read a trace directory into `TraceArrays`, computing pre-gate logits when "pregate" is wanted.

    `model`: a model object or checkpoint path for "pregate"; default: the path in the trace metadata.
    `pregate_dtype`: float16 for training (memory), float32 where the logits must be the live ones.
    """
    ts = traces if isinstance(traces, TraceSet) else read_traces(traces)
    meta = ts.metadata
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise PredictorDataError(f"unknown feature(s) {unknown}; known: {list(FEATURES)}")
    if not len(ts):
        raise PredictorDataError(f"{ts.path}: no trace rows")
    sketch = proj = None
    if "sketch" in features:
        sketch = ts.hidden_sketch
        if sketch is None:
            raise PredictorDataError(
                f"{ts.path}: feature 'sketch' needs trace column 'hidden_sketch', which these traces lack "
                f"(collect with --sketch P, or drop 'sketch' from features)"
            )
        proj = ts.sketch_projection
    ids = ts.expert_ids
    pregate = None
    if "pregate" in features:
        pregate = pregate_logits(ts, horizon, model, dtype=pregate_dtype)
    return TraceArrays(
        path=str(ts.path),
        L=meta["L"],
        E=meta["E"],
        K=meta["K"],
        P=meta["P"] if sketch is not None else 0,
        ids_NLK=ids,
        w_NLK=ts.expert_weights,
        prev_N=previous_token(ts.seq_id, ts.pos),
        seq_N=ts.seq_id.astype(np.int64),
        decode_N=ts.is_decode,
        domain_N=ts.domain,
        sketch_NLP=sketch,
        pregate_NLGE=pregate,
        sketch_DP=proj,
        meta=meta,
    )


# ------------------------------------------------------------------------------------------ pre-gate


def _open_model(ts: TraceSet, model):
    import moecxl
    from moecxl.traces import model_hash

    if model is None:
        path = ts.metadata["model"].get("path")
        if not path or not Path(path).is_dir():
            raise PredictorDataError(
                f"{ts.path}: feature 'pregate' needs the model's routers and MoE inputs (the traces hold "
                f"only sketches); metadata field 'model.path' is {path!r}, not a directory: pass the model "
                f"(--model DIR), or drop 'pregate' from features"
            )
        model = path
    if isinstance(model, (str, os.PathLike)):
        model = moecxl.load(model)
    want, got = ts.metadata["model"].get("hash"), model_hash(model)
    if want and want != got:
        raise PredictorDataError(
            f"{ts.path}: traces come from model hash {want} but the given model hashes to {got} "
            f"(traces from another model)"
        )
    return model


@partial(jax.jit, static_argnums=(0, 4))
def _decoder_pregate(graphdef, state, ids_BT, routers_LDE, G: int):
    """Raw logits of router l+g on layer l's MoE input: [B, T, L, G, E] (0 where l + g >= L)."""
    out = nnx.merge(graphdef, state)(ids_BT)
    x_BTLD = jnp.stack(out.moe_inputs, axis=2).astype(jnp.float32)
    return stack_pregate_logits(x_BTLD, routers_LDE, G), jnp.stack(out.expert_ids, axis=2)


def routers_of(model) -> jax.Array:
    """float32 [L, D, E]: the routers of the MoE layers in trace order (decoder or Switch enc + dec)."""
    if model.cfg.family == "switch":
        blocks = [b for stack in (model.encoder, model.decoder) for b in stack.layers]
    else:
        blocks = list(model.layers)
    return jnp.stack(
        [
            b.core.router_DE[...].astype(jnp.float32)
            for b in blocks
            if getattr(b.core, "router_DE", None) is not None
        ]
    )


def pregate_logits(ts: TraceSet, horizon: int, model=None, batch: int = 8, dtype=np.float16) -> np.ndarray:
    """[N, L, H+1, E] of `dtype`: router l+g on layer l's MoE input for every trace row, recomputed with the
    model (one teacher-forced forward per sequence, the way the traces were collected). The recomputed
    routing must reproduce the traced expert ids, else the traces are refused as another model's."""
    model = _open_model(ts, model)
    meta = ts.metadata
    L, E, G = meta["L"], meta["E"], horizon + 1
    routers = routers_of(model)
    if routers.shape[0] != L or routers.shape[2] != E:
        raise PredictorDataError(
            f"{ts.path}: traces have L={L}, E={E}; the model's routers give L={routers.shape[0]}, "
            f"E={routers.shape[2]}"
        )
    bounds = ts.seq_bounds()
    tok = ts.column("token_id")
    out = np.zeros((len(ts), L, G, E), dtype)
    ids_ref = ts.expert_ids
    agree = total = 0
    if model.cfg.family == "switch":
        return _switch_pregate(ts, model, G, batch, out)
    graphdef, state = nnx.split(model)
    T = int(np.diff(bounds).max())
    seqs = list(range(len(bounds) - 1))
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        # Right padding: the model is causal, so pad tokens after a sequence never change its routing.
        ids_BT = np.full((batch, T), model.cfg.pad_token_id, np.int32)
        for b, s in enumerate(chunk):
            ids_BT[b, : bounds[s + 1] - bounds[s]] = tok[bounds[s] : bounds[s + 1]]
        pg, eid = _decoder_pregate(graphdef, state, ids_BT, routers, G)
        pg, eid = np.asarray(pg), np.asarray(eid)
        for b, s in enumerate(chunk):
            a, z = bounds[s], bounds[s + 1]
            out[a:z] = pg[b, : z - a]
            same = np.sort(eid[b, : z - a], -1) == np.sort(ids_ref[a:z], -1)
            agree += int(same.all(-1).sum())
            total += same.shape[0] * same.shape[1]
    _check_agreement(ts, agree, total)
    return out


def _check_agreement(ts: TraceSet, agree: int, total: int, least: float = 0.98) -> None:
    if total and agree / total < least:
        raise PredictorDataError(
            f"{ts.path}: the model reproduces only {agree / total:.1%} of the traced top-k sets "
            f"(traces from another model, or a different dtype)"
        )


def _switch_pregate(ts: TraceSet, model, G: int, batch: int, out: np.ndarray) -> np.ndarray:
    """Switch: encoder rows route through the encoder's sparse blocks, decoder rows the decoder's; a
    router is applied only within the stack the row passes (0 across the boundary and in the other
    stack's layers, which the row never visits). The MoE inputs are recomputed as the collection computed
    the routing (`moecxl.sim.predict.switch_pregate_logits`); the traced decode routing comes from the
    cached decoder, the recomputed one from a teacher-forced decoder (equal up to rounding)."""
    ids_ref = ts.expert_ids
    agree = total = 0
    for rows, lo, lg_RnGE, ids_Rn in switch_pregate_logits(model, ts, G, batch):
        n = lg_RnGE.shape[1]
        out[rows, lo : lo + n] = lg_RnGE
        agree += int((ids_Rn == ids_ref[rows, lo : lo + n, 0]).sum())
        total += ids_Rn.size
    _check_agreement(ts, agree, total)
    return out


# -------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSpec:
    """By sequence (`fractions` of train/validation/test, seeded) or by domain: train and validation
    on `train_domain` (default: every domain but `test_domain`), test on `test_domain`."""

    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test_domain: str | None = None
    train_domain: str | None = None
    seed: int = 0


def split_rows(tr: TraceArrays, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Row indices of each split; every sequence lies in exactly one. An empty split is an error."""
    seqs = np.unique(tr.seq_N)
    rng = np.random.default_rng(spec.seed)
    if spec.test_domain is None:
        order = rng.permutation(seqs)
        f = np.asarray(spec.fractions, float) / sum(spec.fractions)
        cut = np.round(np.cumsum(f) * len(order)).astype(int)
        parts = {"train": order[: cut[0]], "validation": order[cut[0] : cut[1]], "test": order[cut[1] :]}
    else:
        dom = {}
        for s, d in zip(tr.seq_N, tr.domain_N):
            dom.setdefault(s, d)
        domains = sorted(set(dom.values()))
        if spec.test_domain not in domains:
            raise PredictorDataError(
                f"{tr.path}: test_domain {spec.test_domain!r} not in the traces' domains {domains}"
            )
        test = np.asarray([s for s in seqs if dom[s] == spec.test_domain])
        rest = [s for s in seqs if dom[s] != spec.test_domain]
        if spec.train_domain is not None:
            rest = [s for s in rest if dom[s] == spec.train_domain]
        rest = rng.permutation(np.asarray(rest, np.int64))
        n_val = max(1, int(round(len(rest) * spec.fractions[1] / max(sum(spec.fractions[:2]), 1e-9))))
        parts = {"train": rest[n_val:], "validation": rest[:n_val], "test": test}
    out = {}
    for name in SPLITS:
        rows = np.flatnonzero(np.isin(tr.seq_N, parts[name]))
        if not len(rows):
            raise PredictorDataError(
                f"{tr.path}: split {name!r} is empty ({len(seqs)} sequences, split {spec}); "
                f"collect more traces or change the split"
            )
        out[name] = rows
    return out


# ------------------------------------------------------------------------------------------- windows


def windows(tr: TraceArrays, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, layer) pairs with a routed layer l and at least one routed layer after it."""
    ok_NL = (tr.ids_NLK[rows] >= 0).all(-1)
    nxt_NL = np.zeros_like(ok_NL)
    nxt_NL[:, :-1] = ok_NL[:, 1:]
    n, l = np.nonzero(ok_NL & nxt_NL)
    return rows[n].astype(np.int64), l.astype(np.int32)


@dataclass(frozen=True)
class Batch:
    """Gathered raw inputs of W windows (numpy), the same fields `live.py` builds from engine state."""

    layer_W: np.ndarray  # int32 l
    cur_ids_WCK: np.ndarray  # int32 routing at l - c (c = 0..C-1), -1 where absent
    cur_w_WCK: np.ndarray  # float32
    prev_ids_WHK: np.ndarray  # int32 previous token's experts at l + h, -1 where absent
    pregate_WGE: np.ndarray  # float32 (zeros without "pregate")
    sketch_WP: np.ndarray  # float32 (zeros [W, 0] without "sketch")
    target_ids_WHK: np.ndarray  # int32 experts at l + h, -1 where absent
    decode_W: np.ndarray  # bool


def gather(
    tr: TraceArrays,
    n_W: np.ndarray,
    l_W: np.ndarray,
    H: int,
    C: int,
    features: tuple[str, ...],
    history: str = "all",
) -> Batch:
    """The inputs and targets of windows (n_W, l_W); `history`: "all" rows or "decode" rows only."""
    L, E, K = tr.L, tr.E, tr.K
    W = len(n_W)
    c_C, h_H = np.arange(C), np.arange(1, H + 1)
    lc_WC = l_W[:, None] - c_C[None]
    cur_ids = np.full((W, C, K), -1, np.int32)
    cur_w = np.zeros((W, C, K), np.float32)
    if "current" in features:
        ok = lc_WC >= 0
        src = tr.ids_NLK[n_W[:, None], np.clip(lc_WC, 0, L - 1)]
        cur_ids = np.where(ok[..., None], src, -1).astype(np.int32)
        cur_w = np.where(ok[..., None], tr.w_NLK[n_W[:, None], np.clip(lc_WC, 0, L - 1)], 0).astype(
            np.float32
        )
    else:  # the layer's own routing is always known when its prediction is made
        cur_ids[:, 0] = tr.ids_NLK[n_W, l_W]
        cur_w[:, 0] = tr.w_NLK[n_W, l_W]
    lh_WH = l_W[:, None] + h_H[None]
    fut_ok = lh_WH < L
    lh_c = np.clip(lh_WH, 0, L - 1)
    target = np.where(fut_ok[..., None], tr.ids_NLK[n_W[:, None], lh_c], -1).astype(np.int32)
    prev_ids = np.full((W, H, K), -1, np.int32)
    if "history" in features:
        p_W = tr.prev_N[n_W]
        has = (p_W >= 0) & (tr.decode_N[n_W] if history == "decode" else True)
        src = tr.ids_NLK[np.where(has, p_W, 0)[:, None], lh_c]
        prev_ids = np.where((fut_ok & has[:, None])[..., None], src, -1).astype(np.int32)
    pregate = np.zeros((W, H + 1, E), np.float32)
    if "pregate" in features:
        pregate = tr.pregate_NLGE[n_W, l_W, : H + 1].astype(np.float32)
    sketch = np.zeros((W, 0), np.float32)
    if "sketch" in features:
        sketch = tr.sketch_NLP[n_W, l_W].astype(np.float32)
    return Batch(l_W.astype(np.int32), cur_ids, cur_w, prev_ids, pregate, sketch, target, tr.decode_N[n_W])


def multi_hot(ids_XK, E: int, w_XK=None, xp=np):
    """[..., E]: w (or 1) at each id, 0 elsewhere; ids of -1 contribute nothing."""
    eye = xp.eye(E, dtype=np.float32)
    hot = eye[xp.clip(ids_XK, 0, E - 1)] * (ids_XK >= 0)[..., None]
    if w_XK is not None:
        hot = hot * w_XK[..., None]
    return hot.sum(-2)
