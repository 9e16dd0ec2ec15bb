"""Baseline expert predictors, with the learned model's interface: `predict(tr, n_W, l_W) -> p [W, H, E]`,
the probability that expert e is in the top-k set of layer l+h (h = 1..H), for windows (row n, layer l).

Fitted on the training rows only (`fit_baselines`). Probabilities from choice shares are K x share,
capped at 1, so that a top-k set's probabilities sum to about K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecxl.traces import popularity, transition_matrix
from predictor.data import PredictorDataError, TraceArrays, multi_hot


def _future_layers(l_W: np.ndarray, H: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    lh_WH = l_W[:, None] + np.arange(1, H + 1)[None]
    return np.clip(lh_WH, 0, L - 1), lh_WH < L


def _zero_outside(p_WHE: np.ndarray, ok_WH: np.ndarray) -> np.ndarray:
    return np.where(ok_WH[..., None], p_WHE, 0.0)


@dataclass(frozen=True)
class GlobalFrequency:
    """Every layer predicted by the expert index's share over all layers."""

    p_E: np.ndarray
    H: int
    name: str = "global_freq"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        lh, ok = _future_layers(l_W, self.H, tr.L)
        return _zero_outside(np.broadcast_to(self.p_E, (*lh.shape, tr.E)), ok)


@dataclass(frozen=True)
class LayerFrequency:
    """Layer l+h predicted by its experts' popularity."""

    p_LE: np.ndarray
    H: int
    name: str = "layer_freq"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        lh, ok = _future_layers(l_W, self.H, tr.L)
        return _zero_outside(self.p_LE[lh], ok)


@dataclass(frozen=True)
class Markov:
    """First-order chain over layers: this token's choices at l, through T_l (l -> l+1), chained h times."""

    T_LEE: np.ndarray  # [L, E, E]; row i of T_l: P(choice at l+1 | choice i at l); last layer unused
    H: int
    name: str = "markov"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        K, L = tr.K, tr.L
        d_WE = multi_hot(tr.ids_NLK[n_W, l_W], tr.E) / K
        out = np.zeros((len(n_W), self.H, tr.E))
        for h in range(self.H):
            src = np.clip(l_W + h, 0, L - 1)
            d_WE = np.einsum("WE,WEF->WF", d_WE, self.T_LEE[src])
            out[:, h] = np.minimum(K * d_WE, 1.0)
        _, ok = _future_layers(l_W, self.H, L)
        return _zero_outside(out, ok)


@dataclass(frozen=True)
class Temporal:
    """The previous token's experts at l+h (kept with the measured stay rate), popularity otherwise."""

    stay: float  # P(e in S_t[l] | e in S_{t-1}[l]) on the training rows
    share_LE: np.ndarray  # popularity (rows sum to 1)
    H: int
    name: str = "temporal"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        lh, ok = _future_layers(l_W, self.H, tr.L)
        p_W = tr.prev_N[n_W]
        has = p_W >= 0
        prev_WHK = tr.ids_NLK[np.where(has, p_W, 0)[:, None], lh]
        prev_WHE = multi_hot(np.where(has[:, None, None], prev_WHK, -1), tr.E)
        share_WHE = self.share_LE[lh] * (1 - prev_WHE)  # the rest shares what the previous set leaves
        share_WHE = share_WHE / np.maximum(share_WHE.sum(-1, keepdims=True), 1e-12)
        with_prev = prev_WHE * self.stay + (1 - self.stay) * tr.K * share_WHE
        p = np.where(has[:, None, None], with_prev, tr.K * self.share_LE[lh])
        return _zero_outside(np.clip(p, 0.0, 1.0), ok)


@dataclass(frozen=True)
class ActivationMatching:
    """MoE-Infinity: the request's expert activation matrix so far (earlier tokens at every layer, this
    token at layers <= l) matched by cosine similarity to stored training requests' matrices; layer
    l+h is predicted by the best match's activation ratios."""

    library_SLE: np.ndarray  # activation counts of stored requests
    H: int
    name: str = "moe_infinity"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        L, K = tr.L, tr.K
        cur_WLE = _request_eam(tr, n_W, l_W)
        lib = self.library_SLE.reshape(len(self.library_SLE), -1)
        lib = lib / np.maximum(np.linalg.norm(lib, axis=1, keepdims=True), 1e-12)
        cur = cur_WLE.reshape(len(n_W), -1)
        cur = cur / np.maximum(np.linalg.norm(cur, axis=1, keepdims=True), 1e-12)
        best_W = np.argmax(cur @ lib.T, axis=1)
        lh, ok = _future_layers(l_W, self.H, L)
        rows_WHE = self.library_SLE[best_W[:, None], lh]
        ratio = rows_WHE / np.maximum(rows_WHE.sum(-1, keepdims=True), 1e-12)
        return _zero_outside(np.minimum(K * ratio, 1.0), ok)


def _request_eam(tr: TraceArrays, n_W: np.ndarray, l_W: np.ndarray) -> np.ndarray:
    """float [W, L, E]: expert use counts of the window's request before its token, plus this token's
    layers <= l."""
    L, E = tr.L, tr.E
    out = np.zeros((len(n_W), L, E), np.float32)
    seqs = tr.seq_N[n_W]
    for s in np.unique(seqs):
        rows = np.flatnonzero(tr.seq_N == s)
        hot_TLE = multi_hot(tr.ids_NLK[rows], E)
        before_TLE = np.cumsum(hot_TLE, axis=0) - hot_TLE
        sel = np.flatnonzero(seqs == s)
        t = n_W[sel] - rows[0]
        lower_WL = np.arange(L)[None] <= l_W[sel][:, None]
        out[sel] = before_TLE[t] + hot_TLE[t] * lower_WL[..., None]
    return out


@dataclass(frozen=True)
class PreGate:
    """Router l+h applied to layer l's MoE input (Pre-gated MoE, AdapMoE): K x softmax, capped at 1."""

    H: int
    name: str = "pregate"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        if tr.pregate_NLGE is None:
            raise PredictorDataError(
                f"{tr.path}: baseline 'pregate' needs pre-gate logits (feature 'pregate': the model)"
            )
        z = tr.pregate_NLGE[n_W, l_W, 1 : self.H + 1].astype(np.float32)
        z = np.exp(z - z.max(-1, keepdims=True))
        _, ok = _future_layers(l_W, self.H, tr.L)
        return _zero_outside(np.minimum(tr.K * z / z.sum(-1, keepdims=True), 1.0), ok)


@dataclass(frozen=True)
class Oracle:
    """The future known: probability 1 on the actual set."""

    H: int
    name: str = "oracle"

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        lh, ok = _future_layers(l_W, self.H, tr.L)
        return _zero_outside(multi_hot(tr.ids_NLK[n_W[:, None], lh], tr.E), ok)


def fit_baselines(tr: TraceArrays, rows: np.ndarray, H: int, library_size: int = 256, seed: int = 0) -> dict:
    """Every baseline fitted on `rows` (the training split); pre-gating only when its logits exist."""
    L, E, K = tr.L, tr.E, tr.K
    ids = tr.ids_NLK[rows]
    pop_LE = popularity(ids, E)
    p_LE = np.minimum(K * pop_LE, 1.0)
    valid = ids[ids >= 0]
    glob = np.bincount(valid, minlength=E)[:E] / max(len(valid), 1)
    T_LEE = np.zeros((L, E, E))
    for l in range(L - 1):
        T = transition_matrix(ids[:, l], ids[:, l + 1], E)
        T[T.sum(1) == 0] = pop_LE[l + 1]  # choices never seen at l: fall back to l+1's popularity
        T_LEE[l] = T
    # Stay rate: share of a token's experts the previous token also used, same layer.
    prev = tr.prev_N[rows]
    has = prev >= 0
    a, b = tr.ids_NLK[rows[has]], tr.ids_NLK[prev[has]]
    ok = (a >= 0).all(-1) & (b >= 0).all(-1)
    same = (a[..., :, None] == b[..., None, :]).any(-1)  # [n, L, K]
    stay = float(same[ok].mean()) if ok.any() else 0.0
    seqs = np.unique(tr.seq_N[rows])
    pick = np.random.default_rng(seed).permutation(seqs)[:library_size]
    lib = np.stack([multi_hot(tr.ids_NLK[tr.seq_N == s], E).sum(0) for s in pick])
    out = {
        "global_freq": GlobalFrequency(np.minimum(K * glob, 1.0), H),
        "layer_freq": LayerFrequency(p_LE, H),
        "markov": Markov(T_LEE, H),
        "temporal": Temporal(stay, pop_LE, H),
        "moe_infinity": ActivationMatching(lib, H),
    }
    if tr.pregate_NLGE is not None:
        out["pregate"] = PreGate(H)
    out["oracle"] = Oracle(H)
    return out
