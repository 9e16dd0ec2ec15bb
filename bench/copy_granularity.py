"""What the copy granularity costs on the profiles' links: one expert per copy against several in one.

    python bench/copy_granularity.py --out bench/results/copy-granularity.json

For each target model (its expert bytes at its stored precision) and each hardware profile's expert home
tier, the cost model's copy time (`memory.tiers.copy_time_s`: latency + per-copy overhead + bytes / path
rate) gives the achieved share of the path rate for one expert per copy and for 2, 4 and 8 experts in one
copy (what a batched copy of a layer's adjacent experts would reach). SIMULATED from the profiles'
cited link figures; nothing is timed here.

These shares are those of a copy issued and waited for alone. The runtime queues a visit's copies on
the tier's FIFO (`memory.transfer.LinkClock`), where the fixed cost is latency overlapped with the next
copy's bytes: k copies queued back to back reach the "k" share already, batched or not. What batching
them into one transfer changes in TPOT: bench/sim_copy_batching.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moecxl.memory import Hardware
from moecxl.memory.tiers import copy_time_s, path_gbps
from moecxl.sim.costmodel import load_shape

MODELS = ("mixtral-8x7b", "custom-32e-top4-full", "deepseek-v2-lite", "deepseek-v3", "gpt-oss-20b")
PROFILES = ("h100-cxl", "h100-pcie4-dram", "h100-pcie5-dram", "h100-4cxl")
BATCHES = (1, 2, 4, 8)


def rows(models=MODELS, profiles=PROFILES, root: Path = Path(".")) -> list[dict]:
    out = []
    for name in models:
        path = root / "configs" / "models" / f"{name}.yaml"
        if not path.is_file():
            continue
        shape = load_shape(path)
        nbytes = shape.expert_bytes
        for prof in profiles:
            hw = Hardware.from_yaml(root / "configs" / "hardware" / f"{prof}.yaml")
            tier = next(t for t in hw.tiers if t.kind != "hbm")  # the first tier below the GPU
            rate = path_gbps(tier, hw)
            share = {n: n * nbytes / copy_time_s(tier, n * nbytes, hw) / 1e9 / rate for n in BATCHES}
            out.append(
                {
                    "model": name,
                    "expert_bytes": nbytes,
                    "profile": prof,
                    "tier": tier.name,
                    "path_gbps": rate,
                    "share_of_path_rate": {str(n): s for n, s in share.items()},
                    "one_copy_us": copy_time_s(tier, nbytes, hw) * 1e6,
                }
            )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    doc = {
        "what": "copy granularity: achieved share of the path rate, 1/2/4/8 experts per copy",
        "timing": "simulated (cost model: memory.tiers.copy_time_s over the profiles' cited link figures)",
        "note": "shares of a copy issued and waited for alone; k copies queued back to back on one device "
        "overlap the fixed cost (LinkClock) and reach the k share batched or not; TPOT with batched copies: "
        "bench/results/copy-batching-deepseek-v2-lite.json",
        "command": "python bench/copy_granularity.py " + " ".join(sys.argv[1:]),
        "rows": rows(),
    }
    for r in doc["rows"]:
        s = r["share_of_path_rate"]
        print(
            f"{r['model']:22s} {r['expert_bytes'] / 2**20:7.1f} MiB  {r['profile']:16s} {r['tier']:8s} "
            f"{r['path_gbps']:5.1f} GB/s  one expert {s['1']:.3f}  x8 {s['8']:.3f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(args.out)
    return doc


if __name__ == "__main__":
    main()
