"""Eval logic on a tiny model: perplexity identical for exact policies, a finite delta for hobbit; the
latency result schema; the report from synthetic results; clear errors for bad result files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moecxl.evaluation import latency, perplexity, report
from moecxl.evaluation.inputs import EvalError, resolve_profile, run_cli
from moecxl.evaluation.results import ResultError, envelope, read_result, validate, write_result
from moecxl.runtime.engine import OffloadEngine


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model  # conftest: 2 layers x 5 experts, top-2


def test_perplexity_exact_policies_identical_hobbit_delta(model):
    seqs = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (2, 9))

    def make_engine(policy, trace):
        # A high HOBBIT threshold makes most misses low precision, so its delta is visible.
        return OffloadEngine(
            model,
            policy=policy,
            device_budget=0.8,
            lowp_threshold=0.9,
            trace=trace if policy == "oracle" else None,
        )

    rows = perplexity.evaluate(
        model, seqs, ["lru", "oracle", "hobbit"], make_engine=make_engine, batch_size=2
    )
    by = {r["policy"]: r for r in rows}
    for p in ("lru", "oracle"):
        assert by[p]["bit_identical"] and by[p]["ppl_delta"] == 0.0 and by[p]["exact"]
    assert not by["hobbit"]["exact"] and math.isfinite(by["hobbit"]["ppl_delta"])
    assert by["hobbit"]["max_abs_logit_diff"] > 0  # int8 copies changed the numbers, slightly
    assert abs(by["hobbit"]["ppl_rel_delta"]) < 0.05
    assert perplexity.exactness_violations(rows) == []
    assert "hobbit" in perplexity.format_table(rows)


def test_inexact_policies_use_their_approximation_in_decode_mode(model):
    """Every inexact policy, scored one token per step as the main job scores them (its profile; a budget
    the tiny model admits), reports using its approximation; a row that used none says so in the table."""
    from moecxl.runtime.policies import POLICIES

    inexact = [name for name, spec in POLICIES.items() if not spec.exact]
    assert {"hobbit", "fiddler", "moecxl_host", "moecxl_nd"} <= set(inexact)
    hw = resolve_profile("h100-cxl")
    seqs = np.random.default_rng(2).integers(3, model.cfg.vocab_size, (2, 17))

    def make_engine(policy, trace):
        # The untrained router splits a token's top-2 weight almost evenly: HOBBIT's threshold just under
        # one half makes its lower-weighted misses low-precision, as the trained model's 0.3 does for some.
        return OffloadEngine(
            model, hardware=hw, policy=policy, device_budget=0.5, emulate=False, lowp_threshold=0.49
        )

    rows = perplexity.evaluate(model, seqs, inexact, make_engine=make_engine, batch_size=2)
    assert perplexity.unused_approximations(rows) == []
    for r in rows[1:]:
        assert 0 < r["approximate_uses"] <= r["expert_uses"], r
        assert not r["bit_identical"], r["policy"]
    unused = {**rows[1], "approximate_uses": 0, "int8_copies": 0, "host_computed_uses": 0}
    assert "approximation unused" in perplexity.format_table([unused])
    assert perplexity.unused_approximations([unused])


def test_teacher_forced_matches_full_forward(model):
    """Slow reference: the model's own full-sequence forward gives the same logits (to float tolerance)."""
    ids = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (2, 7))
    dec, _ = perplexity.teacher_forced(model, ids, mode="decode")
    pre, _ = perplexity.teacher_forced(model, ids, mode="prefill")
    ref = np.asarray(model(ids).logits)
    np.testing.assert_allclose(dec, ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(pre, ref, atol=2e-4, rtol=2e-4)
    nll = perplexity.token_nll(ref[:, :-1], ids[:, 1:])
    assert nll.shape == (2, 6) and np.isfinite(nll).all()


def test_latency_result_schema(model, tmp_path):
    sw = latency.Sweep(
        profiles=("h100-cxl",),
        policies=("lru",),
        budgets=(0.9, 0.01),
        batches=(1,),
        prompt_lens=(4,),
        new_tokens=2,
        repeats=2,
    )
    doc = latency.run(None, sw, model=model, progress=None)
    path = write_result(tmp_path / "lat.json", doc)
    back = read_result(path, "latency")
    rows = {(r["policy"], r.get("budget")): r for r in back["rows"]}
    res, ok, small = rows["resident", 1.0], rows["lru", 0.9], rows["lru", 0.01]
    assert res["timing"] == "measured-cpu" and ok["timing"] == "emulated"
    assert "device_budget" in small["skipped"]  # too small for one layer's top-k: says why
    for name in ("ttft_s", "tpot_s", "tokens_per_s", "hit_rate", "stall_s"):
        q25, q75 = ok[f"{name}_iqr"]
        assert q25 <= ok[name] <= q75
    assert len(ok["repeats"]["tpot_s"]) == 2 and ok["bit_identical_to_resident"]
    assert len(ok["hit_rate_by_layer"]) == model.cfg.num_moe_layers and sum(ok["bytes_by_tier"].values()) > 0
    assert back["schema_version"] == 1 and back["config"]["repeats"] == 2


def _perf_row(profile, policy, budget, timing, tpot_s, batch=1, **kw):
    return {
        "profile": profile,
        "policy": policy,
        "budget": budget,
        "batch": batch,
        "prompt_len": 16,
        "timing": timing,
        "ttft_s": 10 * tpot_s,
        "tpot_s": tpot_s,
        "tpot_s_iqr": [0.9 * tpot_s, 1.1 * tpot_s],
        "tokens_per_s": batch / tpot_s,
        "hit_rate": 0.5,
        "stall_s": tpot_s / 2,
        "prefetch_precision": 0.8 if policy == "moecxl" else None,
        "hit_rate_by_layer": [0.4, 0.6],
        "bytes_by_tier": {"cxl-d" if "cxl" in profile else "dram": 1 << 20},
        **kw,
    }


def _synthetic(root):
    rows = []
    for timing, scale in (("emulated", 1.0), ("simulated", 0.01)):
        for profile, base in (("h100-cxl", 1.0), ("h100-pcie4-dram", 2.0)):
            for budget in (0.25, 0.5):
                for pol, f in (("lru", 1.0), ("moecxl", 0.6)):
                    rows.append(_perf_row(profile, pol, budget, timing, scale * base * f / budget))
    lat = [r for r in rows if r["timing"] == "emulated"] + [
        _perf_row("resident", "resident", 1.0, "measured-cpu", 0.01)
    ]
    sim = [r for r in rows if r["timing"] == "simulated"]
    write_result(root / "latency.json", envelope("latency", lat, model={"name": "tiny"}))
    write_result(
        root / "sim" / "simulation.json", envelope("simulation", sim, model={"name": "mixtral-8x7b"})
    )
    ppl = [
        {"policy": "resident", "exact": True, "perplexity": 10.0, "nll": math.log(10), "tokens": 64},
        {
            "policy": "lru",
            "exact": True,
            "perplexity": 10.0,
            "nll": math.log(10),
            "tokens": 64,
            "bit_identical": True,
            "ppl_delta": 0.0,
            "ppl_rel_delta": 0.0,
            "max_abs_logit_diff": 0.0,
        },
        {
            "policy": "hobbit",
            "exact": False,
            "perplexity": 10.05,
            "nll": math.log(10.05),
            "tokens": 64,
            "bit_identical": False,
            "ppl_delta": 0.05,
            "ppl_rel_delta": 0.005,
            "max_abs_logit_diff": 0.01,
        },
    ]
    write_result(root / "ppl.json", envelope("perplexity", ppl, config={"corpus": "mixed", "split": "test"}))
    pred = root / "predictor" / "metrics.json"
    pred.parent.mkdir()
    summary = {
        n: {str(h): {"exact": a / h, "recall@k": 0.9 / h**0.5} for h in (1, 2, 4)}
        for n, a in (("learned", 0.9), ("pregate", 0.7))
    }
    pred.write_text(json.dumps({"summary": summary, "model": {"id": "tiny"}}))


def test_report_from_synthetic_results(tmp_path):
    _synthetic(tmp_path / "results")
    md_path = report.build(tmp_path / "results", tmp_path / "report")
    md = md_path.read_text()
    for png in report.PLOTS:
        assert (tmp_path / "report" / png).stat().st_size > 1000, png
        assert f"]({png})" in md
    cmp = report.paper_comparison(report.collect(tmp_path / "results"))
    tpot = {r["label"]: r["ours"] for r in cmp if r["claim"].startswith("TPOT")}
    # lru on DRAM is 2x slower per token, moecxl 0.6x of lru: 2 / 0.6 = 3.33x, at both timing labels.
    assert tpot == {"emulated": "3.33x", "simulated": "3.33x"}
    assert any(r["ours"] == "+0.50%" and "hobbit" in r["how"] for r in cmp)
    assert any(r["ours"] == "90%" and "learned" in r["how"] for r in cmp)
    assert "| Speedup for 16K+ token sequences | up to 4.2x | not measured |" in md
    with pytest.raises(EvalError, match="baseline profile 'nope'.*h100-cxl"):
        report.paper_comparison(
            report.collect(tmp_path / "results"), report.Comparison(baseline_profile="nope")
        )


def test_simulated_latency_lists_each_run_once(tmp_path):
    """A simulation's headline run, listed again as its batch sweep's batch-1 point, is one table line;
    two experiments' runs of one configuration are told apart by their source file."""
    row = _perf_row("h100-cxl", "lru", 0.25, "simulated", 0.5)
    for name in ("a", "b"):
        write_result(
            tmp_path / "res" / name / "results.json",
            envelope("simulation", [row, dict(row)], model={"name": "mixtral-8x7b"}),
        )
    res = report.collect(tmp_path / "res")
    assert len(res.perf_rows()) == 2
    lines = report.perf_table(res.perf_rows()).splitlines()[2:]
    assert len(lines) == 2 and len(set(lines)) == 2
    assert lines[0].startswith("| a |") and lines[1].startswith("| b |")
    one = [r for r in res.perf_rows() if r["_path"].endswith("a/results.json")]
    assert report.perf_table(one).splitlines()[0].startswith("| model |")


def test_bad_result_files(tmp_path):
    good = envelope("latency", [_perf_row("h100-cxl", "lru", 0.5, "emulated", 0.1)])
    with pytest.raises(ResultError, match="nothere.json: no such result file"):
        read_result(tmp_path / "nothere.json")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**good, "schema_version": 0}))
    with pytest.raises(
        ResultError, match=r"old.json: field 'schema_version' is 0; this moecxl reads version 1"
    ):
        read_result(old)
    with pytest.raises(ResultError, match="field 'kind' is 'bogus'"):
        validate({**good, "kind": "bogus"}, "x.json")
    bad_row = {k: v for k, v in good["rows"][0].items() if k != "tpot_s"}
    with pytest.raises(ResultError, match=r"x.json: rows\[0\] is missing field 'tpot_s'"):
        validate({**good, "rows": [bad_row]}, "x.json")
    with pytest.raises(ResultError, match=r"rows\[0\].timing is 'guessed'"):
        validate({**good, "rows": [{**good["rows"][0], "timing": "guessed"}]}, "x.json")
    with pytest.raises(ResultError, match="latency.json: field 'kind' is 'latency', expected 'perplexity'"):
        read_result(write_result(tmp_path / "latency.json", good), "perplexity")
    (tmp_path / "r").mkdir()
    old.rename(tmp_path / "r" / "old.json")
    with pytest.raises(ResultError, match="old.json: field 'schema_version'"):
        report.build(tmp_path / "r", tmp_path / "out")
    with pytest.raises(EvalError, match="unknown hardware profile 'h999'.*h100-cxl"):
        resolve_profile("h999")


def test_entry_errors_name_the_culprit(tmp_path, capsys):
    assert run_cli(perplexity.cli, tmp_path / "o.json", tmp_path / "no-model") == 2
    assert "no-model: no such model directory" in capsys.readouterr().err
    assert run_cli(report.cli, tmp_path / "empty", tmp_path / "out") == 2
    assert "empty: no such results directory" in capsys.readouterr().err
