"""Prefetch: the policy's candidates for the layers ahead, each through the cost-benefit gate.

Functions over a `DecisionCore` (its state and its clock); the sources are the policy's prefetch
field: the oracle (future known), pre-gating (later routers on this layer's input), MoE-Infinity's
activation matrices, or a `Predictor` (learned, live or replayed from stored predictions).
"""

from __future__ import annotations

from moecxl.runtime.gate import copy_alone_s, prefetch_gate
from moecxl.runtime.mechanism import CoreError
from moecxl.runtime.policies import eam_probs, pregate_vote_probs, topk_candidates

UNMEASURED_LAYER_FRACTION = 0.1  # until a layer's compute is known, it counts as this share of a copy
# (so the gate declines: a prefetch looks no better than the demand fetch it would replace)


def predictor_name(policy, predictor) -> str | None:
    if predictor is not None:
        return f"learned ({getattr(predictor, 'path', None) or type(predictor).__name__})"
    return policy.prefetch


def candidates(core, v, features) -> list | None:
    """((layer, expert), p) for the layers the policy looks ahead to, best first (None: nothing)."""
    pol, m = core.policy, v.layer
    pf = pol.prefetch
    if pf == "predictor" and hasattr(core.predictor, "observe_visit"):  # history at every layer, the last too
        core.predictor.observe_visit(v, features)
    layers = [m + h for h in range(1, pol.horizon + 1) if m + h < core.L]
    if pf == "oracle":
        nxt = core.future[core.pos : core.pos + pol.horizon]
        return [((layer, int(e)), 1.0) for layer, experts in nxt for e in experts]
    if v.phase == "prefill" and layers and v.n_tokens * core.K >= core.E:
        # Prefill streams whole layers ahead: with at least E token-slots every expert is likely.
        return [((layers[0], e), 1.0) for e in range(core.E)]
    if not layers:
        return None
    if pf == "pregate":
        top_HNK = v.pregate_top_HNK
        if top_HNK is None:
            raise CoreError(
                f"policy {pol.name!r} pre-gates {pol.horizon} layer(s) ahead but visit of layer {m} carries no "
                "pregate predictions (`Visit.pregate_top_HNK`; build traces with moecxl.sim.predict)"
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
    if pf == "eam":
        probs = eam_probs(core.eam_current, core.eam_library, layers, core.K)
        return topk_candidates(probs, layers, core.K)
    if pf == "predictor" and core.predictor is not None:
        return core.predictor.candidates(v, layers, features)
    return None


def prefetch(core, v, protect, features=None) -> None:
    """Issue the candidates that pass the gate, best first, while staging has room."""
    if core.policy.prefetch is None or core.policy.horizon <= 0:
        return
    cands = candidates(core, v, features)
    if cands is None:
        return
    core.set_probs({k: p for k, p in cands})
    for key, p in cands:
        if key in core.slot_of or key in core.inflight:
            continue
        if len(core.inflight) >= core.max_inflight:
            break
        if core.policy.gate and not gate(core, key, p, v.layer):
            core.c.gated += 1
            continue
        try:
            core.fetch(key, protect | {c[0] for c in cands if c[1] >= p}, prefetched=True)
        except CoreError:
            break


def gate(core, key, p: float, m: int) -> bool:
    """`gate.prefetch_gate` for one candidate, with the run's clock, counts and victim."""
    plan = core.plan(key)
    nbytes = core.clock_bytes
    chunks = core.store.stripe_of(key).scaled_bytes(nbytes) if plan.striped else (nbytes,)
    one = copy_alone_s(core.clock, plan.tiers, chunks)  # the planned path, as wait_s
    layer_s = core.mech.layer_s(core.phase) or one * UNMEASURED_LAYER_FRACTION
    victim_p = 0.0
    if not core.free_slots:
        # The victim changes only when a copy is issued or lands: scan once per such change.
        if core._gate_victim[0] != core.epoch:
            core._gate_victim = (core.epoch, core.victim(core.inflight.keys()))
        victim = core._gate_victim[1]
        victim_p = core.probs.get(victim, 0.0) if victim is not None else 0.0
    hits, misses = core.c.lookups
    host_s, credit = None, 0.0
    if core.policy.host_compute:
        host_s = core.host_time_s(key, 1, core.mech.now_s(), 0.0)
        if not core.policy.host_only:
            credit = core.reuse_credit(key, host_s)[0]
    return prefetch_gate(
        p,
        key[0] - m,
        layer_s,
        plan.expected_s,
        one,
        misses,
        hits,
        victim_p,
        uses_per_visit=(hits + misses) / max(1, core.tick),
        host_s=host_s,
        host_served=core.c.miss_choices["host"],
        reuse_credit_s=credit,
        can_fetch=not core.policy.host_only,
    )
