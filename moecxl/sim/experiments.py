"""The seed paper's experiments in simulation, from one YAML file (configs/experiments/*.yaml).

`run_experiment(path, out_dir)` reads the experiment, the trace and the target model, runs every
section (headline, batch, long_context, ablation, failure, cost) with every policy on the same trace
and cost model, and writes `results.json` (schema-versioned, with trace, profiles and git commit) and
plots, every figure labelled "simulated". `load_results` refuses other schema versions.

Two keys of an experiment besides its sections:
- `control`: the control-plane time charged per visit (a file of `moecxl.sim.control`, default
  configs/control/cpu-2core.yaml, measured by bench/bench_control.py --table; `idealised` charges none).
- `learned_predictions`: stored predictions of a trained predictor for the trace (default
  `<trace>/predictions/learned.safetensors`, written by `train_predictor.py predict`). When they exist,
  the headline and batch sections gain a `moecxl_learned` row (moecxl with the learned predictor)
  beside `moecxl` (pre-gating); naming the file, or listing `moecxl_learned`, makes them required.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np

from moecxl.config import load_yaml
from moecxl.memory.tiers import Hardware, HardwareError
from moecxl.runtime.policies import get_policy
from moecxl.sim.control import ControlCosts, ControlError
from moecxl.sim.costmodel import ModelShape, load_shape, with_precision
from moecxl.sim.energy import DEFAULT_ENERGY, EnergyError, EnergyModel
from moecxl.sim.precision import PrecisionError, precision_of
from moecxl.sim.simulate import SimConfig, SimError, default_placement, simulate
from moecxl.sim.stack import kernel_efficiency
from moecxl.sim.stored import (
    StoredPredictions,
    StoredPredictionsError,
    learned_policy,
    predictions_path,
)
from moecxl.sim.workload import activation_matrix, requests_from_trace

SCHEMA_VERSION = 2  # 2: section rows carry batch, budget, prompt_len (report rows)
DEFAULT_CONTROL = "configs/control/cpu-2core.yaml"
LEARNED = "moecxl_learned"  # moecxl with the learned predictor replayed from stored predictions
RESULTS_KIND = "moecxl.sim.results"
REPO = Path(__file__).resolve().parents[2]
# name: policy, or policy@placement. fetch_only keeps Algorithm 1 (its own best); fetch_only_near_data
# fetches from the near-data homes, to show the three-way gain is not the placement's;
# three_way_algorithm1 decides per miss on Algorithm 1's homes (the near-data placement's worth).
MISS_VARIANTS = {
    "fetch_only": "moecxl",
    "fetch_only_near_data": "moecxl@near_data",
    "host_only": "moecxl_host",
    "three_way": "moecxl_nd",
    "three_way_algorithm1": "moecxl_nd@uniform",
}
SECTIONS = (
    "headline",
    "batch",
    "long_context",
    "ablation",
    "failure",
    "cost",
    "miss_handling",
    "host_sensitivity",
)


class ExperimentError(ValueError):
    """An experiment file or result file is wrong; the message names the file and key."""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "moecxl"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _path(p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else REPO / q


def load_hardware(name: str) -> Hardware:
    """A profile by name (configs/hardware/NAME.yaml) or path; unknown names list the known ones."""
    p = _path(name) if name.endswith(".yaml") else REPO / "configs" / "hardware" / f"{name}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in (REPO / "configs" / "hardware").glob("*.yaml"))
        raise ExperimentError(f"unknown hardware profile {name!r} (no {p}); known: {known}")
    try:
        return Hardware.from_yaml(p)
    except HardwareError as e:
        raise ExperimentError(str(e)) from e


def _with_precision(shape: ModelShape, precision, path: Path) -> ModelShape:
    """The target with its experts / dense layers stored as `precision: {experts: int4, dense: bf16}` says
    (`moecxl.sim.precision` formats; copies, reads and the budget follow); absent: the target's dtype."""
    if precision is None:
        return shape
    if not isinstance(precision, dict) or set(precision) - {"experts", "dense"}:
        raise ExperimentError(
            f"{path}: key 'precision' must map experts/dense to a format, got {precision!r}"
        )
    try:
        e, d = (precision_of(str(precision.get(k, "bf16"))) for k in ("experts", "dense"))
    except PrecisionError as err:
        raise ExperimentError(f"{path}: key 'precision': {err}") from err
    return with_precision(
        shape, e.bytes_per_param, d.bytes_per_param, kernel_efficiency(e.kernel), kernel_efficiency(d.kernel)
    )


class _Ctx:
    """Trace, target and the derived inputs every section shares."""

    def __init__(self, exp: dict, path: Path):
        from moecxl.traces import read_traces

        self.exp, self.path = exp, path
        for key in ("trace", "target"):
            if key not in exp:
                raise ExperimentError(f"{path}: missing key {key!r}")
        self.trace_dir = _path(exp["trace"])
        self.ts = read_traces(self.trace_dir)
        self.shape: ModelShape = _with_precision(load_shape(_path(exp["target"])), exp.get("precision"), path)
        self.layer_map = exp.get("layer_map")
        self.budget = float(exp.get("device_budget", 0.25))
        self.n_requests = int(exp.get("requests", 4))
        self.decode_tokens = exp.get("decode_tokens")
        self.warmup = int(exp.get("warmup_requests", 1))
        self.library_seqs = int(exp.get("library_sequences", 4))
        self.policies = list(exp.get("policies", ["on_demand", "lru", "oracle", "moecxl"]))
        self.control = self._load_control(exp.get("control", DEFAULT_CONTROL))
        self.learned, self.learned_note = self._load_learned(exp)
        if self.learned is not None and "moecxl" in self.policies and LEARNED not in self.policies:
            self.policies.insert(self.policies.index("moecxl") + 1, LEARNED)
        for p in self.policies:
            self.spec(p)
        self.pregate = None
        self.skipped: dict = {}
        try:
            self.energy = EnergyModel.load(_path(exp["energy"]) if "energy" in exp else DEFAULT_ENERGY)
        except (EnergyError, OSError, ValueError) as e:
            raise ExperimentError(f"{path}: energy figures: {e}") from e
        miss = exp.get("miss_handling")
        self.used = set(self.policies) | (
            {v.partition("@")[0] for v in (miss.get("policies") or MISS_VARIANTS).values()}
            if isinstance(miss, dict)
            else set()
        )
        sens = exp.get("host_sensitivity")
        if isinstance(sens, dict):
            self.used |= {"moecxl", *sens.get("policies", ("moecxl_nd",))}
        for p in self.used:
            self.control.check(self.spec(p).name)
        # Policies the engine would refuse on the target's experts: no figure to simulate.
        self.refused: dict = {}
        if not self.shape.host_kernel:
            self.refused.update(
                {
                    p: f"computes misses on the host; the host kernel cannot compute {self.shape.name}'s experts"
                    for p in self.used
                    if self.spec(p).host_compute
                }
            )
        if any(self.spec(p).needs_pregate for p in self.used):
            self._load_pregate(exp.get("predictor_model"))
        lib = self.requests(batch=1, library=True)
        self.library = [activation_matrix(r, self.shape.L, self.shape.E) for r in lib]
        self.freq = np.sum(self.library, axis=0) + 1e-3 if self.library else None

    def spec(self, name: str):
        """The policy of a name; `moecxl_learned` is moecxl with the learned predictor as its source."""
        if name == LEARNED:
            if self.learned is None:
                raise ExperimentError(f"{self.path}: policy {LEARNED!r} asked for, but {self.learned_note}")
            return learned_policy(get_policy("moecxl"))
        return get_policy(name)

    def _load_control(self, spec):
        where = spec if spec == "idealised" else _path(str(spec))
        try:
            return ControlCosts.load(where)
        except (ControlError, ValueError) as e:
            raise ExperimentError(f"{self.path}: key 'control': {e}") from e

    def _load_learned(self, exp: dict):
        """(StoredPredictions or None, why none): required where the experiment names them."""
        named = exp.get("learned_predictions")
        wanted = named is not None or LEARNED in self.policies
        file = _path(named) if named is not None else predictions_path(self.trace_dir)
        if self.layer_map is not None and not wanted:  # per-layer predictions of the trace's layers only
            return (
                None,
                f"layer_map {self.layer_map!r}: the trace's stored predictions are for its own layers",
            )
        if not file.is_file() and not wanted:
            return None, (
                f"no stored predictions at {file} (python train_predictor.py predict --predictor DIR --traces "
                f"{self.trace_dir})"
            )
        try:
            return StoredPredictions.load(file, self.ts, self.shape), None
        except StoredPredictionsError as e:
            raise ExperimentError(f"{self.path}: learned predictor: {e}") from e

    def _load_pregate(self, model_path):
        if not model_path:
            self.skipped.update(
                {
                    p: "no predictor_model: pre-gating needs the trace's small model"
                    for p in self.used
                    if self.spec(p).needs_pregate
                }
            )
            return
        import moecxl
        from moecxl.sim.predict import PredictError, pregate_tops_for_trace

        model = moecxl.load(_path(model_path))
        pregating = [p for p in self.used if self.spec(p).needs_pregate]
        horizon = max(self.spec(p).horizon for p in pregating)
        try:
            self.pregate = pregate_tops_for_trace(model, self.ts, horizon)
        except PredictError as e:
            self.skipped.update({p: str(e) for p in pregating})

    def requests(self, batch: int, library: bool = False, prompt_tokens=None):
        kw = dict(layer_map=self.layer_map, pregate_NLHK=self.pregate, batch=batch)
        if library:
            return requests_from_trace(self.ts, self.shape, max_requests=self.library_seqs, **kw)
        reqs = requests_from_trace(
            self.ts,
            self.shape,
            skip_sequences=self.library_seqs,
            max_requests=self.n_requests + self.warmup,
            decode_tokens=self.decode_tokens,
            prompt_tokens=prompt_tokens,
            **kw,
        )
        if len(reqs) <= self.warmup:
            raise ExperimentError(
                f"{self.trace_dir}: {len(reqs)} request(s) of batch {batch} from the decoded sequences after the "
                f"{self.library_seqs} library ones, all taken by {self.warmup} warm-up request(s): collect more "
                "decoded sequences (traces collect --decode-every) or lower the batch"
            )
        return reqs

    def run(self, hw: Hardware, policy, requests, **cfg_kw) -> dict:
        spec = self.spec(policy) if isinstance(policy, str) else policy
        note = None
        if spec.name in self.refused:
            return {"skipped": self.refused[spec.name]}
        if spec.name in self.skipped and spec.name.startswith("moecxl"):
            # moecxl without a pre-gate: its eviction, gate and miss decision still apply; say so.
            note = f"no pre-gating ({self.skipped[spec.name]}): moecxl runs without prefetch"
            spec = dataclasses.replace(spec, prefetch=None, horizon=0)
        elif spec.name in self.skipped:
            return {"skipped": self.skipped[spec.name]}
        moecxl = spec.name in ("moecxl", LEARNED)
        placement = cfg_kw.pop("placement", "frequency" if moecxl else default_placement(spec))
        homes = None
        if placement.startswith("tier:"):
            homes = {(m, e): placement[5:] for m in range(self.shape.L) for e in range(self.shape.E)}
        cfg = SimConfig(
            policy=spec,
            device_budget=cfg_kw.pop("device_budget", self.budget),
            placement="uniform" if homes else placement,
            warmup_requests=self.warmup,
            control=self.control,
            **cfg_kw,
        )
        res = simulate(
            requests,
            self.shape,
            hw,
            cfg,
            freq_LE=self.freq,
            eam_library=self.library,
            placement=homes,
            energy=self.energy,
            predictor=self.learned if spec.name == LEARNED else None,
        )
        m = res.metrics
        if note:
            m["note"] = note
        m["placement_mode"] = placement
        m["step_times_s"] = res.step_times_s
        return m


def _brief(m: dict) -> dict:
    """The figures a section keeps of one run (the report's row fields included)."""
    if "skipped" in m:
        return {"skipped": m["skipped"]}
    keys = (
        "ttft_s",
        "tpot_s",
        "tokens_per_s",
        "hit_rate",
        "hit_rate_by_layer",
        "stall_s",
        "prefetch_precision",
        "bytes_by_tier",
        "utilisation_by_tier",
        "rehomed_fetches",
        "prompt_len",
        "note",
        "exact",
        "predictor",
        "control_s",
        "control_tpot_s",
        "control_share_of_tpot",
    )
    out = {k: m[k] for k in keys if k in m}
    if "energy" in m:
        out["energy_j_per_token"] = m["energy"]["j_per_token"]
        out["energy_j_by_component"] = m["energy"]["j_by_component"]
    out["batch"] = m["batch_size"]
    out["budget"] = m["config"]["device_budget"]
    return out


def section_headline(ctx: _Ctx, spec: dict) -> dict:
    reqs = ctx.requests(batch=int(spec.get("batch", 1)))
    rows = {}
    for hw_name in spec["hardware"]:
        name, _, place = hw_name.partition("@")
        hw = load_hardware(name)
        for p in ctx.policies:
            kw = {"placement": f"tier:{place}"} if place else {}
            rows[f"{hw_name}/{p}"] = _brief(ctx.run(hw, p, reqs, **kw))
    base = rows.get(f"{spec['baseline']['hardware']}/{spec['baseline']['policy']}", {})
    for r in rows.values():
        if "tpot_s" in r and "tpot_s" in base:
            r["tpot_speedup_vs_baseline"] = base["tpot_s"] / r["tpot_s"]
            r["ttft_speedup_vs_baseline"] = base["ttft_s"] / r["ttft_s"]
    return {"baseline": spec["baseline"], "rows": rows}


def _batches(ctx: _Ctx, batches, rows: dict):
    """(batch, requests) for each batch size the trace can fill; the others get a 'skipped' row."""
    for b in batches:
        try:
            yield b, ctx.requests(batch=int(b))
        except ValueError as e:
            rows[str(b)] = {"skipped": str(e)}


def _with_learned(ctx: _Ctx, runs) -> list:
    """Each (hardware, moecxl) run followed by its learned-predictor twin, where predictions exist."""
    out = []
    for hw_name, p in runs:
        out.append((hw_name, p))
        if p == "moecxl" and ctx.learned is not None and [hw_name, LEARNED] not in runs:
            out.append((hw_name, LEARNED))
    return out


def section_batch(ctx: _Ctx, spec: dict) -> dict:
    rows: dict = {}
    for b, reqs in _batches(ctx, spec["batches"], rows):
        for hw_name, p in _with_learned(ctx, spec["runs"]):
            rows.setdefault(str(b), {})[f"{hw_name}/{p}"] = _brief(ctx.run(load_hardware(hw_name), p, reqs))
    return {"rows": rows}


def section_long_context(ctx: _Ctx, spec: dict) -> dict:
    rows = {}
    for t in spec["prompt_tokens"]:
        try:
            reqs = ctx.requests(batch=1, prompt_tokens=int(t))
        except ValueError as e:
            rows[str(t)] = {"skipped": str(e)}
            continue
        for hw_name, p in spec["runs"]:
            rows.setdefault(str(t), {})[f"{hw_name}/{p}"] = _brief(ctx.run(load_hardware(hw_name), p, reqs))
    return {
        "rows": rows,
        "note": "routing of a longer prompt: union of the experts routed by that many "
        "trace prompt tokens (several trace prompts); attention and compute costed at that length",
    }


def section_ablation(ctx: _Ctx, spec: dict) -> dict:
    """moecxl with one mechanism removed at a time on one profile; `striping_hardware` (optional) adds
    full / no_striping pairs on other profiles (where devices are slow or fast relative to the link);
    `placement_hardware` full / no_placement pairs (where capacity puts some experts on a slow tier);
    `without_striping: true` adds the removals with striping off too (rows `no_striping/<variant>`)."""
    hw = load_hardware(spec["hardware"])
    reqs = ctx.requests(batch=int(spec.get("batch", 1)))
    full = get_policy("moecxl")
    variants = {  # name: (policy, placement, striping)
        "full": (full, "frequency", True),
        "no_placement": (full, "uniform", True),
        "no_prefetch": (
            dataclasses.replace(full, name="moecxl-no-prefetch", prefetch=None, horizon=0),
            "frequency",
            True,
        ),
        "no_balancing": (full, "first_fit", True),
        "no_striping": (full, "frequency", False),
    }

    def row(hw_, pol, place, stripe):
        m = ctx.run(hw_, pol, reqs, placement=place, striping=stripe)
        return _brief(m) | {"placement": m.get("placement"), "striping": m.get("striping")}

    rows = {name: row(hw, *v) for name, v in variants.items()}
    if spec.get("without_striping"):  # the same removals where striping is not available
        for name in ("full", "no_placement", "no_prefetch", "no_balancing"):
            pol, place, _ = variants[name]
            rows[f"no_striping/{name}"] = (
                rows["no_striping"] if name == "full" else row(hw, pol, place, False)
            )
    striping_rows = {
        name: {v: row(load_hardware(name), *variants[v]) for v in ("full", "no_striping")}
        for name in spec.get("striping_hardware", [])
    }
    # Placement where capacity forces some experts onto a slow tier (Algorithm 1's own case).
    placement_rows = {}
    for name in spec.get("placement_hardware", []):
        pair = {v: row(load_hardware(name), *variants[v]) for v in ("full", "no_placement")}
        if "tpot_s" in pair["full"] and "tpot_s" in pair["no_placement"]:
            pair["full"]["tpot_gain_from_placement"] = pair["no_placement"]["tpot_s"] / pair["full"]["tpot_s"]
        placement_rows[name] = pair
    for pair in [rows] + list(striping_rows.values()):
        if "tpot_s" in pair["full"] and "tpot_s" in pair["no_striping"]:
            pair["full"]["tpot_gain_from_striping"] = pair["no_striping"]["tpot_s"] / pair["full"]["tpot_s"]
    return {
        "hardware": spec["hardware"],
        "rows": rows,
        "striping_rows": striping_rows,
        "placement_rows": placement_rows,
    }


def section_failure(ctx: _Ctx, spec: dict) -> dict:
    hw = load_hardware(spec["hardware"])
    reqs = ctx.requests(batch=1)
    rows = {}
    for p in spec.get("policies", ["moecxl"]):
        m = ctx.run(hw, p, reqs)
        if "skipped" in m:
            rows[p] = m
            continue
        st = np.asarray(m["step_times_s"])
        rows[p] = _brief(m) | {"step_times_s": st.tolist()}
    faults = [dataclasses.asdict(f) for f in hw.faults]
    return {
        "hardware": spec["hardware"],
        "faults": faults,
        "rows": rows,
        "note": "decode steps counted over the measured workload; experts of an offline device are "
        "fetched from the host DRAM master copy (rehomed_fetches)",
    }


def section_miss_handling(ctx: _Ctx, spec: dict) -> dict:
    """Fetch-only, host-compute-only and the three-way decision per batch size and hardware, with
    energy per token (the issue's 'beyond fetching' comparison)."""
    variants = spec.get("policies", MISS_VARIANTS)
    rows: dict = {}
    for b, reqs in _batches(ctx, spec["batches"], rows):
        for hw_name in spec["hardware"]:
            hw = load_hardware(hw_name)
            for name, variant in variants.items():
                pol, _, place = variant.partition("@")
                m = ctx.run(hw, pol, reqs, **({"placement": place} if place else {}))
                rows.setdefault(str(b), {})[f"{hw_name}/{name}"] = _brief(m) | {
                    "policy": pol,
                    "placement": m.get("placement_mode"),
                    "miss_choices": m.get("miss_choices"),
                }
    return {"variants": variants, "rows": rows}


def scaled_host(hw: Hardware, fraction: float) -> Hardware:
    """`hw` with its host `fraction` as fast: its memory rate and its GFLOP/s both scaled."""
    if hw.host is None:
        raise ExperimentError(f"profile {hw.name!r} has no host: block to scale")
    host = dataclasses.replace(
        hw.host, mem_gbps=hw.host.mem_gbps * fraction, gflops=hw.host.gflops * fraction
    )
    return dataclasses.replace(hw, host=host)


def section_host_sensitivity(ctx: _Ctx, spec: dict) -> dict:
    """How much the host-computing results rest on the host figure: each policy's TPOT with the
    profile's host at each fraction of its figure (mem_gbps and gflops scaled together), and fetch-only
    moecxl (which never computes on the host) beside them."""
    fractions = [float(f) for f in spec.get("fractions", (0.25, 0.5, 1.0))]
    policies = list(spec.get("policies", ("moecxl_nd",)))
    rows: dict = {}
    for b, reqs in _batches(ctx, spec.get("batches", (1,)), rows):
        for hw_name in spec["hardware"]:
            hw = load_hardware(hw_name)
            group = rows.setdefault(str(b), {})
            group[f"{hw_name}/moecxl"] = _brief(ctx.run(hw, "moecxl", reqs))
            for f in fractions:
                for pol in policies:
                    m = ctx.run(scaled_host(hw, f), pol, reqs)
                    group[f"{hw_name}/{pol}@{f:g}"] = _brief(m) | {
                        "policy": pol,
                        "host_fraction": f,
                        "host_mem_gbps": hw.host.mem_gbps * f,
                        "miss_choices": m.get("miss_choices"),
                    }
    host = {h: load_hardware(h).host for h in spec["hardware"]}
    return {
        "fractions": fractions,
        "policies": policies,
        "host": {
            h: {"mem_gbps": x.mem_gbps, "gflops": x.gflops, "source": x.source_of("mem_gbps")}
            for h, x in host.items()
        },
        "rows": rows,
    }


def section_cost(ctx: _Ctx, spec: dict) -> dict:
    """GPU-only (enough GPUs to hold every weight) against one GPU + CXL (+ DRAM) holding the experts."""
    prices = spec["prices_usd"]
    hw = load_hardware(spec["hardware"])
    total_bytes = ctx.shape.dense_bytes + ctx.shape.total_expert_bytes
    n_gpu = math.ceil(total_bytes / (hw.gpu.hbm_bytes * spec.get("hbm_usable", 0.9)))
    gpu_only = n_gpu * prices["gpu"]["usd"]
    cxl_gb = ctx.shape.total_expert_bytes * (1 - ctx.budget) / 1e9
    tiered = prices["gpu"]["usd"] + cxl_gb * prices["cxl_per_gb"]["usd"]
    return {
        "hardware": spec["hardware"],
        "model_bytes": total_bytes,
        "gpu_only": {"gpus": n_gpu, "usd": gpu_only},
        "tiered": {"gpus": 1, "cxl_gb": cxl_gb, "usd": tiered},
        "cost_reduction": 1 - tiered / gpu_only,
        "prices": prices,
        "note": "memory-relevant hardware only (GPUs and CXL memory); hosts, power and networking not counted",
    }


def run_experiment(path: str | os.PathLike, out_dir: str | os.PathLike, sections=None) -> dict:
    """Run an experiment file; write results.json and plots into out_dir; return the results."""
    path = Path(path)
    exp = load_yaml(path)
    ctx = _Ctx(exp, path)
    todo = [s for s in SECTIONS if s in exp and (sections is None or s in sections)]
    unknown = set(exp.get("sections_order", [])) - set(SECTIONS)
    if unknown:
        raise ExperimentError(f"{path}: unknown section(s) {sorted(unknown)}; known: {SECTIONS}")
    results = {
        "schema_version": SCHEMA_VERSION,
        "kind": RESULTS_KIND,
        "timing": "simulated",
        "experiment": {"file": str(path), "config": exp},
        "git_commit": git_commit(),
        "trace": {
            "path": str(ctx.trace_dir),
            "model": ctx.ts.metadata.get("model", {}).get("id"),
            "model_hash": ctx.ts.metadata.get("model", {}).get("hash"),
            "L": ctx.ts.metadata["L"],
            "E": ctx.ts.metadata["E"],
            "K": ctx.ts.metadata["K"],
            "rows": len(ctx.ts),
        },
        "target": dataclasses.asdict(ctx.shape),
        "control": ctx.control.describe(),
        "learned_predictor": (
            ctx.learned.describe() | {"row": LEARNED}
            if ctx.learned is not None
            else {"row": None, "skipped": ctx.learned_note}
        ),
        "skipped_policies": {**ctx.skipped, **ctx.refused},
        "energy_sources": ctx.energy.sources,
        "profiles": {},
        "sections": {},
    }
    fns = {
        "headline": section_headline,
        "batch": section_batch,
        "long_context": section_long_context,
        "ablation": section_ablation,
        "failure": section_failure,
        "cost": section_cost,
        "miss_handling": section_miss_handling,
        "host_sensitivity": section_host_sensitivity,
    }
    for s in todo:
        results["sections"][s] = fns[s](ctx, exp[s])
    for name in _profiles_used(exp):
        results["profiles"][name] = load_hardware(name).to_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_jsonable))
    os.replace(tmp, out / "results.json")
    from moecxl.sim.plots import plot_results

    plot_results(results, out)
    return results


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def _profiles_used(exp: dict) -> list[str]:
    names = set()
    for s in SECTIONS:
        spec = exp.get(s) or {}
        names.update(
            h.partition("@")[0] for h in spec.get("hardware", []) if isinstance(spec.get("hardware"), list)
        )
        if isinstance(spec.get("hardware"), str):
            names.add(spec["hardware"])
        names.update(spec.get("striping_hardware", []))
        names.update(h for h, _ in spec.get("runs", []))
        if "baseline" in spec:
            names.add(spec["baseline"]["hardware"])
    return sorted(names)


def load_results(path: str | os.PathLike) -> dict:
    """Read results.json; another kind or schema version is an error naming both versions."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExperimentError(f"{p}: unreadable results file: {e}") from e
    if data.get("kind") != RESULTS_KIND:
        raise ExperimentError(f"{p}: field 'kind' is {data.get('kind')!r}, expected {RESULTS_KIND!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ExperimentError(
            f"{p}: field 'schema_version' is {data.get('schema_version')!r}; this moecxl reads version "
            f"{SCHEMA_VERSION} (rerun eval/simulate.py to regenerate)"
        )
    return data


def simulation_rows(results: dict) -> list[dict]:
    """The headline, batch and long-context runs of a results document as report rows (kind
    `simulation` of moecxl.evaluation.results: profile, policy, budget, batch, prompt_len, timing, ...)."""
    rows = []
    secs = results.get("sections", {})
    runs = [(k, r) for k, r in secs.get("headline", {}).get("rows", {}).items()]
    for part in ("batch", "long_context"):
        for group in secs.get(part, {}).get("rows", {}).values():
            runs += list(group.items()) if isinstance(group, dict) and "skipped" not in group else []
    for key, r in runs:
        profile, _, policy = key.rpartition("/")
        row = {"profile": profile, "policy": policy, "timing": "simulated", "section": key}
        if "skipped" in r:
            rows.append(row | {"skipped": r["skipped"]})
        elif "batch" in r:  # older files lack the row fields: they are skipped by load_results anyway
            rows.append(row | r)
    return rows


__all__ = [
    "run_experiment",
    "load_results",
    "simulation_rows",
    "load_hardware",
    "ExperimentError",
    "SimError",
    "SCHEMA_VERSION",
]
