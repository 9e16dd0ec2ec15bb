"""Prediction metrics, pinned down (DESIGN section 5). Pure numpy.

For a window and horizon h: the actual set S (K experts at layer l+h) and per-expert probabilities p [E].
  exact-set accuracy   top-K of p == S
  recall@b             |top-b of p ∩ S| / K   (b = K: recall@k; b = 2K: a prefetch budget of 2K)
  ECE                  expected calibration error of p(e in S) over every (window, h, e), equal-width bins
Ties in p are broken by expert index (stable sort), so a constant predictor is deterministic.
"""

from __future__ import annotations

import numpy as np

HORIZONS = (1, 2, 4)
PHASES = ("prefill", "decode")


def top_b(p_NE: np.ndarray, b: int) -> np.ndarray:
    """int [N, b]: the b most probable experts, best first (stable: ties go to the lower index)."""
    return np.argsort(-p_NE, axis=-1, kind="stable")[:, :b]


def hits(p_NE: np.ndarray, ids_NK: np.ndarray, b: int) -> np.ndarray:
    """int [N]: |top-b of p ∩ actual set|."""
    top = top_b(p_NE, b)
    return (top[:, :, None] == ids_NK[:, None, :]).any(-1).sum(-1)


def set_metrics(p_NE: np.ndarray, ids_NK: np.ndarray, budgets: tuple[int, ...] = (2,)) -> dict:
    """exact-set accuracy, recall@k and recall@{m}k for each multiple m in `budgets`, over N windows."""
    N, K = ids_NK.shape
    if N == 0:
        return {"n": 0}
    h_k = hits(p_NE, ids_NK, K)
    out = {"n": int(N), "exact": float((h_k == K).mean()), "recall@k": float(h_k.mean() / K)}
    for m in budgets:
        out[f"recall@{m}k"] = float(hits(p_NE, ids_NK, min(m * K, p_NE.shape[-1])).mean() / K)
    return out


def targets(ids_NK: np.ndarray, E: int) -> np.ndarray:
    """float [N, E]: 1 for each expert of the actual set."""
    y = np.zeros((len(ids_NK), E), np.float32)
    np.put_along_axis(y, np.clip(ids_NK, 0, E - 1), 1.0, axis=-1)
    return y


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    """Reliability diagram data: per equal-width probability bin, mean prediction, observed frequency
    and count; and the expected calibration error sum_b (n_b / n) |freq_b - conf_b|."""
    p, y = np.asarray(p, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    b = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(b, minlength=bins).astype(np.float64)
    conf = np.bincount(b, weights=p, minlength=bins) / np.maximum(n, 1)
    freq = np.bincount(b, weights=y, minlength=bins) / np.maximum(n, 1)
    ece = float((n * np.abs(freq - conf)).sum() / max(n.sum(), 1))
    return {
        "edges": np.linspace(0, 1, bins + 1).tolist(),
        "confidence": conf.tolist(),
        "frequency": freq.tolist(),
        "count": n.astype(int).tolist(),
        "ece": ece,
    }


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    return reliability(p, y, bins)["ece"]


def evaluate(
    p_NHE: np.ndarray,
    target_ids_NHK: np.ndarray,
    decode_N: np.ndarray,
    horizons: tuple[int, ...] = HORIZONS,
    bins: int = 10,
) -> dict:
    """Every metric per horizon (1-based), overall and per phase, plus calibration over all horizons.

    A (window, h) counts only where the actual set is known (ids >= 0, l + h within the model)."""
    N, H, E = p_NHE.shape
    K = target_ids_NHK.shape[-1]
    valid_NH = (target_ids_NHK >= 0).all(-1)
    out: dict = {"K": K, "E": E, "horizons": {}}
    for h in horizons:
        if h > H:
            continue
        v = valid_NH[:, h - 1]
        p, ids = p_NHE[v, h - 1], target_ids_NHK[v, h - 1]
        row = set_metrics(p, ids)
        dec = decode_N[v]
        for name, sel in (("prefill", ~dec), ("decode", dec)):
            row[name] = set_metrics(p[sel], ids[sel])
        row["ece"] = ece(p, targets(ids, E), bins) if len(p) else None
        out["horizons"][str(h)] = row
    v = valid_NH.reshape(-1)
    p_all = p_NHE.reshape(-1, E)[v]
    y_all = targets(target_ids_NHK.reshape(-1, K)[v], E)
    out["reliability"] = reliability(p_all, y_all, bins)
    out["ece"] = out["reliability"]["ece"]
    return out
