"""Named offloading policies as pure functions: eviction scores and prefetch candidates.

A policy is a small frozen record naming its eviction score and its prefetch source; the engine and
the simulator both call these functions, so a policy behaves the same in a real run and in replay.
Keys are (moe_layer, expert). `tick` is a global access counter (one per MoE layer visited).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class PolicyError(ValueError):
    """Unknown policy name or option; the message lists the known ones."""


@dataclass(frozen=True)
class EntryStats:
    """What eviction may look at for one cached expert."""

    last_use: int = -1
    uses: int = 0
    loaded_at: int = 0
    prefetched: bool = False


@dataclass(frozen=True)
class PolicySpec:
    name: str
    evict: str  # fifo | lru | lfu | belady | activation | predicted
    prefetch: str | None  # None | pregate | eam | oracle | predictor
    horizon: int = 1  # MoE layers ahead that prefetch looks
    exact: bool = True
    low_precision_on_miss: bool = False
    gate: bool = False  # cost-benefit gate on prefetches (moecxl)
    host_compute: bool = False  # a miss may be computed on the host where the expert lives
    host_only: bool = False  # every miss computed on the host, none fetched (the host-compute-only baseline)
    description: str = ""


POLICIES: dict[str, PolicySpec] = {
    p.name: p
    for p in [
        PolicySpec(
            "on_demand",
            "fifo",
            None,
            0,
            description="DeepSpeed-MoE-style offloading: fetch each expert when a layer needs it",
        ),
        PolicySpec("lru", "lru", None, 0, description="mixtral-offloading's LRU expert cache, fetch on miss"),
        PolicySpec("lfu", "lfu", None, 0, description="least-frequently-used expert cache, fetch on miss"),
        PolicySpec(
            "pregate",
            "lru",
            "pregate",
            1,
            description="Pre-gated MoE / AdapMoE: layer l+1's router on layer l's hidden state "
            "(also mixtral-offloading's speculative loading), LRU cache",
        ),
        PolicySpec(
            "moe_infinity",
            "activation",
            "eam",
            3,
            description="MoE-Infinity: request activation matrix matched to past requests by "
            "cosine similarity; prefetch and evict by matched activation ratio",
        ),
        PolicySpec(
            "hobbit",
            "lru",
            None,
            0,
            exact=False,
            low_precision_on_miss=True,
            description="HOBBIT: on a miss, an int8 copy of a low-weight expert (inexact)",
        ),
        PolicySpec(
            "oracle",
            "belady",
            "oracle",
            4,
            description="the limit: future routing known from a trace, Belady eviction",
        ),
        PolicySpec(
            "moecxl",
            "predicted",
            "pregate",
            2,
            gate=True,
            description="moecxl: multi-layer prediction (pre-gate until a learned predictor is "
            "given) with the cost-benefit gate and prediction-aware eviction",
        ),
        PolicySpec(
            "moecxl_nd",
            "predicted",
            "pregate",
            2,
            exact=False,
            gate=True,
            host_compute=True,
            description="moecxl + the three-way miss decision: fetch, compute on the host where the "
            "expert lives, or (within the quality budget) a low-precision copy; float32-close (1e-5), "
            "not bit-identical, because host-computed experts are summed separately",
        ),
        PolicySpec(
            "moecxl_host",
            "predicted",
            "pregate",
            2,
            exact=False,
            gate=True,
            host_compute=True,
            host_only=True,
            description="moecxl with every miss computed on the host (Fiddler-style, never fetched on "
            "demand; prefetches still copy): the host-compute-only side of the three-way comparison",
        ),
    ]
}


def get_policy(name: str) -> PolicySpec:
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]


# ---- eviction: lowest score goes first --------------------------------------------------------------


def eviction_score(
    evict: str,
    key: tuple[int, int],
    stats: EntryStats,
    *,
    next_use: Mapping[tuple[int, int], int] | None = None,
    prob: Mapping[tuple[int, int], float] | None = None,
    reuse: Reuse | None = None,
) -> tuple:
    """Sort key of a cached expert for eviction (smallest evicted first)."""
    if evict == "fifo":
        return (stats.loaded_at,)
    if evict == "lru":
        return (stats.last_use,)
    if evict == "lfu":
        return (stats.uses, stats.last_use)
    if evict == "belady":
        nu = (next_use or {}).get(key)
        return (-(nu if nu is not None else 1 << 60),)  # farthest next use first
    if evict == "activation" or (evict == "predicted" and reuse is None):
        p = (prob or {}).get(key, 0.0)
        return (p, stats.last_use)
    if evict == "predicted":
        return (-expected_reuse_distance(key, prob, reuse),)
    raise PolicyError(f"unknown eviction rule {evict!r}")


PREDICTION_REACH = 4  # layers ahead for which a prefetch prediction replaces the reuse estimate


REUSE_ALPHAS = (0.02, 0.2)  # EMA rates of the two memories: popularity (~50 visits) and recency (~5)
SKIPPED_ROUNDS = 1000  # a layer the current pass pattern skips: not before the pattern changes


_REUSE_VERSIONS = itertools.count()


class Reuse:
    """Where the layer loop is and how likely each expert is to be used at its layer's next visit.

    Decoding visits the MoE layers cyclically, so a global recency rule is the worst case of LRU (the
    expert used longest ago is the one needed next); what predicts the next use of an expert is the
    distance to its layer and the chance the next token routes to it there.

    That chance is an exponential moving average of use at each layer visit, kept at two rates: a short
    memory (temporal locality: a top-2-of-8 or top-4-of-32 router re-uses an expert within a few tokens)
    and a long one (popularity: a top-1-of-128 router re-uses one within tens). `p_LE` is the larger of
    the two, so an expert is kept if either says it comes back (in simulation on the three targets' traces
    this matched the better single rate of each, where any single rate lost 10-30% on one of them);
    `alpha` gives a single memory instead."""

    def __init__(self, L: int, E: int, alpha: float | None = None, alphas=REUSE_ALPHAS):
        self.L = L
        self.alphas_A = np.array([alpha] if alpha is not None else alphas, np.float64)
        self.p_ALE = np.full((len(self.alphas_A), L, E), 1.0 / E)
        self.p_LE = self.p_ALE.max(axis=0)
        self._slow = int(np.argmin(self.alphas_A))
        self._decay = float(1.0 - self.alphas_A.max())
        self.alpha = 0.2  # rate of the cache-turnover estimate (`miss_ema`)
        self.layer = 0
        # The layers one pass visits, learned: all L for a decoder, only the decoder's in a Switch decode.
        self._cycle: list = []
        self.pos_in_cycle: dict = {m: m for m in range(L)}
        self.version = next(_REUSE_VERSIONS)  # changes with every observation (and differs per instance)

    def observe(self, layer: int, experts) -> None:
        """A visit of `layer` that used `experts` (call before evicting for it)."""
        used_E = np.zeros(self.p_ALE.shape[2])
        used_E[list(experts)] = 1.0
        a_A1 = self.alphas_A[:, None]
        rows_AE = (1.0 - a_A1) * self.p_ALE[:, layer] + a_A1 * used_E
        self.p_ALE[:, layer] = rows_AE
        self.p_LE[layer] = rows_AE.max(axis=0)
        if self._cycle and layer <= self._cycle[-1]:  # wrapped around: the last pass is complete
            self.pos_in_cycle = {m: i for i, m in enumerate(self._cycle)}
            self._cycle = []
        self._cycle.append(layer)
        self.layer = layer
        self._d_L = None
        self.version = next(_REUSE_VERSIONS)

    _d_L = None

    def distances_L(self) -> np.ndarray:
        """`layers_until` of every layer, as a float array (computed once per visit)."""
        if self._d_L is None:
            self._d_L = np.array([self.layers_until(m) for m in range(self.L)], np.float64)
        return self._d_L

    def layers_until(self, layer: int) -> int:
        """Visits until `layer` comes round again in the current pattern. A layer the pattern skips (the
        encoder's, in a Switch decode) comes round only when the pattern changes, at the next request's
        prefill: SKIPPED_ROUNDS·L, beyond any in-pattern expert with more than a ~0.1% chance of use."""
        pos = self.pos_in_cycle
        if layer not in pos or self.layer not in pos:
            return SKIPPED_ROUNDS * self.L if layer not in pos else (layer - self.layer - 1) % self.L + 1
        n = len(pos)
        return (pos[layer] - pos[self.layer] - 1) % n + 1

    def far_near(self, key) -> tuple[float, float, float]:
        """(next-visit chance, long-run chance, per-round decay of the difference) of one expert: the
        larger memory (`p_LE`), the slowest one, and how the fastest forgets (`gate.expected_reuses`)."""
        layer, e = key
        return float(self.p_LE[layer, e]), float(self.p_ALE[self._slow, layer, e]), self._decay

    miss_ema: float = 0.0  # misses per layer visit (EMA): how fast the cache turns over

    def end_visit(self, misses: int) -> None:
        self.miss_ema = (1.0 - self.alpha) * self.miss_ema + self.alpha * misses

    def rounds_cached(self, n_slots: int) -> float:
        """Layer rounds a new copy survives: the cache's slots over the misses that replace them per round."""
        return max(1.0, n_slots / max(1e-9, self.miss_ema * self.L))


def expected_reuse_distance(key, prob, reuse: Reuse | None) -> float:
    """Expected MoE-layer visits until `key` is used again (evict the largest: Belady in expectation).

    Layers until its layer comes round, plus L visits per expected failed round (geometric, p per round).
    p: the prefetch prediction where there is one, else the reuse estimate of its layer."""
    layer, e = key
    d = reuse.layers_until(layer)
    p = (prob or {}).get(key) if d <= PREDICTION_REACH else None
    if p is None:
        p = float(reuse.p_LE[layer, e])
    p = min(max(p, 1e-6), 1.0)
    return d + reuse.L * (1.0 - p) / p


def farthest_reuse_slot(layer_S, expert_S, seq_S, evictable_S, prob, slot_of, reuse: Reuse):
    """`choose_victims("predicted", ..., n=1)` over the engine's slot arrays, vectorised for its hot path:
    the slot whose expert has the largest `expected_reuse_distance`, ties to the earliest cached (`seq_S`,
    the order the pure rule scans the cache dict in). `evictable_S`: occupied slots that may go. Same
    arithmetic, so the same victim. None if none."""
    if not evictable_S.any():
        return None
    dist_S = reuse_distance_S(layer_S, expert_S, evictable_S, prob, slot_of, reuse)
    best_S = evictable_S & (dist_S == dist_S.max())
    return int(np.argmin(np.where(best_S, seq_S, np.iinfo(np.int64).max)))


def reuse_distance_S(layer_S, expert_S, evictable_S, prob, slot_of, reuse: Reuse) -> np.ndarray:
    """`expected_reuse_distance` of every evictable slot's expert (-inf elsewhere), same arithmetic."""
    d_L = reuse.distances_L()
    layer_S = np.where(evictable_S, layer_S, 0)
    d_S = d_L[layer_S]
    p_S = reuse.p_LE[layer_S, np.where(evictable_S, expert_S, 0)]
    for key, p in (prob or {}).items():
        s = slot_of.get(key)
        if s is not None and p is not None and d_L[key[0]] <= PREDICTION_REACH:
            p_S[s] = float(p)
    p_S = np.clip(p_S, 1e-6, 1.0)
    return np.where(evictable_S, d_S + reuse.L * (1.0 - p_S) / p_S, -np.inf)


def choose_victims(
    evict: str,
    cached: Mapping[tuple[int, int], EntryStats],
    n: int,
    protect: set,
    **ctx,
) -> list[tuple[int, int]]:
    """The n cached experts to evict, never one in `protect` (needed now or in flight)."""
    score = lambda k: eviction_score(evict, k, cached[k], **ctx)  # noqa: E731
    cands = (k for k in cached if k not in protect)
    if n == 1:  # the common case, once per miss: a scan, not a sort (same victim: min keeps the first)
        best = min(cands, key=score, default=None)
        return [] if best is None else [best]
    return sorted(cands, key=score)[:n]


class NextUse:
    """Belady's look-ahead over a known future of (layer, experts) visits: at position `pos`, how many
    visits until each expert is needed next, within `window` visits (None beyond). Built once; each
    lookup is a bisection (the engine's and the simulator's oracle share it)."""

    def __init__(self, future: Sequence[tuple[int, Sequence[int]]], window: int):
        self.window = window
        self._at: dict = {}
        for i, (layer, experts) in enumerate(future):
            for e in experts:
                pos = self._at.setdefault((layer, int(e)), [])
                if not pos or pos[-1] != i:
                    pos.append(i)

    def at(self, pos: int) -> _NextUseView:
        return _NextUseView(self, pos)


@dataclass(frozen=True)
class _NextUseView:
    nu: NextUse
    pos: int

    def get(self, key, default=None):
        pos = self.nu._at.get(key)
        if not pos:
            return default
        j = bisect.bisect_left(pos, self.pos)
        if j < len(pos) and pos[j] - self.pos < self.nu.window:
            return pos[j] - self.pos
        return default


# ---- prefetch sources -------------------------------------------------------------------------------


def topk_candidates(
    probs_HE: np.ndarray, layers: Sequence[int], k: int
) -> list[tuple[tuple[int, int], float]]:
    """Top-k experts of each future layer from per-layer probabilities, best first."""
    out = []
    for h, layer in enumerate(layers):
        top = np.argsort(-probs_HE[h])[:k]
        out.extend(((layer, int(e)), float(probs_HE[h, e])) for e in top)
    out.sort(key=lambda c: -c[1])
    return out


def pregate_vote_probs(top_HNK: np.ndarray, E: int) -> np.ndarray:
    """Votes of N tokens' predicted top-k ids [H, N, K] as probabilities [H, E]: the fraction of tokens
    voting, scaled by min(N, E/K) and capped at 1 (one token: 1 per vote). The simulator replays
    pre-gating from stored top-k ids through this same function."""
    H, N, K = top_HNK.shape
    votes = np.zeros((H, E))
    for h in range(H):
        np.add.at(votes[h], top_HNK[h].reshape(-1), 1.0)
    return np.minimum(votes / max(1, N) * min(N, E / max(1, K)), 1.0) if N > 1 else np.minimum(votes, 1.0)


def eam_match(current_LE: np.ndarray, library: Sequence[np.ndarray]) -> np.ndarray | None:
    """MoE-Infinity: the stored activation matrix most cosine-similar to the current request's."""
    if not library:
        return None
    cur = current_LE.reshape(-1)
    best, best_sim = None, -1.0
    n_cur = np.linalg.norm(cur)
    for eam in library:
        v = eam.reshape(-1)
        sim = float(cur @ v / (n_cur * np.linalg.norm(v) + 1e-12))
        if sim > best_sim:
            best, best_sim = eam, sim
    return best


def eam_probs(
    current_LE: np.ndarray, library: Sequence[np.ndarray], layers: Sequence[int], top_k: int
) -> np.ndarray:
    """Activation ratios of the matched matrix (falling back to the current one) for future layers, as
    P(used): a layer's ratios sum to 1 over its experts and a token uses `top_k` of them."""
    ref = eam_match(current_LE, library)
    src = (ref if ref is not None else current_LE).astype(float)
    rows = src[list(layers)]
    return rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-12) * top_k
