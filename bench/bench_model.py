"""Forward and decode-step latency of tiny models: moecxl (JAX, CPU) against transformers (torch, CPU).

Both run the same checkpoint (built here with random weights, saved, loaded by both). Decode step =
time per generated token with a KV cache, from greedy generation of N tokens minus the first token.
Output: JSON with medians over repeats, labelled measured-cpu. Usage:
    python bench/bench_model.py [--out bench/results/model.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, write_json  # noqa: E402
from moecxl.generate import generate  # noqa: E402
from moecxl.model import hf  # noqa: E402

CASES = {
    "mixtral-tiny": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3moe-tiny": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=16,
            num_experts_per_tok=4,
            head_dim=16,
            norm_topk_prob=True,
        ),
    ),
}


def _median_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_case(name, repeats, batch=1, prompt_len=32, new_tokens=32):
    import torch
    import transformers

    conf_cls, model_cls, kw = CASES[name]
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**kw)).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = hf.load(d)
    ids = np.random.default_rng(0).integers(3, kw["vocab_size"], (batch, prompt_len))
    t_ids = torch.tensor(ids)

    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
    ours_fwd = _median_s(lambda: fwd(state, ids).block_until_ready(), repeats)
    with torch.no_grad():
        ref_fwd = _median_s(lambda: ref(t_ids), repeats)

    def ours_gen(n):
        return _median_s(lambda: generate(ours, ids, max_new_tokens=n), repeats)

    def ref_gen(n):
        with torch.no_grad():
            return _median_s(
                lambda: ref.generate(
                    t_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                ),
                repeats,
            )

    ours_step = (ours_gen(new_tokens + 1) - ours_gen(1)) / new_tokens
    ref_step = (ref_gen(new_tokens + 1) - ref_gen(1)) / new_tokens
    return {
        "config": kw,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "forward_s": {
            "moecxl": ours_fwd,
            "transformers": ref_fwd,
            "ratio_moecxl_over_hf": ours_fwd / ref_fwd,
        },
        "decode_step_s": {
            "moecxl": ours_step,
            "transformers": ref_step,
            "ratio_moecxl_over_hf": ours_step / ref_step,
        },
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/model.json")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {name: bench_case(name, args.repeats) for name in CASES}
    out = {
        "timing": "measured-cpu",
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    write_json(args.out, out)
    for name, r in results.items():
        print(
            f"{name}: forward {r['forward_s']['moecxl'] * 1e3:.2f} ms vs HF {r['forward_s']['transformers'] * 1e3:.2f} ms"
            f" | decode step {r['decode_step_s']['moecxl'] * 1e3:.2f} ms vs HF "
            f"{r['decode_step_s']['transformers'] * 1e3:.2f} ms (ratio {r['decode_step_s']['ratio_moecxl_over_hf']:.2f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
