"""Markdown report + plots from result JSONs (eval/perplexity.py, latency.py, simulate.py) and predictor metrics.

python eval/report.py --results results/ --out report/ [--predictor-metrics runs/predictor/x/metrics.json]
    [--baseline-policy lru] [--baseline-profile h100-pcie4-dram] [--ours-profile h100-cxl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecxl.evaluation import report  # noqa: E402
from moecxl.evaluation.inputs import run_cli  # noqa: E402


def main(argv=None) -> int:
    d = report.Comparison()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="directory of result JSONs (searched recursively)")
    ap.add_argument("--out", required=True, help="directory for report.md and the plots")
    ap.add_argument("--predictor-metrics", nargs="*", default=[], help="predictor metrics.json files")
    ap.add_argument("--baseline-policy", default=d.baseline_policy, help="'CPU offloading' in the comparison")
    ap.add_argument("--ours-policy", default=d.ours_policy)
    ap.add_argument("--baseline-profile", default=None, help="default: first profile named *dram*")
    ap.add_argument("--ours-profile", default=None, help="default: first profile named *cxl*")
    a = ap.parse_args(argv)
    cmp = report.Comparison(a.baseline_policy, a.ours_policy, a.baseline_profile, a.ours_profile)
    return run_cli(report.cli, a.results, a.out, a.predictor_metrics, cmp)


if __name__ == "__main__":
    sys.exit(main())
