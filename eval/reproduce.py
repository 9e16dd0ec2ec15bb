"""Simulate published measurements (configs/published/*.yaml) and compare: results.json + results.md.

    python eval/reproduce.py configs/published/*.yaml --out results/published

Every figure is simulated on moecxl's cost model with the topology-matched trained model's routing traces
(collected first where absent, about a minute each, unless --no-make-traces). See moecxl.sim.reproduce.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecxl.sim.reproduce import CaseError, markdown, run_cases, write  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="case files (configs/published/NAME.yaml)")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--no-make-traces", action="store_true", help="fail (saying how) where traces are absent")
    a = ap.parse_args(argv)
    try:
        rows = run_cases(a.cases, make_traces=not a.no_make_traces)
    except CaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write(rows, a.out)
    print(markdown(rows))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
