"""Tokens/s of expert-parallel generation from 1 to 8 devices (JSON in bench/results/scaleout.json).

On this machine the devices are CPU-emulated: `--xla_force_host_platform_device_count=8` makes 8 XLA
devices that share the same few physical cores, so adding devices adds all-to-all work without adding
compute: scaling is NOT expected here. The figure checks the path and its overhead; on a machine with
real accelerators run it as is (it uses every device it finds, up to 8).

    python -m bench.bench_scaleout [--new-tokens 16] [--batch 4] [--out bench/results/scaleout.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "jax" not in sys.modules and not os.environ.get("MOECXL_BENCH_REAL_DEVICES"):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
from flax import nnx

from bench.common import machine, write_json
from moecxl.config import ModelConfig
from moecxl.distributed import ExpertParallel, make_mesh, shard_model
from moecxl.generate import generate
from moecxl.model import MoEDecoder

CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    max_position_embeddings=512,
)


def tokens_per_s(model, prompt, new_tokens: int, engine=None, repeats: int = 2) -> float:
    generate(model, prompt, max_new_tokens=new_tokens, engine=engine)  # compile
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        res = generate(model, prompt, max_new_tokens=new_tokens, engine=engine)
        best = max(best, res.tokens.size / (time.perf_counter() - t))
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--out", default="bench/results/scaleout.json")
    args = ap.parse_args(argv)
    cfg = ModelConfig(**CONFIG)
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
    backend = jax.default_backend()
    emulated = backend == "cpu"
    rows = [
        {
            "devices": 1,
            "mesh": "single device (engine=None)",
            "tokens_per_s": tokens_per_s(model, prompt, args.new_tokens),
        }
    ]
    ref = generate(model, prompt, max_new_tokens=args.new_tokens).tokens
    n = 1
    while n <= min(8, jax.device_count()):
        mesh = make_mesh(1, n, devices=jax.devices()[:n])
        shard_model(model, mesh)
        ep = ExpertParallel(model, mesh)
        same = bool((generate(model, prompt, max_new_tokens=args.new_tokens, engine=ep).tokens == ref).all())
        rows.append(
            {
                "devices": n,
                "mesh": f"data=1 x expert={n}",
                "tokens_per_s": tokens_per_s(model, prompt, args.new_tokens, ep),
                "tokens_equal_single_device": same,
            }
        )
        print(rows[-1], flush=True)
        n *= 2
    result = {
        "what": "expert-parallel generate (all-to-all dispatch), decode tokens/s incl. prefill",
        "devices_kind": "CPU-emulated devices (forced XLA host devices sharing the same physical cores): "
        "scaling is not expected"
        if emulated
        else f"{backend} devices",
        "config": CONFIG,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "machine": machine(),
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
