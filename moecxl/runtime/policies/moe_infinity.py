"""MoE-Infinity (Xue et al., arXiv 2401.14361; EfficientMoE/MoE-Infinity), as its code behaves:

- tracing: the request's expert activation matrix (EAM, routed-token counts per layer and expert) is
  matched at every layer to the most cosine-similar matrix of past requests (memory/expert_tracer.py);
- prefetch: the matched matrix, zeroed before the current layer and weighted per layer by
  `1 - (l - current) / (L + 1)` (memory/expert_predictor.py), names every expert with a positive score in
  all the remaining layers, highest first (memory/expert_prefetcher.py: prefetch_experts); copies are
  issued as the link frees (here: while staging has room, each visit);
- caching: the lowest predicted activation is evicted first, then the least recently used
  (memory/expert_priority_score.py combines layer distance, the request's matrix and frequency).
"""

from __future__ import annotations

import numpy as np

from moecxl.runtime.policies.base import Policy
from moecxl.runtime.policies.sources import ActivationMatrix, eam_match

ALL_REMAINING = 128  # horizon: every layer after the current one (no model here has more MoE layers)


class RemainingLayers(ActivationMatrix):
    """The matched EAM over all remaining layers, decayed with distance, as P(used) (capped at 1)."""

    name = "eam_remaining"

    def candidates(self, core, v, layers, features):
        ref = eam_match(core.eam_current, core.eam_library)
        src = (ref if ref is not None else core.eam_current).astype(float)
        rows_HE = src[list(layers)]
        rows_HE = rows_HE / np.maximum(rows_HE.sum(axis=1, keepdims=True), 1e-12) * core.K
        decay_H = 1.0 - (np.asarray(layers, float) - v.layer) / (core.L + 1)
        score_HE = np.minimum(rows_HE, 1.0) * decay_H[:, None]
        out = [
            ((layer, int(e)), float(score_HE[h, e]))
            for h, layer in enumerate(layers)
            for e in np.flatnonzero(score_HE[h] > 0)
        ]
        out.sort(key=lambda c: -c[1])
        return out


POLICY = Policy(
    "moe_infinity",
    evict="activation",
    prefetch=RemainingLayers(),
    horizon=ALL_REMAINING,
    description="MoE-Infinity: the request's activation matrix matched to past requests' by cosine; every "
    "expert it predicts in the remaining layers prefetched (decayed with distance), lowest prediction evicted",
)
