"""Latency on this machine: TTFT, TPOT, tokens/s, hit rate, stall, bytes per tier (medians, IQR).

    python eval/latency.py --model models/mixtral-topology --profiles h100-cxl h100-pcie4-dram \
        --policies on_demand lru pregate moecxl oracle --budgets 0.25 0.5 --batch 1 4 16 32 \
        --prompt-lens 16 128 --tokens 8 --repeats 3 [--target mixtral-8x7b] [--corpus mixed] \
        [--tokenizer PATH] [--modes emulated measured] --out results/latency.json

Links are emulated (timing "emulated"); `--modes measured` also times real copies (on a GPU:
"measured-gpu", the default there). A Switch checkpoint runs too (emulated as Switch-Base-128):

    python eval/latency.py --model models/switch-topology --target switch-base-128 --profiles h100-cxl \
        --policies on_demand lru moecxl oracle --budgets 0.25 0.5 --prompt-lens 32 --corpus mixed \
        --out results/latency-switch.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecxl.evaluation import latency  # noqa: E402
from moecxl.evaluation.inputs import run_cli  # noqa: E402


def main(argv=None) -> int:
    d = latency.Sweep()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (any family moecxl.load opens)")
    ap.add_argument(
        "--profiles", nargs="+", default=list(d.profiles), help="names in configs/hardware or paths"
    )
    ap.add_argument("--policies", nargs="+", default=list(d.policies))
    ap.add_argument("--budgets", nargs="+", type=float, default=list(d.budgets))
    ap.add_argument("--batch", nargs="+", type=int, default=list(d.batches))
    ap.add_argument("--prompt-lens", nargs="+", type=int, default=list(d.prompt_lens))
    ap.add_argument("--tokens", type=int, default=d.new_tokens, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument(
        "--target", default=d.target, help="model whose expert bytes the links move ('self': ours)"
    )
    ap.add_argument("--modes", nargs="+", choices=latency.MODES, default=None)
    ap.add_argument(
        "--corpus", default=None, help="prompts from this corpus's test split (default: random ids)"
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a directory holding one, for --corpus (default: MODEL/tokenizer.json)",
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    sw = latency.Sweep(
        profiles=tuple(a.profiles),
        policies=tuple(a.policies),
        budgets=tuple(a.budgets),
        batches=tuple(a.batch),
        prompt_lens=tuple(a.prompt_lens),
        new_tokens=a.tokens,
        repeats=a.repeats,
        target=a.target,
        modes=tuple(a.modes) if a.modes else latency.default_modes(),
    )
    return run_cli(latency.cli, a.out, a.model, sw, a.corpus, a.tokenizer)


if __name__ == "__main__":
    sys.exit(main())
