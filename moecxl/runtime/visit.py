"""One MoE-layer visit as the decision core sees it: which experts a layer needs now, and how much.

Model-independent: the engine builds it from the routing it reads back, the simulator from a trace row
group. Both hand the same record to `DecisionCore.visit`, so both make the same decisions.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Visit:
    """One MoE layer of one forward pass: the distinct experts it needs and what the cost model needs."""

    phase: str  # prefill | decode
    step: int  # 0 = prefill, i = i-th decode forward
    layer: int
    experts: tuple[int, ...]  # distinct, ascending (np.unique order)
    tokens_per_expert: tuple[int, ...]  # routed tokens per expert in `experts` (activation matrices)
    max_weight: tuple[float, ...]  # largest routing weight per expert in `experts` (HOBBIT); may be ()
    n_tokens: int
    context: int  # keys per query: prompt length (prefill) or cache length (decode)
    batch: int
    pregate_top_HNK: np.ndarray | None = None  # later routers' top-k ids for this visit's tokens

    def tokens(self, e: int) -> int:
        """Tokens routed to expert `e` at this visit (0: made resident without being routed)."""
        try:
            return self.tokens_per_expert[self.experts.index(e)]
        except ValueError:
            return 0


def restrict(v: Visit, experts) -> Visit:
    """The part of visit `v` that needs only `experts` (a group of a layer processed in groups)."""
    keep = sorted(int(e) for e in experts)
    at = [v.experts.index(e) for e in keep]
    return dataclasses.replace(
        v,
        experts=tuple(keep),
        tokens_per_expert=tuple(v.tokens_per_expert[i] for i in at),
        max_weight=tuple(v.max_weight[i] for i in at) if v.max_weight else (),
    )


def visit_of_ids(
    phase: str,
    step: int,
    layer: int,
    ids_BTK: np.ndarray,
    weights_BTK=None,
    pregate_top_HNK=None,
    context: int = 0,
) -> Visit:
    """The visit of routed ids [B, T, K] (ids < 0: tokens that skip the layer). `weights_BTK` only where
    a policy reads the largest routing weight per expert (HOBBIT)."""
    B, T = ids_BTK.shape[:2]
    flat = ids_BTK.ravel().tolist()  # plain Python on a few dozen ints beats numpy's per-call overhead
    counts = Counter(e for e in flat if e >= 0)
    experts = tuple(sorted(counts))
    maxw: tuple = ()
    if weights_BTK is not None:
        w = np.asarray(weights_BTK)
        maxw = tuple(float(w[ids_BTK == e].max()) for e in experts)
    return Visit(
        phase,
        step,
        layer,
        experts,
        tuple(counts[e] for e in experts),
        maxw,
        B * T,
        context,
        B,
        pregate_top_HNK,
    )


def future_from(trace, L: int) -> list[tuple[int, np.ndarray]]:
    """Visits (moe_layer, needed experts) in the order the engine will see them.

    `trace`: a GenerateResult of the same prompt (its expert_ids per layer [B, T_prompt+T_new-1, K]),
    or a list of per-step lists of per-layer id arrays. Ids < 0 mark tokens that skip a layer (Switch:
    an encoder token the decoder's layers, a decoder token the encoder's); a layer no token of a step
    passes is not visited in that step.
    """
    if hasattr(trace, "expert_ids"):
        ids = trace.expert_ids
        T_p = trace.prompt_len
        steps = [[a[:, :T_p] for a in ids]]
        steps += [[a[:, t] for a in ids] for t in range(T_p, ids[0].shape[1])]
    else:
        steps = trace
    visits = []
    for step in steps:
        for m in range(L):
            used = np.unique(np.asarray(step[m]))
            used = used[used >= 0]
            if len(used):
                visits.append((m, used))
    return visits
