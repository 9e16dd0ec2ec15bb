"""The cost-benefit gate's worth on emulated links: each policy with its gate, without it (prefetch every
predicted expert) and with no prefetch, on this machine (copies real, link speeds from the profile for
the target's expert, time-scaled: every figure "emulated"). The simulated counterpart is
bench/sim_gate_worth.py.

    python bench/emu_gate_worth.py [--model models/mixtral-topology] [--target mixtral-8x7b]
        [--policies moecxl moecxl_nd] [--profiles h100-cxl h100-pcie5-dram] [--batch 1] [--tokens 16]
        [--repeats 2] [--out bench/results/gate-worth-emulated.json]
Variants run interleaved; each row is the median-TPOT run of its repeats (all runs kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_offload import prompts  # noqa: E402
from bench.common import machine, write_json  # noqa: E402
from moecxl.evaluation.inputs import load_model, resolve_target  # noqa: E402
from moecxl.generate import generate  # noqa: E402
from moecxl.memory import Hardware  # noqa: E402
from moecxl.runtime.engine import OffloadEngine, calibrate_time_scale  # noqa: E402
from moecxl.runtime.policies import get_policy  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hardware"


def variants(name: str) -> dict:
    """The policy as it is, without its gate, and without prefetch."""
    full = get_policy(name)
    if full.prefetch is None:
        raise SystemExit(f"policy {name!r} does not prefetch: nothing for a gate to decide")
    return {
        "gate": full,
        "no_gate": dataclasses.replace(full, name=f"{name}-nogate", gate=False),
        "no_prefetch": dataclasses.replace(full, name=f"{name}-noprefetch", prefetch=None, horizon=0),
    }


def run_once(model, x, hw, scale, target, spec, budget, tokens) -> dict:
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy=spec,
        device_budget=budget,
        emulate=True,
        time_scale=scale,
        target_model=target,
    )
    try:
        m = generate(model, x, max_new_tokens=tokens, engine=eng).metrics
    finally:
        eng.close()
    wasted = m["wasted_prefetch_bytes"] // max(1, eng.expert_bytes)
    return {
        "tpot_s": m["tpot_s"],
        "ttft_s": m["ttft_s"],
        "stall_s": m["stall_s"],
        "hit_rate": m["hit_rate"],
        "prefetch_issued": m["prefetch_issued"],
        "prefetch_used": m["prefetch_used"],
        "gated_prefetches": m["gated_prefetches"],
        "wasted_prefetches": int(wasted),
        "wasted_prefetch_bytes_at_target": int(wasted * eng.emulated_expert_bytes),
        "miss_choices": m["miss_choices"],
        "timing": m["timing"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mixtral-topology")
    ap.add_argument("--target", default="mixtral-8x7b")
    ap.add_argument("--policies", nargs="+", default=["moecxl", "moecxl_nd"])
    ap.add_argument("--profiles", nargs="+", default=["h100-cxl", "h100-pcie5-dram"])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gate-worth-emulated.json")
    a = ap.parse_args(argv)
    model, target = load_model(a.model), resolve_target(a.target)
    x = prompts(model, a.batch, a.prompt_len)
    rows = {}
    for prof in a.profiles:
        hw = Hardware.from_yaml(prof if Path(prof).is_file() else CONFIGS / f"{prof}.yaml")
        scale = calibrate_time_scale(model, hw, target)
        for pol in a.policies:
            specs = variants(pol)
            for spec in specs.values():  # compile each variant's steps outside the measurement
                run_once(model, x, hw, scale, target, spec, a.budget, 2)
            runs: dict = {name: [] for name in specs}
            for _ in range(max(1, a.repeats)):
                for name, spec in specs.items():
                    runs[name].append(run_once(model, x, hw, scale, target, spec, a.budget, a.tokens))
            for name, rs in runs.items():
                med = sorted(rs, key=lambda r: r["tpot_s"])[len(rs) // 2]
                row = med | {"tpot_s_runs": [r["tpot_s"] for r in rs], "time_scale": scale}
                rows[f"{hw.name}/{pol}/{name}"] = row
                print(
                    f"{hw.name:16s} {pol:10s} {name:12s} TPOT {row['tpot_s'] * 1e3:8.1f} ms  stall "
                    f"{row['stall_s']:6.2f} s  prefetches {row['prefetch_issued']} (used {row['prefetch_used']}, "
                    f"gated {row['gated_prefetches']}, wasted {row['wasted_prefetches']})  hit {row['hit_rate']:.3f}",
                    flush=True,
                )
    write_json(
        a.out,
        {
            "timing": "emulated (copies real, link speeds from each profile, time-scaled)",
            "machine": machine(),
            "model": a.model,
            "target_model": target.name if target is not None else None,
            "budget": a.budget,
            "batch": a.batch,
            "prompt_len": a.prompt_len,
            "tokens": a.tokens,
            "repeats": max(1, a.repeats),
            "rows": rows,
        },
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
