"""Simulated paper-scale experiments: python eval/simulate.py --experiment configs/experiments/NAME.yaml --out DIR"""

from __future__ import annotations

import argparse
import sys

from moecxl.sim.experiments import run_experiment


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experiment", required=True, help="configs/experiments/NAME.yaml")
    ap.add_argument("--out", required=True, help="output directory (results.json + plots)")
    ap.add_argument("--sections", nargs="*", default=None, help="run only these sections")
    args = ap.parse_args(argv)
    try:
        res = run_experiment(args.experiment, args.out, args.sections)
    except (ValueError, OSError) as e:
        sys.exit(f"eval/simulate.py: {e}")
    print(f"wrote {args.out}/results.json (simulated; commit {res['git_commit']})")
    ctl = res["control"]
    print(
        "control-plane time: "
        + (
            "idealised (none charged)"
            if ctl["idealised"]
            else f"{ctl['file']} (measured {ctl['source'].get('date')})"
        )
    )
    lp = res["learned_predictor"]
    if lp.get("row"):
        print(
            f"{lp['row']}: learned predictor {lp['predictor']} (sha256 {lp['predictor_hash'][:12]}) from {lp['file']}"
        )
    else:
        print(f"no learned-predictor row: {lp['skipped']}")


if __name__ == "__main__":
    main()
