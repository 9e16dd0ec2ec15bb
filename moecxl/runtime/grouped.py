"""A layer that needs more distinct experts than the device cache holds, processed in groups.

A long prompt (or a large batch) can route one layer's tokens to more experts than a small budget holds.
mixtral-offloading and MoE-Infinity then compute what is resident, evict, fetch the rest and compute it;
so does the engine: `DecisionCore.groups` splits the visit (resident experts first), each group is made
resident and its experts' per-expert outputs are computed into one buffer, and the last group's step
combines them all at once, as the resident step does, so exact policies stay bit-identical.
"""

from __future__ import annotations

import numpy as np

from moecxl.runtime.slots import _group_jit


def visit_in_groups(engine, groups, whole, co) -> np.ndarray:
    """Visit `groups` (sub-visits of `whole`) one after the other, computing every group but the last
    on the device as it lands; returns the last group's expert -> slot map and leaves the partial outputs
    for `experts_fn` (`engine._group`)."""
    core, E = engine.core, engine.core.E
    acc, host_E = None, np.zeros(E, bool)
    for g in groups[:-1]:
        slot_E = core.visit(g, co, last=False).copy()  # the core's live map: the next group changes it
        if engine._landed:
            engine._flush()
        host_E[[e for e in g.experts if slot_E[e] < 0]] = True
        ins, out = engine._cache[: engine.n_ins], engine._cache[engine.n_ins]
        member_E = _members(g, slot_E, E)
        acc = _group_jit(
            None, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E, member_E, acc, None,
            dtype=engine.compute_dtype, last=False, fmt=engine.fmt,
        )  # fmt: skip
        engine._last_step = acc  # installs for the next group wait for this group's step
    last = groups[-1]
    slot_E = core.visit(last, co, last=True, whole=whole)
    host_E[[e for e in last.experts if slot_E[e] < 0]] = True
    slot_E = slot_E.copy()
    slot_E[host_E] = -1  # experts computed on the host in any group: masked in the combine
    engine._group = (acc, _members(last, slot_E, E))
    return slot_E


def _members(g, slot_E, E: int) -> np.ndarray:
    """[E] bool: the group's experts that are on the device (computed by this group's step)."""
    member_E = np.zeros(E, bool)
    member_E[[e for e in g.experts if slot_E[e] >= 0]] = True
    return member_E


def grouped_step(engine, h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, extra_BTD):
    """The last group's step: its experts, then the one combine over every group's outputs."""
    acc, member_E = engine._group
    engine._group = None
    return _group_jit(
        h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, member_E, acc, extra_BTD,
        dtype=engine.compute_dtype, last=True, fmt=engine.fmt,
    )  # fmt: skip
