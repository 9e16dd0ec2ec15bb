"""Control-plane overhead of the offload engine per MoE layer per decode step (issue #4: goal <= 20 us median).

Control time is what `OffloadEngine.experts` spends after the layer's top-k ids reach the host, less the
time blocked on copies in flight and on host-computed experts (`stall_s`): policy, bookkeeping, dispatch
of installs and copies. That is the critical path: the layer's expert step cannot launch before it. The
policy's prefetch decisions run after the launch (`after_experts`), overlapping the device's compute;
their time is reported apart. The end-to-end figure is what the engine adds to a decode step beyond the
resident model's step and the stalls: (engine TPOT - its decode stall per token - resident TPOT) / layers. Cases: every expert resident in the cache (hits only), and lru / moecxl / oracle /
pregate at a 25% budget with emulated links. Each case runs `--repeats` generations after a warm-up one;
the figure is the median over all decode-layer samples, also split by whether the layer had a miss.
Usage (figures in bench/results/control.json were made with):
    python bench/bench_control.py --model models/mixtral-topology --tokens 32 --repeats 5

`--table`: the simulator's control-cost table instead. Every policy (and `moecxl_learned` with
`--predictor DIR`) at each `--batches` size, samples pooled over `--budgets` (so that both hit and miss
layers occur): per (policy, batch) the median control us of hit layers, of miss layers, of all decode
visits, and the after-dispatch us per decode visit (0 where a visit had none). Writes the JSON to
`--out` and, with `--config-out`, the control file the simulator reads (moecxl.sim.control):
    python bench/bench_control.py --table --batches 1 16 --tokens 12 --repeats 2 \
        --predictor runs/issue20/predictor/predictor --out bench/results/control-table-cpu-2core.json \
        --config-out configs/control/cpu-2core.yaml --machine-note "2-core CPU VM (shared)"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_offload import MIXTRAL_8X7B, load_model, prompts  # noqa: E402
from bench.common import machine, write_json  # noqa: E402
from moecxl.generate import generate  # noqa: E402
from moecxl.memory import Hardware  # noqa: E402
from moecxl.runtime.engine import OffloadEngine, calibrate_time_scale  # noqa: E402
from moecxl.runtime.policies import POLICIES  # noqa: E402
from moecxl.sim.workload import activation_matrix, requests_from_generate  # noqa: E402

CASES = {  # name -> (policy, budget: fraction of expert bytes, or "all" = every expert plus staging)
    "hits_only": ("lru", "all"),
    "lru_25": ("lru", 0.25),
    "moecxl_25": ("moecxl", 0.25),
    "oracle_25": ("oracle", 0.25),
    "pregate_25": ("pregate", 0.25),
}


def _samples(engine, model, x, tokens):
    """Decode-layer control samples: (wall us, main-thread CPU us, whether the layer missed).

    The CPU figure is the thread's CPU time over the whole `experts` call: blocked waits (the ids sync,
    copies in flight) use none, and neither do other threads or processes, so it is the control plane's
    own work, robust to the machine's load (it includes the few us of the ids read-back itself)."""
    out, inner = [], engine.experts

    decode_stall = [0.0]

    def experts(m, co):
        misses = sum(engine.c.misses)
        n = len(engine.c.control_samples_us)
        stall0 = engine.c.stall_s
        t0 = time.thread_time_ns()
        r = inner(m, co)
        cpu_us = (time.thread_time_ns() - t0) / 1e3
        if len(engine.c.control_samples_us) > n:
            out.append((engine.c.control_samples_us[-1], cpu_us, sum(engine.c.misses) > misses))
            decode_stall[0] += engine.c.stall_s - stall0
        return r

    engine.experts = experts
    res = generate(model, x, max_new_tokens=tokens, engine=engine)
    return out, res, decode_stall[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mixtral-topology")
    ap.add_argument("--profile", default="configs/hardware/h100-cxl.yaml")
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="", help="free text stored with the figures (e.g. before/after)")
    ap.add_argument("--out", default="bench/results/control.json")
    ap.add_argument("--table", action="store_true", help="per-policy, per-batch table for the simulator")
    ap.add_argument("--policies", nargs="+", default=None, help="--table: policies (default: all)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.75])
    ap.add_argument("--predictor", default=None, help="--table: a predictor checkpoint: adds moecxl_learned")
    ap.add_argument("--config-out", default=None, help="--table: write the simulator's control file here")
    ap.add_argument("--machine-note", default="", help="--table: the machine in words, for the source")
    ap.add_argument("--config-from", default=None, help="write --config-out from this --table JSON, no run")
    args = ap.parse_args(argv)
    if args.config_from:
        write_control_config(
            json.loads(Path(args.config_from).read_text()), args.config_from, args.config_out
        )
        return print(f"wrote {args.config_out}")
    if args.table:
        return table(args, argv)
    model, model_src = load_model(args.model)
    x = prompts(model, 1, args.prompt_len)
    ref = generate(model, x, max_new_tokens=args.tokens)
    n_layers = len(ref.expert_ids)
    resident_tpot_s = float(
        np.median(
            [generate(model, x, max_new_tokens=args.tokens).metrics["tpot_s"] for _ in range(args.repeats)]
        )
    )
    hw = Hardware.from_yaml(args.profile)
    scale = calibrate_time_scale(model, hw, MIXTRAL_8X7B)
    rows = []
    for name in args.cases:
        policy, budget = CASES[name]

        def engine(policy=policy, budget=budget):
            eng = OffloadEngine(
                model,
                hardware=hw,
                policy=policy,
                device_budget=1.0,
                emulate=True,
                time_scale=scale,
                target_model=MIXTRAL_8X7B,
                trace=ref if policy == "oracle" else None,
            )
            if budget == "all":
                need = (eng.L * eng.E + eng.max_inflight) * eng.expert_bytes
                eng.close()
                budget = float(need)
            else:
                eng.close()
            return OffloadEngine(
                model,
                hardware=hw,
                policy=policy,
                device_budget=budget,
                emulate=True,
                time_scale=scale,
                target_model=MIXTRAL_8X7B,
                trace=ref if policy == "oracle" else None,
            )

        warm = engine()
        generate(model, x, max_new_tokens=4, engine=warm)  # compile this policy's steps
        warm.close()
        samples, loads, exact, hit_rates, added_us, after_us = [], [], True, [], [], []
        for _ in range(args.repeats):
            eng = engine()
            s, res, stall_s = _samples(eng, model, x, args.tokens)
            steps = res.metrics["new_tokens"] - 1
            tpot_less_stall = res.metrics["tpot_s"] - stall_s / steps
            added_us.append((tpot_less_stall - resident_tpot_s) / n_layers * 1e6)
            after_us += eng.c.control_after_samples_us
            loads.append(os.getloadavg()[0])
            exact &= bool(np.array_equal(res.logits, ref.logits))
            hit_rates.append(res.metrics["hit_rate"])
            samples += s
            eng.close()
        us = np.array([s for s, _, _ in samples])
        cpu_us = np.array([c for _, c, _ in samples])
        miss = np.array([m for _, _, m in samples], bool)

        def med(a):
            return float(np.median(a)) if len(a) else None

        rows.append(
            {
                "case": name,
                "policy": policy,
                "budget": budget,
                "control_us_median_decode": med(us),
                "control_us_p90_decode": float(np.percentile(us, 90)),
                "after_dispatch_us_median_decode": med(np.array(after_us)),
                "added_us_per_layer_end_to_end": float(np.median(added_us)),
                "added_us_per_layer_by_repeat": added_us,
                "control_us_median_hit_layers": med(us[~miss]),
                "control_cpu_us_median_decode": med(cpu_us),
                "control_cpu_us_median_hit_layers": med(cpu_us[~miss]),
                "control_cpu_us_median_miss_layers": med(cpu_us[miss]),
                "control_us_median_miss_layers": med(us[miss]),
                "miss_layer_fraction": float(miss.mean()),
                "samples": int(len(us)),
                "hit_rate": float(np.mean(hit_rates)),
                "bit_identical_to_resident": exact,
                "load_avg_1m": loads,
            }
        )
        r = rows[-1]
        print(
            f"{name:>11}: control median {r['control_us_median_decode']:7.1f} us (hit layers "
            f"{r['control_us_median_hit_layers'] or 0:6.1f}, miss layers {r['control_us_median_miss_layers'] or 0:7.1f}, "
            f"{r['miss_layer_fraction']:.2f} missed)  p90 {r['control_us_p90_decode']:7.1f}  "
            f"after {r['after_dispatch_us_median_decode'] or 0:6.1f}  added e2e {r['added_us_per_layer_end_to_end']:7.1f}  "
            f"cpu {r['control_cpu_us_median_decode']:7.1f} us  "
            f"hit {r['hit_rate']:.3f}  exact={exact}  load {np.median(loads):.2f}",
            flush=True,
        )
    out = {
        "timing": "emulated links (copies real, completion delayed to the profile, time-scaled)",
        "goal_us_median": 20.0,
        "label": args.label,
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "model": model_src,
        "profile": hw.name,
        "time_scale": scale,
        "tokens": args.tokens,
        "resident_tpot_s": resident_tpot_s,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")


def _table_engine(model, hw, scale, policy, budget, ref, predictor):
    kw = {}
    if policy == "moecxl_learned":
        policy, kw["predictor"] = "moecxl", predictor
    spec = POLICIES[policy]
    if spec.prefetch == "oracle" or spec.evict == "belady":
        kw["trace"] = ref
    if spec.prefetch == "eam":
        L, E = len(ref.expert_ids), model.cfg.num_experts
        kw["eam_library"] = [activation_matrix(requests_from_generate(ref)[0], L, E)]
    return OffloadEngine(
        model,
        hardware=hw,
        policy=policy,
        device_budget=budget,
        emulate=True,
        time_scale=scale,
        target_model=MIXTRAL_8X7B,
        **kw,
    )


def _med(a) -> float | None:
    return float(np.median(a)) if len(a) else None


def table(args, argv) -> None:
    """Control-plane medians per policy and batch size (hit layers, miss layers, after dispatch)."""
    model, model_src = load_model(args.model)
    hw = Hardware.from_yaml(args.profile)
    scale = calibrate_time_scale(model, hw, MIXTRAL_8X7B)
    policies = list(args.policies or POLICIES)
    if args.predictor and "moecxl_learned" not in policies:
        policies.append("moecxl_learned")
    rows = []
    for batch in args.batches:
        x = prompts(model, batch, args.prompt_len)
        ref = generate(model, x, max_new_tokens=args.tokens)
        for policy in policies:
            samples, after, hit_rates, t0 = [], [], [], time.perf_counter()
            for budget in args.budgets:
                warm = _table_engine(model, hw, scale, policy, budget, ref, args.predictor)
                generate(model, x, max_new_tokens=4, engine=warm)  # compile this policy's steps
                warm.close()
                for _ in range(args.repeats):
                    eng = _table_engine(model, hw, scale, policy, budget, ref, args.predictor)
                    s, res, _ = _samples(eng, model, x, args.tokens)
                    a = list(eng.c.control_after_samples_us)
                    after += a + [0.0] * max(0, len(s) - len(a))  # a visit without after-work: 0
                    samples += s
                    hit_rates.append(res.metrics["hit_rate"])
                    eng.close()
            us = np.array([w for w, _, _ in samples])
            miss = np.array([m for _, _, m in samples], bool)
            rows.append(
                {
                    "policy": policy,
                    "batch": batch,
                    "budgets": args.budgets,
                    "hit_us": _med(us[~miss]),
                    "miss_us": _med(us[miss]),
                    "decode_us": _med(us),
                    "after_us": _med(np.array(after)),
                    "hit_samples": int((~miss).sum()),
                    "miss_samples": int(miss.sum()),
                    "hit_rate": float(np.mean(hit_rates)),
                    "load_avg_1m": os.getloadavg()[0],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            r = rows[-1]
            print(
                f"{policy:>15} batch {batch:>2}: hit {r['hit_us'] or 0:8.1f} us ({r['hit_samples']:4d})  miss "
                f"{r['miss_us'] or 0:8.1f} us ({r['miss_samples']:4d})  decode {r['decode_us']:8.1f}  after "
                f"{r['after_us']:7.1f}  hit rate {r['hit_rate']:.2f}  load {r['load_avg_1m']:.2f}  {r['seconds']} s",
                flush=True,
            )
    out = {
        "kind": "control-table",
        "timing": "emulated links (copies real, completion delayed to the profile, time-scaled); control "
        "is wall time on the host less stalls (OffloadEngine.experts), after = prefetch decisions after dispatch",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine() | {"note": args.machine_note},
        "date": time.strftime("%Y-%m-%d"),
        "model": model_src,
        "predictor": args.predictor,
        "profile": hw.name,
        "time_scale": scale,
        "tokens": args.tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")
    if args.config_out:
        write_control_config(out, args.out, args.config_out)
        print(f"wrote {args.config_out}")


# Policies the --table run does not measure, charged as a measured one whose control plane is the same
# code path (moecxl.sim.control's same_as), with why; a policy measured in the run is not mapped.
SAME_AS = {
    "moecxl-no-prefetch": (
        "moecxl",
        "the ablation's moecxl without prefetch: moecxl's decisions (its after-dispatch time overstated)",
    ),
    "gpu_only": (
        "on_demand",
        "every expert resident: each visit takes the hit path (lookups, no miss decision, no prefetch), "
        "which on_demand's hit layers measured",
    ),
    "accelerate": (
        "on_demand",
        "a streamed layer's experts are fetched on demand (all E of it), no prefetch, released after: "
        "on_demand's miss path (per-expert fetch issue); it understates a batch-1 visit, which issues E "
        "copies where on_demand issues K",
    ),
    "deepspeed_zero": (
        "on_demand",
        "routed experts fetched on demand and released after use, no prefetch: on_demand's miss path plus"
        " a release of the previous layer's slots",
    ),
    "mixtral_offloading": (
        "pregate",
        "an LRU victim per miss and, speculative, the next layer's router on this hidden state prefetched"
        " one layer ahead: pregate's decisions (per-layer LRU scans one layer's slots, fewer than "
        "pregate's global LRU; without speculative loading its after-dispatch time is overstated where "
        "compute does not hide it)",
    ),
    "fiddler": (
        "moecxl_host",
        "each miss decided host-or-copy (its own 7-per-token vs 70-per-copy rule where moecxl_host has "
        "its gate) and the host's experts queued and computed (host_time_s, run_host): moecxl_host's miss"
        " path; Fiddler prefetches nothing, so moecxl_host's after-dispatch time overstates it where "
        "compute does not hide it",
    ),
    "prefetch_all": (
        "pregate",
        "one-layer-ahead prefetch issued after dispatch with an LRU victim per copy: pregate's decision "
        "path; it issues E candidates per visit where pregate issues about K, so its after-dispatch time "
        "is understated (hidden behind compute in most visits)",
    ),
    "pregated": (
        "pregate",
        "the next layer's selected experts prefetched one layer ahead with an LRU victim per copy: "
        "pregate's decision path, its selection read from the routing rather than computed by a router "
        "(pregate's figure overstates that part)",
    ),
}


MIN_SAMPLES = 20  # a hit or miss median from fewer samples is not used for the control file


def write_control_config(bench: dict, bench_path: str, dst: str) -> None:
    """The simulator's control file (moecxl.sim.control) from a --table run. A hit or miss cell with
    fewer than MIN_SAMPLES samples (e.g. no hit layer at batch 32: every layer misses) takes the same
    policy's figure at the nearest batch size that has them, else the policy's decode median; the file
    lists each such cell under source.filled."""
    import yaml

    by_policy: dict = {}
    for r in bench["rows"]:
        by_policy.setdefault(r["policy"], []).append(r)
    policies: dict = {}
    filled = []
    for pol, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        for r in rows:
            cell = {}
            for f in ("hit", "miss"):
                v = r[f"{f}_us"] if r[f"{f}_samples"] >= MIN_SAMPLES else None
                if v is None:
                    ok = [q for q in rows if q[f"{f}_samples"] >= MIN_SAMPLES]
                    near = min(ok, key=lambda q: abs(math.log2(q["batch"] / r["batch"])), default=None)
                    v = near[f"{f}_us"] if near is not None else r["decode_us"]
                    how = f"batch {near['batch']}" if near is not None else "decode median"
                    filled.append(f"{pol}@{r['batch']}.{f}_us ({r[f'{f}_samples']} samples): {how}")
                cell[f"{f}_us"] = round(float(v), 1)
            cell["after_us"] = round(float(r["after_us"] or 0.0), 1)
            policies.setdefault(pol, {})[int(r["batch"])] = cell
    m = bench["machine"]
    doc = {
        "idealised": False,
        "source": {
            "bench": bench_path,
            "machine": f"{m.get('note') or 'CPU'}: {m['cpus']} CPUs, {m['processor']}, {m['platform']}, "
            f"jax {m['jax']} ({m['jax_backend']}), commit {m['commit']}",
            "date": bench["date"],
            "command": bench["command"],
            "what": "median wall us per decode MoE-layer visit of OffloadEngine's control plane (less stalls) "
            f"on {bench['model']} with emulated {bench['profile']} links, samples pooled over device budgets "
            f"{bench['rows'][0]['budgets']}; hit/miss layers; after = prefetch decisions after the expert step's "
            "dispatch, per visit (0 where none)",
            "filled": filled,
        },
        "same_as": {
            pol: {"as": other, "why": why}
            for pol, (other, why) in SAME_AS.items()
            if pol not in policies and other in policies
        },
        "policies": policies,
    }
    head = (
        "# Control-plane seconds per MoE-layer visit, measured by bench/bench_control.py --table (see source).\n"
        "# The simulator charges hit_us or miss_us per visit, plus after_us beyond the visit's compute\n"
        "# (moecxl.sim.control). Regenerate with the command under source.\n"
    )
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dst).with_suffix(".tmp")
    tmp.write_text(head + yaml.safe_dump(doc, sort_keys=False, width=200))
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()
