"""Published measurements as cases, simulated: how close the cost model comes (every figure simulated).

A case (configs/published/NAME.yaml) holds only what a publication states, plus our stated choices where
it is silent (in `notes`):

    source: "paper: ..., Table 2 (...)"
    target: configs/models/mixtral-8x7b.yaml
    precision: {experts: hqq2, dense: hqq4}          # moecxl.sim.precision
    hardware: configs/hardware/published/t4-pcie3.yaml
    system: mixtral_offloading                       # moecxl.sim.systems
    system_args: {experts_per_layer: 4, speculative: true}
    workload: {batch: 1, prompt_tokens: 128, decode_tokens: 128}
    metric: decode_tokens_per_s                      # METRICS
    published: 2.092
    compare: {system: gpu_only}                      # optional: a ratio check, metric(system) / metric(compare)
    trace: runs/...                                  # optional: else the family's topology-matched traces
    explained: "..."                                 # optional: why a case stays out of range (no factor)

`run_cases` simulates each with the routing traces of the topology-matched trained model and the
software library's costs (the same for every case), and returns rows: case, system, published,
simulated, ratio. Bad input raises `CaseError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from moecxl.memory.tiers import Hardware, HardwareError, copy_time_s
from moecxl.sim.budget import BudgetError, device_budget
from moecxl.sim.costmodel import CostModelError, ModelShape, load_shape, visit_s, with_precision
from moecxl.sim.precision import PrecisionError, precision_of
from moecxl.sim.simulate import SimConfig, SimError, simulate
from moecxl.sim.stack import StackError, kernel_efficiency, stack_of
from moecxl.sim.systems import SystemsError, policy_for, resolve_args, system_of
from moecxl.sim.workload import WorkloadError, activation_matrix, requests_from_trace

REPO = Path(__file__).resolve().parents[2]
METRICS = {
    "decode_tokens_per_s": "decode tokens per second over the batch (batch / TPOT)",
    "tpot_s": "seconds per output token (decode)",
    "ttft_s": "seconds to the first token (prefill)",
    "throughput_tokens_per_s": "tokens (prompt and output) over the run's wall time",
    "layer_load_over_compute": "copy time of one layer's routed experts over that layer's decode compute",
    "expert_load_share": "share of the run's time stalled on expert copies",
}
REQUIRED = ("source", "target", "precision", "hardware", "system", "workload", "metric", "published")
OPTIONAL = ("system_args", "compare", "trace", "notes", "explained", "requests", "warmup_requests")
WORKLOAD_KEYS = ("batch", "prompt_tokens", "decode_tokens")
REQUESTS, WARMUP, LIBRARY = 6, 1, 4  # measured requests, warm-up requests, past requests (MoE-Infinity)
# The topology-matched trained models' traces, as the main job and configs/experiments/ make them.
TRACES = {
    "mixtral": (
        "runs/main/traces/mixtral-topology",
        "models/mixtral-topology",
        [
            "--tokens",
            "16000",
            "--prompt-len",
            "64",
            "--decode-tokens",
            "16",
            "--decode-every",
            "3",
            "--sketch",
            "16",
        ],
    ),
    "switch": (
        "runs/switch-topology/traces",
        "models/switch-topology",
        ["--tokens", "16000", "--prompt-len", "64", "--decode-tokens", "16", "--decode-every", "3"],
    ),
}


class CaseError(ValueError):
    """A case file is wrong or cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class Case:
    path: Path
    source: str
    target: Path
    experts: str
    dense: str
    hardware: Path
    system: str
    system_args: dict
    workload: dict
    metric: str
    published: float
    compare: dict | None = None
    trace: Path | None = None
    notes: str = ""
    explained: str = ""  # why the case stays out of range under the shared assumptions (listed with it)
    requests: int = REQUESTS
    warmup_requests: int = WARMUP

    @property
    def name(self) -> str:
        return self.path.stem


def _resolve(path: Path, value, field: str) -> Path:
    """A path as given: absolute, else from the repository root, else from the case file's folder."""
    if not isinstance(value, str) or not value:
        raise CaseError(f"{path}: {field}: expected a path, got {value!r}")
    p = Path(value)
    for cand in (p, REPO / p, path.resolve().parent / p):
        if cand.is_absolute() and cand.exists():
            return cand
    raise CaseError(
        f"{path}: {field}: {value!r} not found (looked from the repository root and beside the case)"
    )


def load_case(path: str | Path) -> Case:
    """Read and check one case file; every problem names the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CaseError(f"{path}: cannot read the case: {e}") from e
    if not isinstance(data, dict):
        raise CaseError(f"{path}: expected a mapping of {list(REQUIRED)}")
    for k in REQUIRED:
        if k not in data or data[k] is None:
            raise CaseError(f"{path}: {k}: missing (a case needs {list(REQUIRED)})")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise CaseError(
            f"{path}: {unknown[0]}: unknown key; expected {list(REQUIRED)} + optional {list(OPTIONAL)}"
        )
    if not isinstance(data["source"], str) or not re.match(r"^[a-z]+: \S", data["source"]):
        raise CaseError(
            f"{path}: source: expected 'paper: ...' (its kind, then where), got {data['source']!r}"
        )
    prec = data["precision"]
    if not isinstance(prec, dict) or set(prec) != {"experts", "dense"}:
        raise CaseError(f"{path}: precision: expected {{experts: NAME, dense: NAME}}, got {prec!r}")
    for part in ("experts", "dense"):
        try:
            precision_of(prec[part])
        except PrecisionError as e:
            raise CaseError(f"{path}: precision.{part}: {e}") from e
    try:
        system = system_of(data["system"])
        resolve_args(system, data.get("system_args"))
    except SystemsError as e:
        raise CaseError(f"{path}: system: {e}") from e
    wl = data["workload"]
    if not isinstance(wl, dict) or set(wl) != set(WORKLOAD_KEYS):
        raise CaseError(f"{path}: workload: expected exactly {list(WORKLOAD_KEYS)}, got {wl!r}")
    for k in WORKLOAD_KEYS:
        if isinstance(wl[k], bool) or not isinstance(wl[k], int) or wl[k] < 1:
            raise CaseError(f"{path}: workload.{k}: expected a positive integer, got {wl[k]!r}")
    if data["metric"] not in METRICS:
        raise CaseError(f"{path}: metric: unknown metric {data['metric']!r}; known: {sorted(METRICS)}")
    pub = data["published"]
    if isinstance(pub, bool) or not isinstance(pub, (int, float)) or not pub > 0:
        raise CaseError(f"{path}: published: expected the published figure (a number > 0), got {pub!r}")
    compare = data.get("compare")
    if compare is not None:
        if (
            not isinstance(compare, dict)
            or "system" not in compare
            or set(compare) - {"system", "system_args"}
        ):
            raise CaseError(
                f"{path}: compare: expected {{system: NAME, system_args: {{...}}}}, got {compare!r}"
            )
        try:
            resolve_args(system_of(compare["system"]), compare.get("system_args"))
        except SystemsError as e:
            raise CaseError(f"{path}: compare.system: {e}") from e
    counts = {}
    for k, default in (("requests", REQUESTS), ("warmup_requests", WARMUP)):
        v = data.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "requests" else 0):
            raise CaseError(f"{path}: {k}: expected an integer >= {1 if k == 'requests' else 0}, got {v!r}")
        counts[k] = v
    return Case(
        path=path,
        source=data["source"],
        target=_resolve(path, data["target"], "target"),
        experts=prec["experts"],
        dense=prec["dense"],
        hardware=_resolve(path, data["hardware"], "hardware"),
        system=data["system"],
        system_args=dict(data.get("system_args") or {}),
        workload=dict(wl),
        metric=data["metric"],
        published=float(pub),
        compare=compare,
        trace=_resolve(path, data["trace"], "trace") if data.get("trace") else None,
        notes=str(data.get("notes") or "").strip(),
        explained=" ".join(str(data.get("explained") or "").split()),
        **counts,
    )


# ---- traces -----------------------------------------------------------------------------------------------
def collect_command(family: str) -> list[str]:
    out, model, args = TRACES[family]
    return [sys.executable, "-m", "moecxl.traces", "collect", "--model", model, "--corpus", "mixed", "--split",
            "test", *args, "--out", out]  # fmt: skip


def trace_dir(case: Case, family: str, make: bool) -> Path:
    """The case's trace, else its family's topology-matched traces (collected here when `make`)."""
    if case.trace is not None:
        return case.trace
    if family not in TRACES:
        raise CaseError(f"{case.path}: trace: no default traces for family {family!r}; name a trace")
    p = REPO / TRACES[family][0]
    if (p / "metadata.json").exists():
        return p
    cmd = collect_command(family)
    if not make:
        raise CaseError(
            f"{case.path}: trace: {p} is absent; make it with `{' '.join(cmd[1:])}` (about a minute on 2 cores; "
            "the main job `python -m moecxl` writes the Mixtral one), or pass --make-traces"
        )
    print(f"[reproduce] collecting {family} traces: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return p


class _Traces:
    """Traces read once per run, with what each policy needs of them (pre-gate guesses, past requests)."""

    def __init__(self, make: bool):
        self.make = make
        self.sets: dict = {}
        self.pregate: dict = {}

    def get(self, case: Case, shape: ModelShape):
        from moecxl.traces import read_traces

        p = trace_dir(case, shape.family, self.make)
        if p not in self.sets:
            self.sets[p] = read_traces(p)
        ts = self.sets[p]
        model = ts.metadata.get("model") or {}
        fam = model.get("family") if isinstance(model, dict) else None
        if fam is not None and fam != shape.family:
            raise CaseError(
                f"{case.path}: trace: {p} is routing of a {fam!r} model ({model.get('id')}) but target "
                f"{case.target.name} is a {shape.family!r} model: use a trace of a topology-matched model"
            )
        return p, ts

    def pregate_tops(self, p: Path, ts, horizon: int):
        key = (p, horizon)
        if key not in self.pregate:
            import moecxl
            from moecxl.sim.predict import pregate_tops_for_trace

            model_path = (ts.metadata.get("model") or {}).get("path")
            mp = Path(model_path) if model_path else None
            if mp is not None and not mp.is_absolute():
                mp = REPO / mp
            if mp is None or not mp.exists():
                raise CaseError(f"{p}: pre-gating needs the trace's model ({model_path!r}), not found")
            self.pregate[key] = pregate_tops_for_trace(moecxl.load(mp), ts, horizon)
        return self.pregate[key]


# ---- one run ------------------------------------------------------------------------------------------------
def deployed_shape(case: Case) -> ModelShape:
    try:
        shape = load_shape(case.target)
    except CostModelError as e:
        raise CaseError(f"{case.path}: target: {e}") from e
    e, d = precision_of(case.experts), precision_of(case.dense)
    return with_precision(
        shape, e.bytes_per_param, d.bytes_per_param, kernel_efficiency(e.kernel), kernel_efficiency(d.kernel)
    )


def effective_hardware(hw: Hardware, pinned: bool, write_back: bool, where: str) -> Hardware:
    """The profile as the system's copies see it: links at their pageable rate for pageable host memory,
    and at half rate where every copy also moves its victim back over the same stream."""
    links = []
    for link in hw.links:
        rate = link.gbps
        if not pinned:
            if link.pageable_gbps is None:
                raise CaseError(
                    f"{where}: link {link.name!r} has no pageable_gbps; the system copies from pageable memory"
                )
            rate = link.pageable_gbps
        links.append(dataclasses.replace(link, gbps=rate / (2.0 if write_back else 1.0)))
    return dataclasses.replace(hw, links=tuple(links))


def _host_tier(hw: Hardware):
    tiers = [t for t in hw.tiers if t.kind != "hbm"]
    if not tiers:
        raise CaseError(f"hardware {hw.name!r}: no host tier to hold experts")
    return tiers[0]


def run_one(case: Case, system_name: str, given_args: dict, traces: _Traces) -> dict:
    """Simulate one system on a case's deployment; returns the metrics (`timing: simulated`)."""
    where = str(case.path)
    system = system_of(system_name)
    args = resolve_args(system, given_args)
    try:
        stack = stack_of(args["stack"])
    except StackError as e:
        raise CaseError(f"{where}: system_args.stack: {e}") from e
    try:
        hw = Hardware.from_yaml(case.hardware)
    except HardwareError as e:
        raise CaseError(f"{where}: hardware: {e}") from e
    shape = deployed_shape(case)
    wl = case.workload
    e_prec, d_prec = precision_of(case.experts), precision_of(case.dense)
    k = args.get("experts_per_layer")
    fixed = None
    if system.fixed_cache:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= shape.E:
            raise CaseError(f"{where}: system_args.experts_per_layer: expected 0..{shape.E}, got {k!r}")
        fixed = k * shape.L
    try:
        budget = device_budget(
            shape,
            gpu_bytes=hw.gpu.hbm_bytes,
            experts=e_prec,
            dense=d_prec,
            batch=wl["batch"],
            context_tokens=wl["prompt_tokens"] + wl["decode_tokens"],
            workspace_bytes=stack.workspace_of(hw.gpu.hbm_bytes),
            fixed_experts=fixed,
            where=f"{where}: hardware ({hw.gpu.name})",
        )
    except BudgetError as e:
        raise CaseError(str(e)) from e
    total = shape.L * shape.E * shape.expert_bytes
    if system.fits_all and budget.experts_bytes < total:
        raise CaseError(
            f"{where}: hardware: {system.name} needs every expert on the GPU ({total / 1e9:.2f} GB) but "
            f"{budget.experts_bytes / 1e9:.2f} GB is left after dense weights, KV cache and workspace"
        )
    if args["expert_slots"] is not None and args["expert_slots"] * shape.expert_bytes > budget.experts_bytes:
        raise CaseError(
            f"{where}: system_args.expert_slots: {args['expert_slots']} experts need "
            f"{args['expert_slots'] * shape.expert_bytes / 1e9:.2f} GB; {budget.experts_bytes / 1e9:.2f} GB is left"
        )
    policy = policy_for(system, args)
    hw_eff = effective_hardware(hw, args["pinned"], system.write_back and bool(k), where)
    if case.metric == "layer_load_over_compute":
        return _load_over_compute(shape, hw_eff, stack, wl)
    p, ts = traces.get(case, shape)
    pregate = traces.pregate_tops(p, ts, policy.horizon) if policy.needs_pregate else None
    kw = dict(batch=wl["batch"], pregate_NLHK=pregate)
    try:
        lib = requests_from_trace(ts, shape, max_requests=LIBRARY, **kw)
        reqs = requests_from_trace(
            ts,
            shape,
            skip_sequences=LIBRARY,
            max_requests=case.requests + case.warmup_requests,
            decode_tokens=wl["decode_tokens"],
            prompt_tokens=wl["prompt_tokens"],
            **kw,
        )
    except WorkloadError as e:
        raise CaseError(f"{where}: trace: {p}: {e}") from e
    library = [activation_matrix(r, shape.L, shape.E) for r in lib]
    max_inflight = shape.E if system.stages_layer else max(2, shape.K)
    # A fixed cache or gpu_only: the policy sizes its cache; give it the bytes it says (+ copies in flight).
    # k = 0 (nothing cached): staging for one layer's routed experts (a prefill may route to all E).
    slots = fixed if fixed else (shape.E if fixed == 0 else None)
    if slots is None:
        slots = shape.L * shape.E if system.fits_all else args["expert_slots"]
    dev = (slots + max_inflight) * shape.expert_bytes if slots is not None else budget.experts_bytes
    budget_slots = int(dev // shape.expert_bytes) - max_inflight
    cfg = SimConfig(
        policy=policy,
        device_budget=float(dev),
        max_inflight=max_inflight,
        warmup_requests=case.warmup_requests,
        control_s=stack.layer_overhead_s + _dense_stream_s(system, policy, shape, hw_eff, budget_slots),
    )
    try:
        res = simulate(reqs, shape, hw_eff, cfg, freq_LE=np.sum(library, axis=0) + 1e-3, eam_library=library)
    except SimError as e:
        raise CaseError(f"{where}: {e}") from e
    m = res.metrics
    m["budget"] = budget.as_dict()
    return m


def _dense_stream_s(system, policy, shape: ModelShape, hw: Hardware, budget_slots: int) -> float:
    """Seconds per MoE-layer visit a system spends copying the non-expert weights of offloaded layers
    (synchronous, at the copies' link rate), averaged over the layers: 0 unless it offloads them."""
    if not system.offloads_dense:
        return 0.0
    resident = getattr(policy, "resident", None)
    r = resident(shape.L, shape.E, budget_slots) if callable(resident) else 0
    share = max(0, shape.L - r) / shape.L
    layer_bytes = int(shape.dense_linear_params * shape.dense_bytes_per_param)
    return share * copy_time_s(_host_tier(hw), layer_bytes, hw)


def _load_over_compute(shape: ModelShape, hw: Hardware, stack, wl: dict) -> dict:
    tier = _host_tier(hw)
    load_s = shape.K * copy_time_s(tier, shape.expert_bytes, hw)
    ctx = wl["prompt_tokens"] + wl["decode_tokens"] // 2
    compute_s = visit_s(shape, hw.gpu, wl["batch"], shape.K, ctx, wl["batch"], False) + stack.layer_overhead_s
    return {"layer_load_s": load_s, "layer_compute_s": compute_s, "timing": "simulated"}


def metric_of(metric: str, m: dict, batch: int) -> float:
    if metric == "decode_tokens_per_s":
        return batch / m["tpot_s"]  # all sequences of the batch: batch / TPOT (1 / TPOT at batch 1)
    if metric == "tpot_s":
        return m["tpot_s"]
    if metric == "ttft_s":
        return m["ttft_s"]
    if metric == "throughput_tokens_per_s":
        return m["tokens_per_s"]
    if metric == "layer_load_over_compute":
        return m["layer_load_s"] / m["layer_compute_s"]
    if metric == "expert_load_share":
        return m["stall_s"] / m["wall_s"]
    raise CaseError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")


def run_case(case: Case, traces: _Traces) -> dict:
    """One case: the simulated figure (or ratio against `compare`) beside the published one. A system
    whose policy is not available yet gives a row with `error` and no figure."""
    try:
        return _run_case(case, traces)
    except SystemsError as e:
        return {"case": case.name, "system": case.system, "metric": case.metric, "published": case.published,
                "simulated": None, "ratio": None, "error": f"{case.path}: {e}", "file": str(case.path)}  # fmt: skip


def _run_case(case: Case, traces: _Traces) -> dict:
    m = run_one(case, case.system, case.system_args, traces)
    value = metric_of(case.metric, m, case.workload["batch"])
    row = {
        "case": case.name,
        "system": case.system,
        "metric": case.metric,
        "published": case.published,
        "simulated": value,
        "source": case.source,
        "file": str(case.path),
        "details": _details(m),
    }
    if case.compare is not None:
        m2 = run_one(case, case.compare["system"], case.compare.get("system_args") or {}, traces)
        other = metric_of(case.metric, m2, case.workload["batch"])
        row["simulated"] = value / other
        row["metric"] = f"{case.metric} ratio vs {case.compare['system']}"
        row["details"] = {"system": _details(m), "compare": _details(m2), "values": [value, other]}
    row["ratio"] = row["simulated"] / row["published"]
    if case.explained:
        row["explained"] = case.explained
    return row


def _details(m: dict) -> dict:
    keys = ("tpot_s", "ttft_s", "tokens_per_s", "hit_rate", "stall_s", "wall_s", "device_slots", "budget",
            "layer_load_s", "layer_compute_s", "prefetch_issued", "prefetch_used", "miss_choices")  # fmt: skip
    return {k: m[k] for k in keys if k in m}


def run_cases(paths, make_traces: bool = True) -> list[dict]:
    """Every case (all checked before any runs), simulated in order."""
    cases = [load_case(p) for p in paths]
    traces = _Traces(make_traces)
    return [run_case(c, traces) for c in cases]


def summary(rows: list[dict]) -> dict:
    ran = [r for r in rows if r.get("ratio") is not None]
    ratios = [r["ratio"] for r in ran]
    return {
        "cases": len(rows),
        "not_run": len(rows) - len(ran),
        "within_0.75_1.33": sum(0.75 <= x <= 1.33 for x in ratios),
        "median_abs_ratio_minus_1": statistics.median(abs(x - 1) for x in ratios) if ratios else None,
        "worst": max(ran, key=lambda r: abs(np.log(r["ratio"])))["case"] if ran else None,
    }


def markdown(rows: list[dict]) -> str:
    s = summary(rows)
    lines = [
        "Simulated on moecxl's cost model (roofline GPU, LinkClock copies, the software library's stack "
        "costs) with the topology-matched trained model's routing traces; published figures as the sources state.",
        "",
        "| case | system | metric | published | simulated | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ratio") is None:
            lines.append(
                f"| {r['case']} | {r['system']} | {r['metric']} | {r['published']:.4g} | not run | - |"
            )
            continue
        lines.append(
            f"| {r['case']} | {r['system']} | {r['metric']} | {r['published']:.4g} | {r['simulated']:.4g} | "
            f"{r['ratio']:.2f} |"
        )
    med = s["median_abs_ratio_minus_1"]
    ran = s["cases"] - s["not_run"]
    lines += [
        "",
        f"{s['within_0.75_1.33']}/{ran} ratios within 0.75-1.33; median |ratio - 1| = {med:.3f}"
        + (f"; {s['not_run']} not run (see results.json)" if s["not_run"] else "")
        if med is not None
        else "no case ran",
    ]
    off = [r for r in rows if r.get("ratio") is not None and not 0.75 <= r["ratio"] <= 1.33]
    if off:
        lines += ["", "Out of range, with the reason (no per-case factor):", ""]
        lines += [f"- {r['case']} ({r['ratio']:.2f}): {r.get('explained') or 'not explained'}" for r in off]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"timing": "simulated", "summary": summary(rows), "rows": rows}, indent=1, default=float)
    )
    (out / "results.md").write_text(markdown(rows))
    return out
