"""GPU check for the offload engine (one short script, < 10 minutes on one H100/H200).

1. Host-to-device GB/s from `pinned_host` (and pageable numpy) by copy size, 4 KiB .. 256 MiB.
2. Prefetch overlapped with decode: an MoE model whose experts exceed the device budget, TPOT of every
   policy (measured-gpu: real DMA, no emulation) against the same model fully resident, bit-exactness.
3. The host expert kernel on this machine's host CPU (`moecxl.memory.hostbench`: Mixtral-size experts,
   bf16 and int8, 1/4/16/32 tokens, loops and GEMM paths, against the host's read rate; ~1-2 minutes).
4. The device expert step at Mixtral-8x7B shapes over 4 bf16 slots kept as uint16 (as the engine keeps
   them): XLA's compiled working memory and time per step at 1, 8 and 128 tokens, for `moe_ffn` (one
   expert at a time) and for a gather of every routed expert (the step before d3f01a4), with the
   routed experts' bytes / time against the HBM datasheet rate.
Writes $OUT/gpu_offload.json (or --out). Usage on the device machine:
    PYTHONUNBUFFERED=1 python bench/gpu_offload.py --out $OUT/gpu_offload.json
Not run yet: no GPU was lent to the task that wrote it (see the closing notes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, write_json  # noqa: E402
from moecxl.config import ModelConfig  # noqa: E402
from moecxl.generate import generate  # noqa: E402
from moecxl.model import MoEDecoder  # noqa: E402
from moecxl.runtime.engine import OffloadEngine  # noqa: E402
from moecxl.runtime.policies import POLICIES  # noqa: E402


def h2d_sweep(repeats: int = 20) -> list[dict]:
    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(dev)
    rows = []
    for shift in range(12, 29, 2):  # 4 KiB .. 256 MiB
        n = 1 << shift
        host = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
        src = jax.device_put(host, pinned)
        for kind, a in (("pinned_host", src), ("pageable", host)):
            jax.device_put(a, device).block_until_ready()
            t = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.device_put(a, device).block_until_ready()
                t.append(time.perf_counter() - t0)
            med = float(np.median(t))
            rows.append({"bytes": n, "source": kind, "median_s": med, "gbps": n / med / 1e9})
        print(
            f"{n:>10} B  pinned {rows[-2]['gbps']:7.2f} GB/s  pageable {rows[-1]['gbps']:7.2f} GB/s",
            flush=True,
        )
    return rows


def offload_tpot(tokens: int) -> dict:
    # Experts big enough that copies matter on a GPU: 16 layers x 8 experts x 3 x 1024 x 3584 bf16 = 2.8 GB.
    cfg = ModelConfig(
        name="gpu-check (random weights)",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_layers=16,
        num_heads=16,
        num_kv_heads=4,
        num_experts=8,
        top_k=2,
        dtype="bfloat16",
    )
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 64))
    generate(model, x, max_new_tokens=4)
    ref = generate(model, x, max_new_tokens=tokens)
    resident = float(
        np.median([generate(model, x, max_new_tokens=tokens).metrics["tpot_s"] for _ in range(3)])
    )
    rows = []
    for pol in POLICIES:
        for budget in (0.25, 0.5):
            kw = dict(policy=pol, device_budget=budget, emulate=False, trace=ref if pol == "oracle" else None)
            hw = "configs/hardware/h100-cxl.yaml"
            warm = OffloadEngine(model, hardware=hw, **kw)
            generate(model, x, max_new_tokens=2, engine=warm)
            warm.close()
            eng = OffloadEngine(model, hardware=hw, **kw)
            res = generate(model, x, max_new_tokens=tokens, engine=eng)
            m = res.metrics
            rows.append(
                {
                    "policy": pol,
                    "budget": budget,
                    "tpot_s": m["tpot_s"],
                    "tpot_over_resident": m["tpot_s"] / resident,
                    "hit_rate": m["hit_rate"],
                    "stall_s": m["stall_s"],
                    "bit_identical": bool(np.array_equal(res.logits, ref.logits)),
                    "timing": m["timing"],
                }
            )
            eng.close()
            print(
                f"{pol:>12} {budget:.2f}: TPOT x{rows[-1]['tpot_over_resident']:.2f} hit {m['hit_rate']:.2f} "
                f"exact={rows[-1]['bit_identical']}",
                flush=True,
            )
    return {"model": cfg.name, "resident_tpot_s": resident, "rows": rows}


def device_step(tokens=(1, 8, 128), repeats: int = 10) -> dict:
    """Item 4: the jitted expert step at Mixtral-8x7B shapes (d 4096, ff 14336, 8 experts, top-2, 4 slots)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from moecxl.model.experts import moe_ffn  # noqa: PLC0415

    D, F, E, C, K = 4096, 14336, 8, 4, 2
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.bfloat16)  # noqa: E731

    def scan_step(x, ids, w, ins, out, slot_E):
        return moe_ffn(x, ids, w, tuple(map(bits, ins)), bits(out), slot_E)

    def gather_step(x, ids, w, ins, out, slot_E):  # every routed expert's rows at once, as before d3f01a4
        uniq = jnp.unique(ids, size=min(E, ids.size), fill_value=ids[0, 0])
        s = slot_E[uniq]
        g, u = (jnp.einsum("ND,UDF->UNF", x, bits(a)[s]) for a in ins)
        y = jnp.einsum("UNF,UFD->UND", jax.nn.silu(g) * u, bits(out)[s])
        match = (ids[:, :, None] == uniq[None, None, :]).astype(x.dtype)
        return jnp.einsum("NK,NKU,UND->ND", w.astype(x.dtype), match, y)

    key = jax.random.key(0)

    def slots(i, shape):  # normal bf16 weights (no denormals) as their uint16 bits
        w = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)
        return jax.lax.bitcast_convert_type(w, jnp.uint16)

    ins = tuple(slots(i, (C, D, F)) for i in range(2))
    out = slots(2, (C, F, D))
    slot_E = jnp.array([0, 1, 2, 3, -1, -1, -1, -1], jnp.int32)
    rows = []
    for N in tokens:
        x = jax.random.normal(key, (N, D), jnp.bfloat16)
        ids = (jnp.arange(N * K, dtype=jnp.int32).reshape(N, K)) % C
        w = jnp.full((N, K), 0.5, jnp.float32)
        for name, fn in (("moe_ffn", scan_step), ("gather", gather_step)):
            step = jax.jit(fn)
            mem = step.lower(x, ids, w, ins, out, slot_E).compile().memory_analysis()
            step(x, ids, w, ins, out, slot_E).block_until_ready()
            t = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step(x, ids, w, ins, out, slot_E).block_until_ready()
                t.append(time.perf_counter() - t0)
            U = min(C, N * K)
            med = float(np.median(t))
            rows.append(
                {
                    "step": name,
                    "tokens": N,
                    "distinct_experts": U,
                    "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
                    "median_s": med,
                    "expert_gb_per_s": U * 3 * D * F * 2 / med / 1e9,
                }
            )
            print(f"device step {name} N={N}: {med * 1e3:.2f} ms, temp {rows[-1]['temp_bytes']}", flush=True)
    return {"shapes": {"D": D, "F": F, "E": E, "slots": C, "K": K}, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu_offload.json"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--no-host-kernel", action="store_true", help="skip the host-kernel bench (item 3)")
    args = ap.parse_args(argv)
    timing = "measured-gpu" if jax.default_backend() == "gpu" else "measured-cpu"
    out = {
        "timing": timing,
        "machine": machine(),
        "devices": [str(d) for d in jax.devices()],
        "h2d": h2d_sweep(),
        "offload": offload_tpot(args.tokens),
        "device_step": device_step(),
    }
    if not args.no_host_kernel:  # issue #21 item 7: the kernel's figures on a GPU server's host CPU
        from moecxl.memory import hostbench  # noqa: PLC0415

        out["host_kernel"] = hostbench.run(
            tokens=(1, 4, 16, 32), repeats=3, log=lambda m: print(m, flush=True)
        )
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
