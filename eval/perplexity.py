"""Perplexity fully resident vs each offloading policy (identical for exact policies; the delta for hobbit).

    python eval/perplexity.py --model models/mixtral-topology --corpus mixed --split test \
        [--policies lru pregate hobbit oracle moecxl] [--budget 0.5] [--profile cpu-local] \
        [--tokens 512] [--seq-len 128] [--mode decode|prefill] [--tokenizer PATH] --out results/perplexity.json

Documents are tokenised with the checkpoint's own tokenizer (MODEL/tokenizer.json, or --tokenizer: any
tokenizer.json the `tokenizers` library reads) and framed as it frames them: BOS where it adds one, EOS
between documents (special ids from MODEL's config.json, generation_config.json, tokenizer_config.json).

Exit status 1 (after writing the file) if an exact policy changed the logits, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecxl.evaluation import perplexity  # noqa: E402
from moecxl.evaluation.inputs import run_cli  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (anything moecxl.load opens)")
    ap.add_argument("--corpus", default="mixed")
    ap.add_argument("--split", default="test")
    ap.add_argument("--policies", nargs="+", default=["lru", "pregate", "hobbit", "oracle", "moecxl"])
    ap.add_argument("--budget", type=float, default=0.5, help="device budget: fraction of expert bytes")
    ap.add_argument("--profile", default="cpu-local", help="hardware profile name or YAML path")
    ap.add_argument("--tokens", type=int, default=512, help="target tokens to score")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mode", choices=perplexity.MODES, default="decode")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a directory holding one (default: MODEL/tokenizer.json)",
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    return run_cli(
        perplexity.cli,
        a.out,
        a.model,
        corpus=a.corpus,
        split=a.split,
        policies=a.policies,
        profile=a.profile,
        budget=a.budget,
        tokens=a.tokens,
        seq_len=a.seq_len,
        batch_size=a.batch,
        mode=a.mode,
        tokenizer=a.tokenizer,
    )


if __name__ == "__main__":
    sys.exit(main())
