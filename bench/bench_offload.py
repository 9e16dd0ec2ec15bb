"""Offloaded decoding on this machine with emulated links: TPOT of each policy relative to resident,
and the engine's control-plane overhead per MoE layer per decode step.

Copies are real memcpys; each completes no earlier than the hardware profile predicts for the
target model's expert (Mixtral-8x7B by default: the trained mixtral-topology model stands in for it),
time-scaled so that copy time over measured layer compute equals the target's (timing: "emulated").
Usage:
    python bench/bench_offload.py [--model models/mixtral-topology] [--budgets 0.25 0.5]
        [--profiles configs/hardware/h100-cxl.yaml configs/hardware/h100-pcie5-dram.yaml] [--tokens 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, write_json  # noqa: E402
from moecxl.config import ModelConfig  # noqa: E402
from moecxl.generate import generate  # noqa: E402
from moecxl.model import MoEDecoder  # noqa: E402
from moecxl.runtime.engine import OffloadEngine, calibrate_time_scale, layer_compute_s  # noqa: E402
from moecxl.runtime.policies import POLICIES  # noqa: E402

MIXTRAL_8X7B = ModelConfig(
    name="mixtral-8x7b (shapes only)",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    num_experts=8,
    top_k=2,
    dtype="bfloat16",
)


def load_model(path: str | None):
    if path and Path(path).exists():
        import moecxl

        return moecxl.load(path), path
    cfg = ModelConfig(
        name="tiny-mixtral (random weights)",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        num_experts=8,
        top_k=2,
    )
    return MoEDecoder(cfg, rngs=nnx.Rngs(0)), "random tiny config (no trained model found)"


def prompts(model, batch: int, prompt_len: int, seed: int = 0):
    return np.random.default_rng(seed).integers(3, model.cfg.vocab_size, (batch, prompt_len))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mixtral-topology")
    ap.add_argument(
        "--profiles",
        nargs="+",
        default=["configs/hardware/h100-cxl.yaml", "configs/hardware/h100-pcie5-dram.yaml"],
    )
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--policies", nargs="+", default=[p for p in POLICIES])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default="bench/results/offload.json")
    args = ap.parse_args(argv)
    from moecxl.memory import Hardware

    model, model_src = load_model(args.model)
    x = prompts(model, args.batch, args.prompt_len)
    generate(model, x, max_new_tokens=2)  # compile
    ref = generate(model, x, max_new_tokens=args.tokens)
    resident_tpot = float(
        np.median([generate(model, x, max_new_tokens=args.tokens).metrics["tpot_s"] for _ in range(3)])
    )
    layer_s = layer_compute_s(model)
    rows = []
    for prof in args.profiles:
        hw = Hardware.from_yaml(prof)
        scale = calibrate_time_scale(model, hw, MIXTRAL_8X7B)
        for budget in args.budgets:
            for pol in args.policies:

                def engine(hw=hw, pol=pol, budget=budget, scale=scale):
                    return OffloadEngine(
                        model,
                        hardware=hw,
                        policy=pol,
                        device_budget=budget,
                        emulate=True,
                        time_scale=scale,
                        target_model=MIXTRAL_8X7B,
                        trace=ref if pol == "oracle" else None,
                    )

                warm = engine()  # compile this policy's steps outside the measurement
                generate(model, x, max_new_tokens=2, engine=warm)
                warm.close()
                eng = engine()
                res = generate(model, x, max_new_tokens=args.tokens, engine=eng)
                m = res.metrics
                exact = bool(np.array_equal(res.logits, ref.logits))
                rows.append(
                    {
                        "profile": hw.name,
                        "budget": budget,
                        "policy": pol,
                        "tpot_s": m["tpot_s"],
                        "ttft_s": m["ttft_s"],
                        "tpot_over_resident": m["tpot_s"] / resident_tpot,
                        "hit_rate": m["hit_rate"],
                        "stall_s": m["stall_s"],
                        "prefetch_precision": m["prefetch_precision"],
                        "bytes_by_tier": m["bytes_by_tier"],
                        "control_us_median_decode": m["control_us_median_decode"],
                        "bit_identical_to_resident": exact,
                        "timing": m["timing"],
                        "time_scale": scale,
                    }
                )
                eng.close()
                print(
                    f"{hw.name:>16} {budget:4.2f} {pol:>12}: TPOT x{rows[-1]['tpot_over_resident']:7.2f}  "
                    f"hit {m['hit_rate']:.3f}  control {m['control_us_median_decode'] or 0:6.1f} us  "
                    f"exact={exact}"
                )
    out = {
        "timing": "emulated (copies real, link speed imposed by the profile, time-scaled)",
        "machine": machine(),
        "model": model_src,
        "target_model": MIXTRAL_8X7B.name,
        "resident_tpot_s": resident_tpot,
        "measured_layer_s": layer_s,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "tokens": args.tokens,
        "rows": rows,
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
