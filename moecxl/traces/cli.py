"""`python -m moecxl.traces collect|stats`: argument parsing around `collect` and `stats`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import datasets
import numpy as np

from moecxl.traces.collection import collect
from moecxl.traces.plots import stats
from moecxl.traces.schema import TraceError, read_traces

DESCRIPTION = (
    "Router traces: the schema, `collect` (prefill forwards + greedy `generate`), reading, and statistics."
)


def _summary(s: dict) -> dict:
    """Per-layer means of the headline numbers, for the terminal."""

    def mean(key, kind, part):
        vals = [r[kind][part] for r in s[key] if r]
        return round(float(np.mean(vals)), 3) if vals else None

    return {
        "rows": s["rows"],
        "sequences": s["sequences"],
        "decode_rows": s["decode_rows"],
        "log2_E": round(s["log2_E"], 3),
        "layer_entropy_choice": {p: mean("layer_entropy", "choice", p) for p in ("marginal", "conditional")},
        "temporal_entropy_choice": {
            p: mean("temporal_entropy", "choice", p) for p in ("marginal", "conditional")
        },
        "domain_tv_mean": {k: round(float(np.mean(v)), 3) for k, v in s["domain_tv"].items()},
        "figures": s["figures"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moecxl.traces", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "collect", help="collect router traces (prefill + greedy decode); resumes automatically"
    )
    c.add_argument("--model", required=True, help="checkpoint directory moecxl.load opens")
    c.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a directory holding one (default: MODEL/tokenizer.json); any the "
        "`tokenizers` library reads. Special ids: MODEL's config.json, generation_config.json, "
        "then tokenizer_config.json / special_tokens_map.json beside the tokenizer",
    )
    c.add_argument(
        "--corpus", required=True, help="stdlib, shakespeare, mixed, pydocs, kjv, file:GLOB, hf:NAME"
    )
    c.add_argument("--split", default="test", choices=("train", "validation", "test"))
    c.add_argument("--tokens", type=int, default=10_000, help="rows to collect (prefill + decode), at least")
    c.add_argument("--out", required=True)
    c.add_argument("--prompt-len", type=int, default=128, help="tokens per prefill sequence")
    c.add_argument(
        "--decode-tokens", type=int, default=32, help="decode rows per continued sequence (0: none)"
    )
    c.add_argument("--decode-every", type=int, default=4, help="continue every n-th sequence with generate")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each prefill batch over N devices (0: all; batch padded to a multiple of N). "
        "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N",
    )
    c.add_argument("--router-logits", action="store_true", help="store raw router logits [L][E]")
    c.add_argument(
        "--sketch", type=int, default=0, metavar="P", help="store hidden sketches [L][P] (e.g. 16)"
    )
    c.add_argument("--sketch-seed", type=int, default=0)
    c.add_argument("--shard-seqs", type=int, default=64, help="sequences per Parquet shard")
    c.add_argument("--fractions", default="0.9,0.05,0.05", help="train,validation,test document fractions")
    c.add_argument("--holdout-domain", default=None)
    s = sub.add_parser(
        "stats", help="popularity, transitions, entropies, reuse distance, domains: JSON + PNGs"
    )
    s.add_argument("trace_dir")
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    try:
        if args.command == "collect":
            fractions = tuple(float(x) for x in args.fractions.split(","))
            out = collect(
                args.model,
                args.out,
                args.corpus,
                args.split,
                args.tokens,
                tokenizer=args.tokenizer,
                prompt_len=args.prompt_len,
                decode_tokens=args.decode_tokens,
                decode_every=args.decode_every,
                batch=args.batch,
                data_parallel=args.data_parallel,
                router_logits=args.router_logits,
                sketch=args.sketch,
                sketch_seed=args.sketch_seed,
                shard_seqs=args.shard_seqs,
                fractions=fractions,
                holdout_domain=args.holdout_domain,
            )
            meta = read_traces(out).metadata
            print(
                json.dumps(
                    {
                        "out": str(out),
                        "rows": meta.get("num_rows"),
                        "sequences": meta["num_sequences"],
                        "L": meta["L"],
                        "E": meta["E"],
                        "K": meta["K"],
                    }
                )
            )
        else:
            print(json.dumps(_summary(stats(args.trace_dir, args.out)), indent=1))
    except (TraceError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
