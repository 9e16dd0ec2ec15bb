"""The simulator charges the engine's measured control-plane time per visit (moecxl.sim.control).

On a fixed-compute trace with a policy that never overlaps a copy with anything (on-demand), charging
c seconds per visit raises TPOT by exactly L x c; hit and miss layers are charged their own figures;
after-dispatch time counts only beyond the visit's compute; batch sizes between the measured ones
interpolate in log2; the shipped control file covers every policy the experiments run; bad files
name the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from moecxl.memory import Hardware
from moecxl.runtime.policies import POLICIES
from moecxl.sim.control import ControlCosts, ControlError
from moecxl.sim.costmodel import load_shape
from moecxl.sim.experiments import MISS_VARIANTS
from moecxl.sim.simulate import SimConfig, SimError, simulate
from moecxl.sim.workload import requests_from_arrays

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "control" / "cpu-2core.yaml"  # experiments' default (moecxl.sim.experiments)
SOURCE = {"bench": "test", "machine": "test", "date": "2025-01-01"}
COMPUTE_S, HEAD_S = 1e-4, 5e-5


def _costs(hit_us, miss_us, after_us=0.0, policy="on_demand", batches=(1,)) -> ControlCosts:
    cells = {b: {"hit_us": hit_us, "miss_us": miss_us, "after_us": after_us} for b in batches}
    return ControlCosts.from_dict({"idealised": False, "source": SOURCE, "policies": {policy: cells}})


@pytest.fixture(scope="module")
def workload():
    """Eight-expert, top-2 routing over 32 layers (Mixtral's topology): 3 requests of 1 sequence."""
    shape = load_shape("configs/models/mixtral-8x7b.yaml")
    rng = np.random.default_rng(0)
    seqs, prompt, decode = 3, 4, 6
    rows = seqs * (prompt + decode)
    first = rng.integers(0, 8, (rows, shape.L))
    second = (first + rng.integers(1, 8, (rows, shape.L))) % 8  # two distinct experts per token
    ids = np.stack([first, second], -1).astype(np.int32)
    seq = np.repeat(np.arange(seqs), prompt + decode)
    dec = np.tile(np.arange(prompt + decode) >= prompt, seqs)
    return shape, requests_from_arrays(ids, seq, dec, batch=1)


def _run(workload, control=None, policy="on_demand", events=False):
    shape, reqs = workload
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    cfg = SimConfig(
        policy=policy,
        device_budget=0.3,
        compute_s=COMPUTE_S,
        head_s=HEAD_S,
        warmup_requests=1,
        control=control,
        record_events=events,
    )
    return simulate(reqs, shape, hw, cfg)


def test_charging_control_raises_tpot_by_exactly_the_charge_per_decode_visit(workload):
    shape, _ = workload
    base = _run(workload).metrics
    assert base["control_s"] == 0 and base["control"]["idealised"]
    m = _run(workload, _costs(200.0, 200.0)).metrics
    assert m["tpot_s"] - base["tpot_s"] == pytest.approx(shape.L * 200e-6, rel=1e-9)
    assert m["control_tpot_s"] == pytest.approx(shape.L * 200e-6, rel=1e-9)
    assert m["control_share_of_tpot"] == pytest.approx(m["control_tpot_s"] / m["tpot_s"])
    assert m["misses"] == base["misses"] and m["control"]["source"] == SOURCE
    # idealised, stated: the same as nothing
    ideal = _run(workload, ControlCosts.load("idealised")).metrics
    assert ideal["tpot_s"] == base["tpot_s"] and ideal["control"]["idealised"]


def _visits(events, warmup: int = 1) -> tuple[set, set]:
    """(visits, visits with a miss) of the measured requests, from the action log: every visit of an
    on-demand run hits or fetches, and it fetches only on a miss."""
    req, prev_phase, visits, missed = -1, "decode", set(), set()
    for e in events:
        if e["phase"] == "prefill" and prev_phase == "decode":
            req += 1  # a new request starts with its prefill
        prev_phase = e["phase"]
        if req >= warmup and e["kind"] in ("hit", "fetch"):
            at = (req, e["phase"], e["step"], e["layer"])
            visits.add(at)
            if e["kind"] == "fetch":
                missed.add(at)
    return visits, missed


def test_hit_and_miss_layers_are_charged_their_own_figures(workload):
    base = _run(workload, events=True)
    visits, missed = _visits(base.events)
    assert 0 < len(missed) < len(visits)
    m = _run(workload, _costs(10.0, 300.0), events=True)
    assert _visits(m.events) == (visits, missed)  # charging time changes no decision of on-demand
    want = 10e-6 * (len(visits) - len(missed)) + 300e-6 * len(missed)
    assert m.metrics["control_s"] == pytest.approx(want, rel=1e-9)
    decode = [v for v in visits if v[1] == "decode"]
    decode_missed = [v for v in missed if v[1] == "decode"]
    per_step = (10e-6 * (len(decode) - len(decode_missed)) + 300e-6 * len(decode_missed)) / len(
        m.step_times_s
    )
    assert m.metrics["tpot_s"] - base.metrics["tpot_s"] == pytest.approx(per_step, rel=1e-9)


def test_after_dispatch_time_counts_only_beyond_the_visits_compute():
    c = _costs(20.0, 500.0, after_us=300.0)
    assert c.visit_s("on_demand", 1, False, compute_s=100e-6) == pytest.approx(20e-6 + 200e-6)
    assert c.visit_s("on_demand", 1, True, compute_s=400e-6) == pytest.approx(500e-6)


def test_batch_sizes_interpolate_in_log2_and_hold_outside_the_measured_range():
    c = ControlCosts.from_dict(
        {
            "idealised": False,
            "source": SOURCE,
            "policies": {
                "lru": {
                    1: {"hit_us": 10, "miss_us": 100, "after_us": 0},
                    16: {"hit_us": 50, "miss_us": 900, "after_us": 40},
                }
            },
        }
    )
    assert c.cell_us("lru", 4) == pytest.approx((30, 500, 20))  # log2: 4 is half way from 1 to 16
    assert c.cell_us("lru", 2) == pytest.approx((20, 300, 10))
    assert c.cell_us("lru", 64) == pytest.approx((50, 900, 40))  # a 64-token prefill: the largest measured
    assert c.visit_s("lru", 16, True, 0.0) == pytest.approx(940e-6)


def _experiment_policies() -> set[str]:
    """Every policy the paper-scale experiments run (configs/experiments/*.yaml), the learned row and
    the ablation's variant included."""
    names = {"moecxl_learned", "moecxl-no-prefetch"} | {v.partition("@")[0] for v in MISS_VARIANTS.values()}
    for f in (REPO / "configs" / "experiments").glob("*.yaml"):
        exp = yaml.safe_load(f.read_text())
        names.update(exp.get("policies", []))
        for sec in exp.values():
            if isinstance(sec, dict):
                names.update(p for _, p in sec.get("runs", []))
                names.update(sec.get("policies", []) if isinstance(sec.get("policies"), list) else [])
    return names


def test_the_shipped_control_file_covers_every_experiment_policy_and_names_its_source():
    c = ControlCosts.load(SHIPPED)
    assert not c.idealised and {"bench", "machine", "date"} <= set(c.source)
    assert (REPO / c.source["bench"]).is_file()
    used = _experiment_policies()
    assert {"on_demand", "oracle", "moecxl", "moecxl_nd", "moecxl_learned"} <= used
    for p in used:
        hit_us, miss_us, after_us = c.cell_us(p, 1)
        assert hit_us > 0 and miss_us > 0 and after_us >= 0, p
        if p not in POLICIES or not POLICIES[p].host_only:  # a fetch costs more than a hit
            assert hit_us < miss_us, p
        assert {1, 16} <= {row[0] for row in c.table[c.same_as.get(p, p)]}, p


def test_every_registered_policy_is_measured_or_mapped_with_a_reason():
    """The shipped file charges every policy the runtime registers: measured, or `same_as` a measured one
    with why in the file (a policy added without either fails here, not mid-way through an experiment)."""
    c = ControlCosts.load(SHIPPED)
    for p in POLICIES:
        c.check(p)
        assert p in c.table or c.same_as_why.get(p), f"{p}: same_as without a stated why"
        hit_us, miss_us, _ = c.cell_us(p, 1)
        assert hit_us > 0 and miss_us > 0, p
    assert set(c.same_as) & set(c.table) == set()  # a measured policy is not mapped as well
    with pytest.raises(ControlError, match=r"same_as.x must be \{as: POLICY, why: TEXT\}"):
        ControlCosts.from_dict(
            {
                "idealised": False,
                "source": SOURCE,
                "policies": {"lru": {1: {"hit_us": 1, "miss_us": 2, "after_us": 0}}},
                "same_as": {"x": {"as": "lru", "why": " "}},
            }
        )


def test_bad_control_files_and_unmeasured_policies_name_the_key(workload, tmp_path):
    with pytest.raises(ControlError, match="key 'source' must name the bench file, machine and date"):
        ControlCosts.from_dict({"idealised": False, "policies": {"lru": {1: {}}}}, "x.yaml")
    with pytest.raises(ControlError, match="key 'idealised' must be true or false, got None"):
        ControlCosts.from_dict({"source": SOURCE}, "x.yaml")
    with pytest.raises(ControlError, match=r"policies.lru.1 must be a batch size with numbers"):
        ControlCosts.from_dict(
            {"idealised": False, "source": SOURCE, "policies": {"lru": {1: {"hit_us": 1}}}}
        )
    with pytest.raises(ControlError, match="same_as.x names 'y', which is not measured"):
        ControlCosts.from_dict(
            {
                "idealised": False,
                "source": SOURCE,
                "policies": {"lru": {1: {"hit_us": 1, "miss_us": 2, "after_us": 0}}},
                "same_as": {"x": "y"},
            }
        )
    f = tmp_path / "c.yaml"
    f.write_text("idealised: maybe\n")
    with pytest.raises(ControlError, match=f"{f}: key 'idealised' must be true or false, got 'maybe'"):
        ControlCosts.load(f)
    with pytest.raises(
        ControlError, match="no control-plane figures for policy 'lru'; measured: \\['on_demand'\\]"
    ):
        _run(workload, _costs(1.0, 2.0), policy="lru")
    assert issubclass(ControlError, ValueError) and SimError
