"""How likely a cached expert is to be used again, and how soon: the "predicted" eviction rule's estimate.

Keys are (moe_layer, expert). The engine and the simulator share it through the decision core.
"""

from __future__ import annotations

import itertools

import numpy as np

PREDICTION_REACH = 4  # layers ahead for which a prefetch prediction replaces the reuse estimate


REUSE_ALPHAS = (0.02, 0.2)  # EMA rates of the two memories: popularity (~50 visits) and recency (~5)
SKIPPED_ROUNDS = 1000  # a layer the current pass pattern skips: not before the pattern changes
TURNOVER_ALPHA = 0.2  # EMA rate of the cache-turnover estimate (`Reuse.miss_ema`), per layer visit


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
        self.alpha = TURNOVER_ALPHA
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
