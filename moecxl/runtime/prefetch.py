"""Prefetch: the policy's candidates for the layers ahead, each admitted by the policy (the
cost-benefit gate, for the policies that have one), issued while staging has room.

Functions over a `DecisionCore` (its state and its clock); where candidates come from is the policy's
prefetch source (`policies/sources.py`).
"""

from __future__ import annotations

from moecxl.runtime.gate import copy_alone_s, prefetch_gate
from moecxl.runtime.mechanism import CoreError

UNMEASURED_LAYER_FRACTION = 0.1  # until a layer's compute is known, it counts as this share of a copy
# (so the gate declines: a prefetch looks no better than the demand fetch it would replace)


def predictor_name(policy, predictor) -> str | None:
    if predictor is not None:
        return f"learned ({getattr(predictor, 'path', None) or type(predictor).__name__})"
    return None if policy.prefetch is None else str(policy.prefetch)


def prefetch(core, v, protect, features=None) -> None:
    """Issue the candidates that pass the gate, best first, while staging has room."""
    if core.policy.prefetch is None or core.policy.horizon <= 0:
        return
    cands = core.policy.candidates(core, v, features)
    if cands is None:
        return
    core.set_probs({k: p for k, p in cands})
    for key, p in cands:
        if key in core.slot_of or key in core.inflight:
            continue
        if len(core.inflight) >= core.max_inflight:
            break
        if not core.policy.admit(core, key, p, v.layer):
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
        tag = (core.epoch, core.victim_scope(key))
        if core._gate_victim[0] != tag:
            core._gate_victim = (tag, core.victim(core.inflight.keys(), incoming=key))
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
