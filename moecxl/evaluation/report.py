"""A markdown report with matplotlib plots from result files (`eval/*.py`) and predictor metrics.

Figures: TPOT against device budget per policy, hit rate per MoE layer, bytes per tier, prediction
accuracy per horizon. The paper-comparison table puts each of the seed paper's headline figures beside
ours, computed from our rows and labelled with how they were obtained (measured, emulated, simulated).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from moecxl.evaluation.inputs import EvalError
from moecxl.evaluation.results import SCHEMA_VERSION, ResultError, find_results, read_result, validate

SIM_RESULTS_KIND = "moecxl.sim.results"  # eval/simulate.py's sections document

PLOTS = ("tpot_vs_budget.png", "hit_rate_by_layer.png", "bytes_by_tier.png", "prediction_accuracy.png")


@dataclass
class Results:
    """Everything the report reads, by kind; each document keeps the path it came from (`_path`)."""

    perplexity: list = field(default_factory=list)
    latency: list = field(default_factory=list)
    simulation: list = field(default_factory=list)
    predictor: list = field(default_factory=list)  # predictor metrics.json documents

    def perf_rows(self) -> list[dict]:
        """Latency and simulation rows that carry figures, each tagged with its file and model. A run a
        simulation lists twice (its headline again as the batch sweep's batch-1 point) is kept once."""
        out = []
        for doc in self.latency + self.simulation:
            seen = set()
            for r in doc["rows"]:
                if r.get("skipped"):
                    continue
                run = (_run_key(r), r.get("ttft_s"), r.get("tpot_s"))
                if run in seen:
                    continue
                seen.add(run)
                out.append({**r, "_path": doc["_path"], "_model": doc["model"].get("name", "")})
        return out


def _run_key(r: dict) -> tuple:
    """What tells two performance rows apart in a table (the policy's prefetch source included)."""
    return tuple(
        r.get(k) for k in ("profile", "timing", "budget", "batch", "prompt_len", "policy", "predictor")
    )


def _source(path: str) -> str:
    """A result file's short name in a table: its directory for a `results.json`, else its stem."""
    p = Path(path)
    return p.parent.name if p.name == "results.json" else p.stem


def read_predictor_metrics(path: str | os.PathLike) -> dict:
    """A predictor `metrics.json` (train_predictor.py): needs `summary` {predictor: {horizon: {...}}}."""
    path = Path(path)
    if not path.is_file():
        raise ResultError(f"{path}: no such predictor metrics file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultError(f"{path}: not valid JSON ({e})") from e
    summary = doc.get("summary") if isinstance(doc, dict) else None
    if not isinstance(summary, dict) or not summary:
        raise ResultError(f"{path}: missing field 'summary' (per-predictor accuracy per horizon)")
    for name, per_h in summary.items():
        if not isinstance(per_h, dict):
            raise ResultError(f"{path}: summary.{name} must map horizons to metrics, got {per_h!r}")
    return {**doc, "_path": str(path)}


def _has_summary(path: Path) -> bool:
    try:
        return "summary" in json.loads(path.read_text())
    except (json.JSONDecodeError, TypeError):
        return False


def _kind(path: Path):
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # read_result names the fault
    return doc.get("kind") if isinstance(doc, dict) else None


def _from_experiment(path: Path) -> dict:
    """A paper-scale simulation (eval/simulate.py results.json) as a `simulation` result document."""
    from moecxl.sim.experiments import ExperimentError, load_results, simulation_rows

    try:
        data = load_results(path)
    except ExperimentError as e:
        raise ResultError(str(e)) from e
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "simulation",
        "created": "",
        "machine": {},
        "model": {"name": data["target"]["name"], "trace": data["trace"]["path"]},
        "config": data["experiment"]["config"],
        "rows": simulation_rows(data),
    }
    validate(doc, str(path))
    return {**doc, "_path": str(path), "_experiment": data}


def collect(results_dir, predictor_metrics=()) -> Results:
    """Read every result file under `results_dir` (and predictor `metrics.json` files there or given)."""
    res = Results()
    for p in find_results(results_dir):
        if _kind(p) == SIM_RESULTS_KIND:
            res.simulation.append(_from_experiment(p))
            continue
        doc = read_result(p)
        getattr(res, doc["kind"]).append({**doc, "_path": str(p)})
    for p in sorted(Path(results_dir).rglob("metrics.json")):
        if _has_summary(p):  # a predictor's; other metrics.json files (a checkpoint's) are not results
            res.predictor.append(read_predictor_metrics(p))
    for p in predictor_metrics:
        res.predictor.append(read_predictor_metrics(p))
    if not (res.perplexity or res.latency or res.simulation or res.predictor):
        raise ResultError(
            f"{results_dir}: no result files (*.json from eval/perplexity.py, latency.py, simulate.py)"
        )
    return res


# ---- paper comparison ---------------------------------------------------------------------------------

# The seed paper's headline figures (MoE-CXL, section 6), what each compares, and how we compute ours.
PAPER_CLAIMS = (
    ("ttft_speedup", "TTFT speedup over CPU offloading (Mixtral-8x7B)", "2.3x"),
    ("tpot_speedup", "TPOT improvement over CPU offloading", "1.8x"),
    ("throughput_gain", "Tokens/s over offloading baselines, batched", "up to 3.1x"),
    ("long_context", "Speedup for 16K+ token sequences", "up to 4.2x"),
    ("prefetch_accuracy", "Prefetch accuracy", "85%"),
    ("miss_penalty", "Cache-miss penalty (stall) reduction", "67%"),
    ("ppl_increase", "Perplexity increase vs resident", "< 1%"),
    ("bit_exact", "Bit-exact results with offloading", "claimed"),
)


@dataclass(frozen=True)
class Comparison:
    """Which rows stand for 'CPU offloading' and which for 'ours' in the paper comparison."""

    baseline_policy: str = "lru"
    ours_policy: str = "moecxl"
    baseline_profile: str | None = None  # default: the first profile whose name contains "dram"
    ours_profile: str | None = None  # default: the first profile whose name contains "cxl"


def _pick_profile(rows, wanted, needle, what) -> str | None:
    profiles = sorted({r["profile"] for r in rows if r["profile"] != "resident"})
    if wanted is not None:
        if wanted not in profiles:
            raise EvalError(
                f"{what} profile {wanted!r}: no latency or simulation row has it; profiles in the results: "
                f"{', '.join(profiles) or 'none'}"
            )
        return wanted
    return next((p for p in profiles if needle in p), None)


def _point(rows, profile, policy, timing, **match):
    cands = [
        r
        for r in rows
        if r["profile"] == profile
        and r["policy"] == policy
        and r["timing"] == timing
        and all(r.get(k) == v for k, v in match.items())
    ]
    return cands[0] if cands else None


def paper_comparison(res: Results, cmp: Comparison = Comparison()) -> list[dict]:
    """Rows {claim, seed, ours, label, how}: one per claim and per timing label we have figures for."""
    rows = res.perf_rows()
    base_p = _pick_profile(rows, cmp.baseline_profile, "dram", "baseline")
    ours_p = _pick_profile(rows, cmp.ours_profile, "cxl", "ours")
    out = []
    timings = sorted({r["timing"] for r in rows if r["profile"] != "resident"})
    for claim, text, seed in PAPER_CLAIMS:
        got = []
        for timing in timings:
            got += _claim(claim, rows, res, base_p, ours_p, timing, cmp)
        if claim in ("ppl_increase", "bit_exact"):
            got = _quality_claim(claim, res)
        if claim == "prefetch_accuracy":
            got += _predictor_claim(res)
        if not got:
            got = [("not measured", "", _why_missing(claim, base_p, ours_p))]
        for ours, label, how in got:
            out.append({"claim": text, "seed": seed, "ours": ours, "label": label, "how": how})
    return out


def _why_missing(claim, base_p, ours_p) -> str:
    if claim == "long_context":
        return "no rows with prompt_len >= 16384"
    if claim == "throughput_gain":
        return "no rows with batch > 1 on both profiles"
    if claim in ("ppl_increase", "bit_exact"):
        return "no perplexity results"
    if base_p is None or ours_p is None:
        return f"needs rows on a DRAM profile and a CXL profile (found: {base_p}, {ours_p})"
    return "no matching rows"


def _claim(claim, rows, res, base_p, ours_p, timing, cmp) -> list:
    if base_p is None or ours_p is None or claim in ("ppl_increase", "bit_exact"):
        return []
    mine = [r for r in rows if r["timing"] == timing and r["profile"] in (base_p, ours_p)]
    if not mine:
        return []
    if claim == "prefetch_accuracy":
        r = min(
            (r for r in mine if r["profile"] == ours_p and r["policy"] == cmp.ours_policy),
            key=lambda r: (r["batch"], r["prompt_len"], r["budget"]),
            default=None,
        )
        if r is None or r.get("prefetch_precision") is None:
            return []
        return [
            (
                f"{r['prefetch_precision']:.0%}",
                timing,
                f"prefetch precision (used / issued) of {cmp.ours_policy}@{ours_p}, budget {r['budget']:g}, "
                f"batch {r['batch']}",
            )
        ]
    if claim == "long_context":
        mine = [r for r in mine if r["prompt_len"] >= 16384]
        metric, better = "ttft_s", "lower"
    elif claim == "throughput_gain":
        big = max(r["batch"] for r in mine)
        if big == 1:
            return []  # a batched claim needs batched rows
        mine = [r for r in mine if r["batch"] == big]
        metric, better = "tokens_per_s", "higher"
    elif claim == "miss_penalty":
        metric, better = "stall_s", "reduction"
    else:
        metric, better = ("ttft_s" if claim == "ttft_speedup" else "tpot_s"), "lower"
    if not mine:
        return []
    batch = min(r["batch"] for r in mine)
    plen = min(r["prompt_len"] for r in mine if r["batch"] == batch)
    budgets = sorted(
        {r["budget"] for r in mine if r["profile"] == base_p}
        & {r["budget"] for r in mine if r["profile"] == ours_p}
    )
    for budget in budgets:
        b = _point(mine, base_p, cmp.baseline_policy, timing, budget=budget, batch=batch, prompt_len=plen)
        if b is None:
            continue
        # the same model on both sides (a report may hold several models' rows: Mixtral's, Switch's)
        o = _point(
            mine,
            ours_p,
            cmp.ours_policy,
            timing,
            budget=budget,
            batch=batch,
            prompt_len=plen,
            _model=b["_model"],
        )
        if o is None or not b.get(metric) or o.get(metric) is None:
            continue
        how = (
            f"{cmp.baseline_policy}@{base_p} vs {cmp.ours_policy}@{ours_p}, budget {budget:g}, batch {batch}, "
            f"prompt {plen}"
        )
        if better == "higher":
            val = f"{o[metric] / b[metric]:.2f}x"
        elif better == "reduction":
            val = f"{1 - o[metric] / b[metric]:.0%}"
        else:
            val = f"{b[metric] / o[metric]:.2f}x" if o[metric] else "inf"
        return [(val, timing, how)]
    return []


def _quality_claim(claim, res: Results) -> list:
    out = []
    for doc in res.perplexity:
        rows = [r for r in doc["rows"] if not r.get("skipped") and r["policy"] != "resident"]
        if not rows:
            continue
        src = f"{doc['model'].get('name', '')} on {doc['config'].get('corpus')}:{doc['config'].get('split')}"
        timing = "measured-cpu" if doc["machine"].get("jax_backend") != "gpu" else "measured-gpu"
        exact = [r for r in rows if r.get("exact")]
        inexact = [r for r in rows if not r.get("exact")]
        if claim == "bit_exact" and exact:
            ok = all(r.get("bit_identical") for r in exact)
            out.append(
                (
                    "yes" if ok else "NO",
                    timing,
                    f"logits of {', '.join(r['policy'] for r in exact)} equal resident bit for bit: {ok}; {src}",
                )
            )
        if claim == "ppl_increase":
            if exact:
                worst = max(abs(r["ppl_rel_delta"]) for r in exact)
                out.append((f"{worst:.2%}", timing, f"largest abs. delta over exact policies; {src}"))
            mode = doc["config"].get("mode")
            for r in inexact:
                uses = r.get("approximate_uses")
                if uses == 0:  # the delta of a run that never approximated measures nothing
                    why = f"{r['policy']} (inexact) used no approximation in mode {mode}; {src}"
                    out.append(("not measured", timing, why))
                    continue
                used = "" if uses is None else f"; {uses} of {r['expert_uses']} expert uses approximate"
                why = f"{r['policy']} (inexact by design{used}, mode {mode}); {src}"
                out.append((f"{r['ppl_rel_delta']:+.2%}", timing, why))
    return out


def _predictor_claim(res: Results) -> list:
    out = []
    for doc in res.predictor:
        s = doc["summary"]
        name = "learned" if "learned" in s else next(iter(s))
        h1 = s[name].get("1") or s[name].get(1)
        if h1 and "exact" in h1:
            out.append(
                (
                    f"{h1['exact']:.0%}",
                    "measured-cpu",
                    f"exact-set accuracy of the {name} predictor, 1 layer ahead (recall@k {h1.get('recall@k', float('nan')):.0%}); "
                    f"{doc['_path']}",
                )
            )
    return out


# ---- tables -------------------------------------------------------------------------------------------


def _f(x, spec=".3g", scale=1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x * scale, spec)


def _iqr(r, name, scale=1e3) -> str:
    q = r.get(f"{name}_iqr") or [None, None]
    if q[0] is None:
        return _f(r.get(name), ".3g", scale)
    return f"{_f(r.get(name), '.3g', scale)} [{_f(q[0], '.3g', scale)}, {_f(q[1], '.3g', scale)}]"


def perf_table(rows: list[dict]) -> str:
    """One line per run; a `source` column (the result file) where the rows come from several files, so
    two experiments' runs of the same configuration (e.g. on different traces) are told apart."""
    several = len({r["_path"] for r in rows}) > 1
    src = "| source " if several else ""
    lines = [
        f"{src}| model | profile | timing | budget | batch | prompt | policy | TTFT ms [IQR] | TPOT ms [IQR] "
        "| x resident | tokens/s | hit rate | stall s | exact |",
        "|---" * (15 if several else 14) + "|",
    ]
    key = lambda r: (
        _source(r["_path"]) if several else "",
        r["_model"],
        r["profile"],
        r["timing"],
        r["batch"],
        r["prompt_len"],
        r["budget"],
        r["policy"],
    )
    for r in sorted(rows, key=key):
        lines.append(
            (f"| {_source(r['_path'])} " if several else "")
            + f"| {r['_model']} | {r['profile']} | {r['timing']} | {r['budget']:g} | {r['batch']} | {r['prompt_len']} | "
            f"{r['policy']} | {_iqr(r, 'ttft_s')} | {_iqr(r, 'tpot_s')} | {_f(r.get('tpot_over_resident'), '.2f')} | "
            f"{_f(r.get('tokens_per_s'), '.1f')} | {_f(r.get('hit_rate'), '.3f')} | {_f(r.get('stall_s'), '.3g')} | "
            f"{r.get('bit_identical_to_resident', '')} |"
        )
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    lines = ["| seed paper's claim | seed | ours | ours is | how ours is computed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['seed']} | {r['ours']} | {r['label']} | {r['how']} |")
    return "\n".join(lines)


def predictor_table(res: Results) -> str:
    lines = [
        "| metrics file | predictor | horizon | exact-set | recall@k | recall@2k |",
        "|---|---|---|---|---|---|",
    ]
    for doc in res.predictor:
        for name, per_h in doc["summary"].items():
            for h, m in sorted(per_h.items(), key=lambda kv: int(kv[0])):
                lines.append(
                    f"| {doc['_path']} | {name} | {h} | {_f(m.get('exact'), '.3f')} | {_f(m.get('recall@k'), '.3f')} "
                    f"| {_f(m.get('recall@2k'), '.3f')} |"
                )
    return "\n".join(lines)


def experiment_tables(data: dict) -> list[str]:
    """Markdown for the sections of a paper-scale simulation: headline (with speedups and the oracle
    ratio), ablation, failure, cost. Every figure simulated."""
    secs = data.get("sections", {})
    md = []
    head = secs.get("headline")
    if head:
        b = head["baseline"]
        md += [
            f"Headline (baseline: {b['policy']}@{b['hardware']}; budget "
            f"{data['experiment']['config'].get('device_budget')} of expert bytes; batch 1):",
            "",
            "| profile/policy | TTFT ms | TPOT ms | TTFT x | TPOT x | TPOT / oracle | hit rate | stall s | J/token |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in head["rows"].items():
            if "skipped" in r:
                md.append(f"| {key} | skipped: {r['skipped']} ||||||||")
                continue
            oracle = head["rows"].get(key.rpartition("/")[0] + "/oracle", {})
            ratio = r["tpot_s"] / oracle["tpot_s"] if oracle.get("tpot_s") else None
            md.append(
                f"| {key} | {_f(r['ttft_s'], '.4g', 1e3)} | {_f(r['tpot_s'], '.4g', 1e3)} | "
                f"{_f(r.get('ttft_speedup_vs_baseline'), '.2f')} | {_f(r.get('tpot_speedup_vs_baseline'), '.2f')} | "
                f"{_f(ratio, '.2f')} | {_f(r.get('hit_rate'), '.3f')} | {_f(r.get('stall_s'), '.3g')} | "
                f"{_f(r.get('energy_j_per_token'), '.3g')} |"
            )
        md.append("")
    abl = secs.get("ablation")
    if abl:
        md += [
            f"Ablation on {abl['hardware']} (moecxl with one mechanism removed):",
            "",
            "| variant | TPOT ms | TTFT ms | hit rate | stall s | utilisation by tier | home fraction by tier |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in abl["rows"].items():
            util = ", ".join(f"{t} {u:.2f}" for t, u in sorted(r.get("utilisation_by_tier", {}).items()))
            homes = (r.get("placement") or {}).get("home_fraction_by_tier", {})
            md.append(
                f"| {name} | {_f(r.get('tpot_s'), '.4g', 1e3)} | {_f(r.get('ttft_s'), '.4g', 1e3)} | "
                f"{_f(r.get('hit_rate'), '.3f')} | {_f(r.get('stall_s'), '.3g')} | {util} | "
                + ", ".join(f"{t} {f:.2f}" for t, f in sorted(homes.items()))
                + " |"
            )
        md.append("")
    fail = secs.get("failure")
    if fail:
        md += [
            f"Device failure on {fail['hardware']} (faults {fail['faults']}):",
            "",
            "| policy | TPOT ms | worst step ms | rehomed fetches |",
            "|---|---|---|---|",
        ]
        for name, r in fail["rows"].items():
            steps = r.get("step_times_s") or []
            md.append(
                f"| {name} | {_f(r.get('tpot_s'), '.4g', 1e3)} | {_f(max(steps) if steps else None, '.4g', 1e3)} "
                f"| {r.get('rehomed_fetches', '')} |"
            )
        md.append("")
    miss = secs.get("miss_handling")
    if miss:
        md += [
            "Beyond fetching: fetch-only, host-compute-only and the three-way miss decision "
            f"({', '.join(f'{k} = {v}' for k, v in miss['variants'].items())}):",
            "",
            "| batch | profile/variant | TPOT ms | TTFT ms | x fetch-only TPOT | J/token | miss choices |",
            "|---|---|---|---|---|---|---|",
        ]
        for b, group in miss["rows"].items():
            if "skipped" in group:
                md.append(f"| {b} | skipped: {group['skipped']} ||||||")
                continue
            for key, r in group.items():
                if "skipped" in r:
                    md.append(f"| {b} | {key} | skipped: {r['skipped']} |||||")
                    continue
                fetch = group.get(key.rpartition("/")[0] + "/fetch_only", {})
                x = fetch["tpot_s"] / r["tpot_s"] if fetch.get("tpot_s") and r.get("tpot_s") else None
                md.append(
                    f"| {b} | {key} | {_f(r.get('tpot_s'), '.4g', 1e3)} | {_f(r.get('ttft_s'), '.4g', 1e3)} | "
                    f"{_f(x, '.2f')} | {_f(r.get('energy_j_per_token'), '.3g')} | "
                    + ", ".join(f"{c} {n}" for c, n in (r.get("miss_choices") or {}).items() if n)
                    + " |"
                )
        md.append("")
    md += host_sensitivity_table(secs.get("host_sensitivity"))
    cost = secs.get("cost")
    if cost:
        md += [
            f"Memory cost ({cost['note']}): GPU-only {cost['gpu_only']['gpus']} GPUs = "
            f"{cost['gpu_only']['usd']:,.0f} USD; tiered 1 GPU + {cost['tiered']['cxl_gb']:.0f} GB CXL = "
            f"{cost['tiered']['usd']:,.0f} USD; reduction {cost['cost_reduction']:.0%} (prices: "
            + "; ".join(f"{k}: {v.get('source', '')}" for k, v in cost["prices"].items())
            + ").",
            "",
        ]
    return md


def host_sensitivity_table(sens: dict | None) -> list[str]:
    """Markdown: each host-computing policy's TPOT with the profile's host at 25%, 50%, 100% ... of its
    figure, beside fetch-only moecxl, so a reader sees how much the result rests on the host (simulated)."""
    if not sens:
        return []
    fr = sens["fractions"]
    md = [
        "Host sensitivity (simulated): TPOT ms with the host at a fraction of the profile's figure "
        "(memory rate and GFLOP/s scaled together; "
        + "; ".join(f"{h}: {x['mem_gbps']:g} GB/s, {x['source']}" for h, x in sens["host"].items())
        + "):",
        "",
        "| batch | profile | policy | " + " | ".join(f"host x{f:g}" for f in fr) + " | fetch-only moecxl |",
        "|---|---|---|" + "---|" * (len(fr) + 1),
    ]
    for b, group in sens["rows"].items():
        if "skipped" in group:
            md.append(f"| {b} | skipped: {group['skipped']} |||")
            continue
        for hw in dict.fromkeys(k.partition("/")[0] for k in group):
            fetch = group.get(f"{hw}/moecxl", {})
            for pol in sens["policies"]:
                cells = [_f(group.get(f"{hw}/{pol}@{f:g}", {}).get("tpot_s"), ".4g", 1e3) for f in fr]
                md.append(
                    f"| {b} | {hw} | {pol} | "
                    + " | ".join(cells)
                    + f" | {_f(fetch.get('tpot_s'), '.4g', 1e3)} |"
                )
    md.append("")
    return md


# ---- plots --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_tpot_vs_budget(rows, path: Path) -> Path | None:
    """TPOT (median, IQR bars) against device budget, one line per policy, a panel per profile+timing."""
    rows = [r for r in rows if r["profile"] != "resident" and r.get("tpot_s") is not None]
    if not rows:
        return None
    plt = _plt()
    batch = min(r["batch"] for r in rows)
    plen = min(r["prompt_len"] for r in rows if r["batch"] == batch)
    rows = [r for r in rows if r["batch"] == batch and r["prompt_len"] == plen]
    panels = sorted({(r["profile"], r["timing"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (prof, timing) in zip(axes[0], panels):
        for pol in sorted({r["policy"] for r in rows}):
            pts = sorted(
                (r for r in rows if (r["profile"], r["timing"], r["policy"]) == (prof, timing, pol)),
                key=lambda r: r["budget"],
            )
            if not pts:
                continue
            x = [r["budget"] for r in pts]
            y = [r["tpot_s"] * 1e3 for r in pts]
            q = [r.get("tpot_s_iqr") or [None, None] for r in pts]
            lo = [0.0 if a is None else max(0.0, y_ - a * 1e3) for y_, (a, _) in zip(y, q)]
            hi = [0.0 if b is None else max(0.0, b * 1e3 - y_) for y_, (_, b) in zip(y, q)]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=pol)
        ax.set_title(f"{prof} ({timing})", fontsize=9)
        ax.set_xlabel("device budget (fraction of expert bytes)")
        ax.set_ylabel("TPOT (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"TPOT vs device budget (batch {batch}, prompt {plen}; median, IQR bars)", fontsize=10)
    return _save(fig, path)


def _focus(rows):
    """The rows of one (profile, timing, budget, batch, prompt) point: the first profile, smallest budget."""
    rows = [r for r in rows if r["profile"] != "resident"]
    if not rows:
        return [], ""
    r0 = min(
        rows,
        key=lambda r: (r["timing"] == "simulated", r["profile"], r["batch"], r["prompt_len"], r["budget"]),
    )
    sel = ("profile", "timing", "budget", "batch", "prompt_len")
    pick = [r for r in rows if all(r[k] == r0[k] for k in sel)]
    return (
        pick,
        f"{r0['profile']} ({r0['timing']}), budget {r0['budget']:g}, batch {r0['batch']}, prompt {r0['prompt_len']}",
    )


def plot_hit_rate_by_layer(rows, path: Path) -> Path | None:
    pick, title = _focus([r for r in rows if r.get("hit_rate_by_layer")])
    if not pick:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in sorted(pick, key=lambda r: r["policy"]):
        ax.plot(range(len(r["hit_rate_by_layer"])), r["hit_rate_by_layer"], marker=".", label=r["policy"])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"hit rate per layer: {title}", fontsize=9)
    return _save(fig, path)


def plot_bytes_by_tier(rows, path: Path) -> Path | None:
    pick, title = _focus([r for r in rows if r.get("bytes_by_tier")])
    if not pick:
        return None
    plt = _plt()
    pick = sorted(pick, key=lambda r: r["policy"])
    tiers = sorted({t for r in pick for t in r["bytes_by_tier"]})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bottom = [0.0] * len(pick)
    for t in tiers:
        vals = [r["bytes_by_tier"].get(t, 0) / 2**20 for r in pick]
        ax.bar([r["policy"] for r in pick], vals, bottom=bottom, label=t)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("MiB copied per run (this model's experts)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"bytes per tier: {title}", fontsize=9)
    return _save(fig, path)


def plot_prediction_accuracy(res: Results, path: Path) -> Path | None:
    if not res.predictor:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for doc in res.predictor:
        for name, per_h in doc["summary"].items():
            hs = sorted(per_h, key=int)
            for ax, metric in zip(axes, ("exact", "recall@k")):
                ax.plot(
                    [int(h) for h in hs],
                    [per_h[h].get(metric, float("nan")) for h in hs],
                    marker="o",
                    label=name,
                )
    for ax, metric in zip(axes, ("exact-set accuracy", "recall@k")):
        ax.set_xlabel("horizon (MoE layers ahead)")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("expert prediction accuracy per horizon (test split)", fontsize=10)
    return _save(fig, path)


# ---- the report ---------------------------------------------------------------------------------------


def build(results_dir, out_dir, *, predictor_metrics=(), comparison: Comparison = Comparison()) -> Path:
    """Write OUT/report.md and its plots from the result files under `results_dir`; returns report.md."""
    res = collect(results_dir, predictor_metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = res.perf_rows()
    figs = {
        "TPOT vs device budget": plot_tpot_vs_budget(rows, out / PLOTS[0]),
        "Hit rate per layer": plot_hit_rate_by_layer(rows, out / PLOTS[1]),
        "Bytes per tier": plot_bytes_by_tier(rows, out / PLOTS[2]),
        "Prediction accuracy per horizon": plot_prediction_accuracy(res, out / PLOTS[3]),
    }
    md = ["# moecxl evaluation report", ""]
    md += [
        "Every figure says how it was obtained: **measured-cpu / measured-gpu** (real runs, real copies), "
        "**emulated** (real runs on this machine, link speed imposed by the hardware profile and time-scaled "
        "to the target model), **simulated** (trace replay through the same policy code with a cost model).",
        "",
        "## Sources",
        "",
        "| file | kind | model | timing | created |",
        "|---|---|---|---|---|",
    ]
    for doc in res.perplexity + res.latency + res.simulation:
        timings = sorted({r.get("timing", "") for r in doc["rows"] if r.get("timing")}) or ["measured-cpu"]
        md.append(
            f"| {doc['_path']} | {doc['kind']} | {doc['model'].get('name', '')} | {', '.join(timings)} | "
            f"{doc.get('created', '')} |"
        )
    for doc in res.predictor:
        md.append(
            f"| {doc['_path']} | predictor metrics | {doc.get('model', {}).get('id', '')} | measured-cpu | |"
        )
    md += [
        "",
        "## Paper comparison (seed paper's figure beside ours)",
        "",
        comparison_table(paper_comparison(res, comparison)),
        "",
    ]
    if res.perplexity:
        from moecxl.evaluation.perplexity import format_table

        md += ["## Perplexity: resident vs offloaded", ""]
        for doc in res.perplexity:
            c = doc["config"]
            md += [
                f"`{doc['_path']}`: {doc['model'].get('name', '')}, {c.get('corpus')}:{c.get('split')}, "
                f"{c.get('tokens')} tokens, mode {c.get('mode')}, budget {c.get('budget')}",
                "",
                format_table(doc["rows"]),
                "",
            ]
    lat = [r for r in rows if r["timing"] != "simulated"]
    sim = [r for r in rows if r["timing"] == "simulated"]
    if lat:
        md += ["## Latency on this machine (median [IQR] over repeats)", "", perf_table(lat), ""]
    if sim:
        md += ["## Simulated latency (paper-scale target)", "", perf_table(sim), ""]
    for doc in res.simulation:
        if "_experiment" in doc:
            md += [f"## Paper-scale experiment (simulated): `{doc['_path']}`", ""]
            md += experiment_tables(doc["_experiment"])
    skipped = [
        (doc["_path"], r) for doc in res.latency + res.simulation for r in doc["rows"] if r.get("skipped")
    ]
    if skipped:
        md += ["Configurations that could not run:", ""]
        md += [
            f"- {p}: {r.get('profile')} {r.get('policy')} budget {r.get('budget')} batch {r.get('batch')}: "
            f"{r['skipped']}"
            for p, r in skipped
        ]
        md.append("")
    if res.predictor:
        md += ["## Expert prediction", "", predictor_table(res), ""]
    md += ["## Figures", ""]
    for title, p in figs.items():
        md.append(f"### {title}\n\n![{title}]({p.name})\n" if p else f"### {title}\n\n(no data)\n")
    path = out / "report.md"
    tmp = path.with_name(f".report.md.tmp{os.getpid()}")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, path)
    return path


def cli(results_dir, out_dir, predictor_metrics=(), comparison: Comparison = Comparison()) -> int:
    """`eval/report.py`: build the report and print where it is."""
    path = build(results_dir, out_dir, predictor_metrics=predictor_metrics, comparison=comparison)
    print(f"report: {path}")
    return 0
