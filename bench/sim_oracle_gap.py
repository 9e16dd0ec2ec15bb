"""Where the oracle's lead comes from, in simulation: knowing the future for eviction (Belady) against
knowing it for prefetch, beside the best a cache could do with hindsight-static use rates and what the
causal policies reach (every figure simulated, same trace and cost model).

    python bench/sim_oracle_gap.py [--experiment configs/experiments/mixtral-8x7b.yaml]
        [--profile h100-cxl] [--out results/sim/oracle-gap-mixtral-8x7b.json]

Rows:
- oracle: future routing for prefetch and Belady eviction (the issue's limit).
- belady_demand: Belady eviction, demand fetches only (future known for eviction, not for prefetch).
- static_hindsight: moecxl's expected-reuse eviction fed the measured requests' own per-(layer, expert)
  use rates, fixed (a cache that knew the popularity, not the order): a bound on frequency-based eviction.
- moecxl, moecxl_nd, lru: the causal policies (fetch-only; three-way miss handling; mixtral-offloading).
- oracle_nd: the oracle with the three-way miss decision (future known for prefetch and eviction; a miss
  may still be computed on the host): the limit moecxl_nd is measured against, beside the fetch-only one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecxl.config import load_yaml  # noqa: E402
from moecxl.runtime import policies  # noqa: E402
from moecxl.runtime.policies import get_policy  # noqa: E402
from moecxl.sim.experiments import _Ctx, git_commit, load_hardware  # noqa: E402

KEYS = ("tpot_s", "ttft_s", "stall_s", "hit_rate", "bytes_by_tier", "utilisation_by_tier", "exact")


def use_rates_LE(requests, L: int, E: int, warmup: int) -> np.ndarray:
    """Per (layer, expert): the fraction of decode visits of that layer that used the expert."""
    used_LE, visits_L = np.zeros((L, E)), np.zeros(L)
    for req in requests[warmup:]:
        for v in req.visits:
            if v.phase == "decode":
                visits_L[v.layer] += 1
                used_LE[v.layer, list(v.experts)] += 1
    return used_LE / np.maximum(visits_L[:, None], 1)


class _FixedReuse(policies.Reuse):
    """`Reuse` whose use rates are given (hindsight) instead of learned online."""

    rates_LE: np.ndarray = np.zeros((0, 0))

    def observe(self, layer: int, experts) -> None:
        super().observe(layer, experts)
        self.p_LE[:] = self.rates_LE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="configs/experiments/mixtral-8x7b.yaml")
    ap.add_argument("--profile", default="h100-cxl")
    ap.add_argument("--out", default="results/sim/oracle-gap-mixtral-8x7b.json")
    a = ap.parse_args(argv)
    exp = load_yaml(a.experiment)
    exp["policies"] = ["oracle", "moecxl", "moecxl_nd", "lru"]
    exp.pop("miss_handling", None)
    ctx = _Ctx(exp, Path(a.experiment))
    reqs = ctx.requests(batch=1)
    hw = load_hardware(a.profile)
    rows = {}
    for name in ("oracle", "lru", "moecxl", "moecxl_nd"):
        rows[name] = ctx.run(hw, name, reqs)
    rows["oracle_nd"] = ctx.run(
        hw, dataclasses.replace(get_policy("oracle"), name="oracle_nd", host_compute=True), reqs
    )
    rows["belady_demand"] = ctx.run(
        hw, dataclasses.replace(get_policy("lru"), name="belady_demand", evict="belady"), reqs
    )
    _FixedReuse.rates_LE = use_rates_LE(reqs, ctx.shape.L, ctx.shape.E, ctx.warmup)
    sim = importlib.import_module("moecxl.sim.simulate")  # the module (moecxl.sim re-exports the function)
    real = sim.Reuse
    try:
        sim.Reuse = _FixedReuse
        rows["static_hindsight"] = ctx.run(hw, "moecxl", reqs)
    finally:
        sim.Reuse = real
    oracle_tpot = rows["oracle"]["tpot_s"]
    out = {
        "timing": "simulated",
        "profile": a.profile,
        "experiment": a.experiment,
        "trace": str(ctx.trace_dir),
        "git_commit": git_commit(),
        "budget": ctx.budget,
        "rows": {
            k: {key: m[key] for key in KEYS if key in m} | {"tpot_over_oracle": m["tpot_s"] / oracle_tpot}
            for k, m in rows.items()
        },
    }
    for k, r in out["rows"].items():
        gb = sum(r["bytes_by_tier"].values()) / 1e9
        print(
            f"{k:17s} TPOT {r['tpot_s'] * 1e3:7.1f} ms  x{r['tpot_over_oracle']:.2f} of oracle  "
            f"hit {r['hit_rate']:.3f}  moved {gb:7.1f} GB"
        )
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
