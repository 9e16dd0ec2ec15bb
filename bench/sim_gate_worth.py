"""The cost-benefit gate's worth in simulation: moecxl with the gate, without it (prefetch every predicted
expert), and with no prefetch, on the same trace and cost model (every figure simulated).

    python bench/sim_gate_worth.py [--experiment configs/experiments/mixtral-8x7b.yaml]
        [--profiles h100-cxl h100-pcie5-dram] [--out results/sim/gate-worth-mixtral-8x7b.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_json  # noqa: E402
from moecxl.config import load_yaml  # noqa: E402
from moecxl.runtime.policies import get_policy  # noqa: E402
from moecxl.sim.experiments import _Ctx, git_commit, load_hardware  # noqa: E402

KEYS = (
    "tpot_s",
    "ttft_s",
    "stall_s",
    "hit_rate",
    "prefetch_issued",
    "prefetch_used",
    "wasted_prefetch_bytes",
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="configs/experiments/mixtral-8x7b.yaml")
    ap.add_argument("--profiles", nargs="+", default=["h100-cxl", "h100-pcie5-dram"])
    ap.add_argument("--out", default="results/sim/gate-worth-mixtral-8x7b.json")
    a = ap.parse_args(argv)
    exp = load_yaml(a.experiment)
    exp["policies"] = ["moecxl"]
    exp.pop("miss_handling", None)
    ctx = _Ctx(exp, Path(a.experiment))
    reqs = ctx.requests(batch=1)
    full = get_policy("moecxl")
    variants = {
        "gate": full,
        "no_gate": dataclasses.replace(full, name="moecxl-nogate", gate=False),
        "no_prefetch": dataclasses.replace(full, name="moecxl-noprefetch", prefetch=None, horizon=0),
    }
    rows = {}
    for hw_name in a.profiles:
        hw = load_hardware(hw_name)
        for name, pol in variants.items():
            m = ctx.run(hw, pol, reqs, placement="frequency")
            rows[f"{hw_name}/{name}"] = {k: m[k] for k in KEYS} | {"gated_prefetches": m["gated_prefetches"]}
            r = rows[f"{hw_name}/{name}"]
            print(
                f"{hw_name:16s} {name:12s} TPOT {r['tpot_s'] * 1e3:8.1f} ms  stall {r['stall_s']:6.2f} s  "
                f"prefetches {r['prefetch_issued']} (used {r['prefetch_used']}, gated {r['gated_prefetches']})  "
                f"wasted {r['wasted_prefetch_bytes'] / 1e9:.1f} GB"
            )
    doc = {
        "timing": "simulated",
        "experiment": a.experiment,
        "trace": str(ctx.trace_dir),
        "target": ctx.shape.name,
        "budget": ctx.budget,
        "batch": 1,
        "git_commit": git_commit(),
        "rows": rows,
    }
    write_json(a.out, doc)  # temp file, then rename
    return 0


if __name__ == "__main__":
    sys.exit(main())
