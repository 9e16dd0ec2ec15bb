"""Statistics of a trace set: popularity, transitions, routing entropies, reuse distances, domains.

Pure functions over numpy arrays. Ids are int [N, L, K] (or [N, K] for one layer); -1 marks a layer a
token does not pass through (Switch), and such tokens are left out of that layer's statistics.
"""

from __future__ import annotations

import math

import numpy as np

from moecxl.traces.schema import TraceSet


def popularity(ids_NLK: np.ndarray, E: int) -> np.ndarray:
    """float [L, E]: each expert's share of the routing slots of its layer (each row sums to 1)."""
    N, L, K = ids_NLK.shape
    counts_LE = np.zeros((L, E), np.float64)
    for l in range(L):
        ids = ids_NLK[:, l][ids_NLK[:, l] >= 0]
        counts_LE[l] = np.bincount(ids, minlength=E)[:E]
    return counts_LE / np.maximum(counts_LE.sum(axis=1, keepdims=True), 1)


def _valid_rows(a_NK: np.ndarray, b_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = (a_NK >= 0).all(axis=1) & (b_NK >= 0).all(axis=1)
    return a_NK[ok], b_NK[ok]


def _pairs(a_NK: np.ndarray, b_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (choice at a, choice at b) of each token: [N*Ka*Kb] each, so each token weighs the same."""
    N, Ka = a_NK.shape
    Kb = b_NK.shape[1]
    return np.repeat(a_NK, Kb, axis=1).reshape(-1), np.tile(b_NK, (1, Ka)).reshape(-1)


def transition_matrix(a_NK: np.ndarray, b_NK: np.ndarray, E: int) -> np.ndarray:
    """float [E, E]: P(an expert chosen at b is j | an expert chosen at a is i), over every pair of
    choices; rows of experts never chosen at a are zero."""
    a, b = _pairs(*_valid_rows(a_NK, b_NK))
    counts_EE = np.bincount(a * E + b, minlength=E * E).reshape(E, E).astype(np.float64)
    return counts_EE / np.maximum(counts_EE.sum(axis=1, keepdims=True), 1)


def entropy_bits(x_N: np.ndarray) -> float:
    """Plug-in Shannon entropy (bits) of the empirical distribution of symbols x."""
    if len(x_N) == 0:
        return float("nan")
    _, counts = np.unique(x_N, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy_bits(x_N: np.ndarray, y_N: np.ndarray) -> float:
    """Plug-in H(Y | X) = H(X, Y) - H(X) in bits, for integer symbol arrays of equal length."""
    _, joint = np.unique(np.stack([x_N, y_N], axis=1), axis=0, return_inverse=True)
    return entropy_bits(joint.reshape(-1)) - entropy_bits(x_N)


def set_symbols(ids_NK: np.ndarray) -> np.ndarray:
    """int [N]: one symbol per distinct top-k set (order of the K choices ignored)."""
    if len(ids_NK) == 0:
        return np.zeros(0, np.int64)
    _, inv = np.unique(np.sort(ids_NK, axis=1), axis=0, return_inverse=True)
    return inv.reshape(-1)


def routing_entropy(a_NK: np.ndarray, b_NK: np.ndarray) -> dict:
    """Marginal H(B) and conditional H(B | A) of routing at b given routing at a, two ways (bits):

    - "set": A and B are the top-k sets as single symbols; ranges over [0, log2 C(E, K)].
    - "choice": (a, b) is a pair of one choice at a and one at b, uniform over the K_a x K_b pairs of a
      token; ranges over [0, log2 E]. The two agree for top-1.
    A deterministic map A -> B gives a set conditional entropy of 0; independent uniform routing gives
    conditional = marginal (log2 E per choice). Plug-in estimates: biased low when N is small against
    the number of symbols (report `n`).
    """
    a_NK, b_NK = _valid_rows(a_NK, b_NK)
    sa, sb = set_symbols(a_NK), set_symbols(b_NK)
    pa_, pb = _pairs(a_NK, b_NK)
    return {
        "n": int(len(a_NK)),
        "set": {"marginal": entropy_bits(sb), "conditional": conditional_entropy_bits(sa, sb)},
        "choice": {"marginal": entropy_bits(pb), "conditional": conditional_entropy_bits(pa_, pb)},
    }


def previous_token(seq_id_N: np.ndarray, pos_N: np.ndarray) -> np.ndarray:
    """int [N]: the row of the same sequence at pos - 1, or -1 (rows sorted by seq_id, pos)."""
    prev = np.full(len(seq_id_N), -1, np.int64)
    if len(seq_id_N) > 1:
        ok = (seq_id_N[1:] == seq_id_N[:-1]) & (pos_N[1:] == pos_N[:-1] + 1)
        prev[1:][ok] = np.flatnonzero(ok)
    return prev


def layer_entropies(ids_NLK: np.ndarray) -> list[dict | None]:
    """H(E[l+1] | E[l]) beside H(E[l+1]) for l = 0..L-2 (None where no token passes both layers)."""
    out = []
    for l in range(ids_NLK.shape[1] - 1):
        r = routing_entropy(ids_NLK[:, l], ids_NLK[:, l + 1])
        out.append(r if r["n"] else None)
    return out


def temporal_entropies(ids_NLK: np.ndarray, seq_id_N: np.ndarray, pos_N: np.ndarray) -> list[dict | None]:
    """H(E_t[l] | E_{t-1}[l]) beside H(E_t[l]) per layer, over consecutive tokens of a sequence."""
    prev = previous_token(seq_id_N, pos_N)
    cur = np.flatnonzero(prev >= 0)
    out = []
    for l in range(ids_NLK.shape[1]):
        r = routing_entropy(ids_NLK[prev[cur], l], ids_NLK[cur, l])
        out.append(r if r["n"] else None)
    return out


def reuse_distances(ids_NK: np.ndarray, seq_id_N: np.ndarray, pos_N: np.ndarray) -> tuple[np.ndarray, int]:
    """Temporal reuse distance at one layer: for each use of expert e by a token, the number of tokens
    since the previous use of e in the same sequence (1 = the previous token used it too). Returns the
    distances and the count of first uses (no earlier use in the sequence)."""
    ok = (ids_NK >= 0).all(axis=1)
    ids_NK, seq, pos = ids_NK[ok], seq_id_N[ok], pos_N[ok]
    K = ids_NK.shape[1]
    e, s, p = ids_NK.reshape(-1), np.repeat(seq, K), np.repeat(pos, K)
    order = np.lexsort((p, s, e))
    e, s, p = e[order], s[order], p[order]
    same = (e[1:] == e[:-1]) & (s[1:] == s[:-1])
    return (p[1:] - p[:-1])[same].astype(np.int64), int(len(e) - same.sum())


def tv_distance(p_LE: np.ndarray, q_LE: np.ndarray) -> np.ndarray:
    """float [L]: total variation distance between two popularity distributions per layer (0..1)."""
    return 0.5 * np.abs(p_LE - q_LE).sum(axis=-1)


def _hist(d: np.ndarray, max_d: int) -> list[int]:
    """Counts of distance 1..max_d, then one bin for everything longer."""
    c = np.bincount(np.minimum(d, max_d + 1), minlength=max_d + 2)
    return c[1:].tolist()


def compute_stats(ts: TraceSet, max_distance: int = 64) -> dict:
    """Every statistic of a trace set as plain JSON data (popularities, transitions, entropies, reuse)."""
    meta = ts.metadata
    E, L = meta["E"], meta["L"]
    ids, sid, pos = ts.expert_ids, ts.seq_id, ts.pos
    domain, is_dec = ts.domain, ts.is_decode
    pop = popularity(ids, E)
    by_domain = {d: popularity(ids[domain == d], E) for d in sorted(set(domain.tolist()))}
    names = sorted(by_domain)
    domain_tv = {
        f"{a}|{b}": tv_distance(by_domain[a], by_domain[b]).tolist()
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    phase_tv = (
        tv_distance(popularity(ids[~is_dec], E), popularity(ids[is_dec], E)).tolist()
        if is_dec.any() and (~is_dec).any()
        else None
    )
    valid_pairs = [l for l in range(L - 1) if ((ids[:, l] >= 0).all(1) & (ids[:, l + 1] >= 0).all(1)).any()]
    shown = (
        sorted(
            {
                valid_pairs[i]
                for i in np.linspace(0, len(valid_pairs) - 1, min(4, len(valid_pairs)), dtype=int)
            }
        )
        if valid_pairs
        else []
    )
    reuse = []
    for l in range(L):
        d, cold = reuse_distances(ids[:, l], sid, pos)
        reuse.append(
            {
                "hist": _hist(d, max_distance),
                "first_uses": cold,
                "mean": float(d.mean()) if len(d) else None,
                "median": float(np.median(d)) if len(d) else None,
            }
        )
    return {
        "trace": str(ts.path),
        "model": meta["model"]["id"],
        "corpus": meta["corpus"],
        "split": meta["split"],
        "rows": len(ts),
        "sequences": int(len(np.unique(sid))),
        "decode_rows": int(is_dec.sum()),
        "L": L,
        "E": E,
        "K": meta["K"],
        "layers": meta["layers"],
        "log2_E": math.log2(E),
        "log2_sets": math.log2(math.comb(E, meta["K"])),
        "popularity": pop.tolist(),
        "popularity_by_domain": {d: p.tolist() for d, p in by_domain.items()},
        "domain_tv": domain_tv,
        "phase_tv": phase_tv,
        "transitions": {str(l): transition_matrix(ids[:, l], ids[:, l + 1], E).tolist() for l in shown},
        "layer_entropy": layer_entropies(ids),
        "temporal_entropy": temporal_entropies(ids, sid, pos),
        "reuse_distance": {"max_distance": max_distance, "per_layer": reuse},
    }
