"""What batching expert copies changes, simulated (cost model): TPOT with one transfer per expert against
the copies issued together from one tier sent as one transfer (`SimConfig.batch_copies`).

    python bench/sim_copy_batching.py [--experiment configs/experiments/deepseek-v2-lite.yaml]
        [--profiles h100-cxl h100-pcie4-dram] [--policies lru pregate moecxl]
        [--out bench/results/copy-batching-deepseek-v2-lite.json]

Two link models, the same trace and policies: the profiles' (the per-copy fixed cost is latency, which
copies queued on one device overlap with each other's bytes) and a sensitivity where the per-copy
overhead holds the device and the link (`serial_copy_overhead`: a copy engine that cannot set one copy
up while moving the previous one; not a measured figure). Every figure is simulated (cost model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_json  # noqa: E402
from moecxl.config import load_yaml  # noqa: E402
from moecxl.sim.experiments import _Ctx, git_commit, load_hardware  # noqa: E402

LABEL = "simulated (cost model)"
LINKS = {"profile": False, "serial_overhead": True}  # link model -> SimConfig.serial_copy_overhead
KEYS = ("tpot_s", "ttft_s", "stall_s", "hit_rate", "misses", "prefetch_issued", "transfers")


def run_pair(ctx, hw, policy: str, reqs, serial: bool) -> dict:
    """One policy with one transfer per expert and with batched copies, on one link model."""
    out = {}
    for name, batched in (("per_expert", False), ("batched", True)):
        m = ctx.run(hw, policy, reqs, batch_copies=batched, serial_copy_overhead=serial)
        out[name] = {k: m[k] for k in KEYS} | {
            "experts_per_transfer": m["experts_per_transfer"],
            "max_experts_per_transfer": m["max_experts_per_transfer"],
        }
    one, many = out["per_expert"], out["batched"]
    out["tpot_change"] = many["tpot_s"] / one["tpot_s"] - 1.0
    out["ttft_change"] = many["ttft_s"] / one["ttft_s"] - 1.0
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="configs/experiments/deepseek-v2-lite.yaml")
    ap.add_argument("--profiles", nargs="+", default=["h100-cxl", "h100-pcie4-dram"])
    ap.add_argument("--policies", nargs="+", default=["lru", "pregate", "moecxl"])
    ap.add_argument("--out", default="bench/results/copy-batching-deepseek-v2-lite.json")
    a = ap.parse_args(argv)
    exp = load_yaml(a.experiment)
    exp["policies"] = list(a.policies)
    exp.pop("miss_handling", None)
    ctx = _Ctx(exp, Path(a.experiment))
    reqs = ctx.requests(batch=1)
    rows = {}
    for hw_name in a.profiles:
        hw = load_hardware(hw_name)
        for link, serial in LINKS.items():
            for pol in a.policies:
                r = rows[f"{hw_name}/{link}/{pol}"] = run_pair(ctx, hw, pol, reqs, serial)
                print(
                    f"{hw_name:16s} {link:15s} {pol:8s} TPOT {r['per_expert']['tpot_s'] * 1e3:7.2f} -> "
                    f"{r['batched']['tpot_s'] * 1e3:7.2f} ms ({r['tpot_change']:+.2%})  TTFT "
                    f"{r['ttft_change']:+.2%}  experts/transfer {r['batched']['experts_per_transfer']:.2f}  "
                    f"[{LABEL}]"
                )
    doc = {
        "what": "TPOT with copies batched per tier against one transfer per expert",
        "timing": LABEL,
        "command": "python bench/sim_copy_batching.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "experiment": a.experiment,
        "trace": str(ctx.trace_dir),
        "target": ctx.shape.name,
        "expert_bytes": ctx.shape.expert_bytes,
        "budget": ctx.budget,
        "batch": 1,
        "control": ctx.control.describe(),
        "links": {
            "profile": "the profiles' figures: the per-copy fixed cost (latency + copy_overhead_us) is latency, "
            "overlapped by copies queued on one device (memory.transfer.LinkClock)",
            "serial_overhead": "sensitivity, not a measured figure: copy_overhead_us holds the device and the "
            "link, as a copy engine that cannot overlap one copy's setup with the previous copy's bytes",
        },
        "git_commit": git_commit(),
        "rows": rows,
    }
    write_json(a.out, doc)  # temp file, then rename
    return doc


if __name__ == "__main__":
    main()
