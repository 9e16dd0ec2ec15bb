"""The published systems behave as their code does, in the simulator (the engine runs the same policies:
tests/test_lockstep.py, and the exact ones bit-identically: tests/test_engine.py)."""

from __future__ import annotations

import pytest

from moecxl.sim import reproduce as R
from moecxl.sim.systems import SYSTEMS, SystemsError, resolve_args, system_of
from tests.test_reproduce import E, L, case_file, world  # noqa: F401  (world is a fixture)


def _run(world, system, args=None, **changes):  # noqa: F811
    p = case_file(world, f"sys-{system}", system=system, system_args=args or {}, **changes)
    case = R.load_case(p)
    return R.run_one(case, system, case.system_args, R._Traces(False))


def test_every_system_has_a_registered_policy():
    from moecxl.runtime.policies import POLICIES

    for s in SYSTEMS.values():
        assert s.policy in POLICIES, s.name


def test_accelerate_copies_whole_layers(world):  # noqa: F811
    m = _run(world, "accelerate", {"resident_layers": 0})
    # every visit copies all E experts of its layer: no hit ever, E experts per visit moved
    assert m["hit_rate"] == 0.0
    assert m["misses"] == E * (m["hits"] + m["misses"]) // E
    auto = _run(world, "accelerate", {"expert_slots": 3 * E})  # room for 2 resident layers + 1 streamed
    assert auto["hit_rate"] == pytest.approx(2 / L, abs=0.02)


def test_mixtral_offloading_keeps_k_per_layer(world):  # noqa: F811
    none = _run(world, "mixtral_offloading", {"experts_per_layer": 0})
    k2 = _run(world, "mixtral_offloading", {"experts_per_layer": 2})
    k4 = _run(world, "mixtral_offloading", {"experts_per_layer": 4})
    assert none["hit_rate"] == 0.0 < k2["hit_rate"] < k4["hit_rate"]
    assert k4["device_slots"] == 4 * L
    from dataclasses import replace

    from moecxl.runtime.policies import get_policy

    spec = replace(get_policy("mixtral_offloading"), experts_per_layer=2, speculative=True)
    assert spec.needs_pregate and spec.horizon == 1 and spec.victim_per_layer  # replayed pre-gate, 1 ahead


def test_streaming_systems_keep_nothing(world):  # noqa: F811
    ds = _run(world, "deepspeed_zero")
    assert ds["hit_rate"] == 0.0 and ds["device_slots"] == E


def test_gpu_only_never_misses_after_warm_up(world):  # noqa: F811
    m = _run(world, "gpu_only")
    assert m["misses"] == 0 and m["stall_s"] == 0.0


def test_pregated_has_the_next_layer_ready(world):  # noqa: F811
    pre = _run(world, "pregated")
    od = _run(world, "moe_ondemand")
    assert pre["prefetch_used"] > 0 and pre["tpot_s"] < od["tpot_s"]


def test_prefetch_all_moves_whole_layers(world):  # noqa: F811
    pa = _run(world, "prefetch_all")
    pre = _run(world, "pregated")
    assert pa["prefetch_issued"] > 2 * pre["prefetch_issued"]


def test_system_arguments_are_checked():
    with pytest.raises(SystemsError, match="no argument"):
        resolve_args(system_of("deepspeed_zero"), {"experts_per_layer": 2})
    with pytest.raises(SystemsError, match="pinned must be"):
        resolve_args(system_of("accelerate"), {"pinned": "yes"})
    with pytest.raises(SystemsError, match="unknown system"):
        system_of("vllm")
