"""Prefetch sources: where a policy's guesses about the layers ahead come from. Each is an object that
turns the decision core's state and one visit into ((layer, expert), p) candidates, best first.

The oracle reads the trace's future; pre-gating votes later routers' top-k on this layer's input;
MoE-Infinity matches the request's expert activation matrix to past ones; a `Predictor` (learned, live
or replayed from stored predictions) answers for itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moecxl.runtime.mechanism import CoreError
from moecxl.runtime.policies.errors import PolicyError


class PrefetchSource:
    """Base of the prefetch sources. `candidates` gets the layers the policy looks ahead to (never
    empty); `on_visit` sees every visit as it starts (activation tracing)."""

    name = "source"
    needs_future = False  # reads the trace's future (the oracle); no prefill streaming, no layer list
    needs_pregate = False  # reads `Visit.pregate_top_HNK` (later routers on this layer's input)
    learned = False  # answered by the run's `Predictor`

    def on_visit(self, core, v) -> None:
        """A visit starts (before its misses are served)."""
        return None

    def observe(self, core, v, features) -> None:
        """A visit's prefetch round starts (every visit, the last layer's too)."""
        return None

    def candidates(self, core, v, layers: list[int], features) -> list | None:
        raise NotImplementedError(f"prefetch source {self.name!r} defines no candidates")

    def __eq__(self, other) -> bool:  # a source equals its name (configs name sources by string)
        if isinstance(other, str):
            return other == self.name
        return type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Oracle(PrefetchSource):
    """The next `horizon` visits' experts, from the trace (the limit)."""

    name = "oracle"
    needs_future = True

    def candidates(self, core, v, layers, features):
        nxt = core.future[core.pos : core.pos + core.policy.horizon]
        return [((layer, int(e)), 1.0) for layer, experts in nxt for e in experts]


class Pregate(PrefetchSource):
    """Pre-gated MoE / AdapMoE: layer l+h's router on layer l's input; tokens' votes as probabilities."""

    name = "pregate"
    needs_pregate = True

    def candidates(self, core, v, layers, features):
        top_HNK = v.pregate_top_HNK
        if top_HNK is None:
            raise CoreError(
                f"policy {core.policy.name!r} pre-gates {core.policy.horizon} layer(s) ahead but visit of "
                f"layer {v.layer} carries no pregate predictions (`Visit.pregate_top_HNK`; build traces "
                "with moecxl.sim.predict)"
            )
        top_HNK = top_HNK[: len(layers)]
        # -1: no pre-gate for layer m+h (past a Switch stack, or a tiled trace's last layer): no votes.
        have = (top_HNK >= 0).all(axis=(1, 2))
        if not have.any():
            return None
        layers = [layer for layer, ok in zip(layers, have) if ok]
        probs = pregate_vote_probs(top_HNK[have].astype("int64"), core.E)
        cands = topk_candidates(probs, layers, min(core.E, max(core.K, int((probs > 0).sum(1).max()))))
        return [c for c in cands if c[1] > 0]


class ActivationMatrix(PrefetchSource):
    """MoE-Infinity: the request's expert activation matrix, matched to past requests' by cosine."""

    name = "eam"

    def on_visit(self, core, v):
        core.eam_current[v.layer, list(v.experts)] += v.tokens_per_expert

    def candidates(self, core, v, layers, features):
        probs = eam_probs(core.eam_current, core.eam_library, layers, core.K)
        return topk_candidates(probs, layers, core.K)


class Learned(PrefetchSource):
    """The run's `Predictor`: `candidates(visit, layers, features)`; None until one is given."""

    name = "predictor"
    learned = True

    def observe(self, core, v, features):
        if hasattr(core.predictor, "observe_visit"):  # history at every layer, the last too
            core.predictor.observe_visit(v, features)

    def candidates(self, core, v, layers, features):
        if core.predictor is None:
            return None
        return core.predictor.candidates(v, layers, features)


SOURCES: dict[str, PrefetchSource] = {s.name: s for s in (Oracle(), Pregate(), ActivationMatrix(), Learned())}


def source_of(prefetch) -> PrefetchSource | None:
    """The source object of a name (or the object itself; None: no prefetch)."""
    if prefetch is None or isinstance(prefetch, PrefetchSource):
        return prefetch
    if prefetch not in SOURCES:
        raise PolicyError(f"unknown prefetch source {prefetch!r}; known: {', '.join(SOURCES)}")
    return SOURCES[prefetch]


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
