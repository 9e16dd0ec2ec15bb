"""A policy written outside the package plugs in without editing any module: by object, by
`register`, or by an installed entry point; an object that is not a policy is refused by name."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from moecxl.runtime.engine import EngineError, OffloadEngine
from moecxl.runtime.policies import (
    POLICIES,
    EvictionRule,
    Policy,
    PolicyError,
    get_policy,
    register,
)
from moecxl.sim.costmodel import shape_of
from moecxl.sim.simulate import SimConfig, SimError, simulate
from tests import test_lockstep as lockstep
from tests.test_lockstep import _actions, _profile, _run

tiny = lockstep.tiny  # the lock-step test's fixture: a tiny model, its routing and pre-gate traces


class MostRecentlyUsed(EvictionRule):
    """The custom rule: evict the most recently used expert (good for a cyclic scan, bad otherwise)."""

    name = "mru"

    def score(self, key, stats, **_):
        return (-stats.last_use, -stats.loaded_at)


MRU = Policy("mru_test", evict=MostRecentlyUsed(), description="test: most recently used goes first")


@pytest.fixture
def registered():
    register(MRU)
    yield MRU
    POLICIES.pop(MRU.name, None)


def test_a_custom_eviction_rule_runs_in_the_engine_and_the_simulator_in_lockstep(tiny, registered):
    res, eng, sim = _run(tiny, "mru_test", "one-cxl", 0.4, 1)
    got = _actions(eng.events)
    assert got == _actions(sim.events)
    assert any(a[0] == "evict" for a in got)
    # exact: the custom policy's tokens are the resident model's
    model, _, runs = tiny
    prompt, ref, _ = runs[1]
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    # and its rule is the one used: LRU on the same run evicts differently
    _, eng_lru, _ = _run(tiny, "lru", "one-cxl", 0.4, 1)
    evicts = [a for a in got if a[0] == "evict"]
    assert evicts != [a for a in _actions(eng_lru.events) if a[0] == "evict"]


class _RecordedMru(MostRecentlyUsed):
    """The custom rule, remembering what it chose and from what."""

    def __init__(self):
        self.chosen = []

    def victim(self, core, skip, incoming=None, next_use=None):
        key = super().victim(core, skip, incoming, next_use)
        evictable = [k for k in core.slot_of if k not in skip]
        self.chosen.append((key, core.stats[key][0], max(core.stats[k][0] for k in evictable)))
        return key


def test_the_core_evicts_exactly_what_the_custom_rule_chooses(tiny):
    """Every eviction in the engine's action log is the plug-in's choice, in order, and each choice is
    a most recently used evictable expert (the rule's pure score, through the base class's scan)."""
    rule = _RecordedMru()
    pol = register(Policy("mru_recorded", evict=rule))
    try:
        _, eng, _ = _run(tiny, "mru_recorded", "one-cxl", 0.4, 1)
    finally:
        POLICIES.pop(pol.name, None)
    evicted = [(e["layer"], e["expert"]) for e in eng.events if e["kind"] == "evict"]
    assert len(evicted) > 5
    # the simulator's run asked the rule too: the engine's choices are the first half
    assert evicted == [k for k, _, _ in rule.chosen[: len(evicted)]]
    assert all(last == most_recent for _, last, most_recent in rule.chosen)


def test_a_policy_from_an_installed_entry_point_is_found_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(
        textwrap.dedent(
            """
            from moecxl.runtime.policies import Policy
            POLICY = Policy("lfu_from_elsewhere", evict="lfu", description="an installed plug-in")
            """
        )
    )
    dist = tmp_path / "my_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[moecxl.policies]\nlfu_from_elsewhere = my_policies:POLICY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pol = get_policy("lfu_from_elsewhere")
        assert pol.name == "lfu_from_elsewhere" and pol.evict == "lfu"
        assert SimConfig(policy="lfu_from_elsewhere").policy == "lfu_from_elsewhere"
    finally:
        POLICIES.pop("lfu_from_elsewhere", None)


class _NoVictim:
    """Looks like a policy but cannot choose a victim."""

    name = "no_victim"
    horizon, exact, gate = 0, True, False
    host_compute = host_only = low_precision_on_miss = False
    needs_reuse = needs_future = needs_pregate = False

    def cache_slots(self, L, E, n):
        return n

    def demand(self, core, v):
        return v.experts

    def on_visit(self, core, v):
        pass

    def candidates(self, core, v, features):
        return None

    def admit(self, core, key, p, m):
        return True

    def miss(self, core, key, n_tokens, host_queue_s, protect):
        return None

    def with_predictor(self):
        return self


def test_an_object_missing_a_protocol_method_is_refused_naming_it(tiny):
    model, target, runs = tiny
    with pytest.raises(PolicyError, match=r"no_victim.*victim\(\)"):
        OffloadEngine(model, hardware=_profile("one-cxl"), policy=_NoVictim(), device_budget=0.4)
    with pytest.raises((PolicyError, SimError), match=r"victim\(\)"):
        simulate(runs[1][2], shape_of(target), _profile("one-cxl"), SimConfig(policy=_NoVictim()))
    with pytest.raises(PolicyError, match="already registered"):
        register(Policy("lru"))
    with pytest.raises(PolicyError, match="unknown eviction rule 'mru2'"):
        Policy("x", evict="mru2")
    assert EngineError is not None
