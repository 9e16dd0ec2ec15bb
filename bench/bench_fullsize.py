"""Full-size experts on this machine: memory, host-kernel rate and copy rate at 352 MB per expert.

    python -m moecxl.memory.fullsize make --out runs/fullsize-mixtral        # once: 5.6 GB
    python bench/bench_fullsize.py --ckpt runs/fullsize-mixtral --out bench/results/fullsize-cpu-2core.json

Measures, in one run and labelled measured-cpu:
  load    `moecxl.load(experts="host")`: wall time, peak RSS and RSS after, against the experts' bytes;
  kernel  `hostkernel.expert_forward` on the checkpoint's own experts (1, 4, 16, 32 tokens) against a
          float32 GEMV read of 512 MiB (this machine's read rate), measured beside it;
  copy    a stored expert (pinned_host, as `HostStore` keeps it) to the JAX device through the transfer
          engine (and a bare `jax.device_put`), and its install into the slot arrays, against a numpy
          copy of the same bytes (this machine's memcpy rate);
  engine  (--engine) `moecxl.generate` with `OffloadEngine(policy="lru", device_budget=0.5)`, unemulated,
          if the engine runs on this checkpoint; its error is recorded otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moecxl  # noqa: E402
from bench.common import machine, write_json  # noqa: E402
from moecxl.memory import fullsize  # noqa: E402
from moecxl.memory.hostbench import ReadProbe  # noqa: E402
from moecxl.memory.hostkernel import expert_forward  # noqa: E402
from moecxl.memory.store import HostStore, expert_matrices, layout_of  # noqa: E402
from moecxl.memory.tiers import Hardware  # noqa: E402
from moecxl.memory.transfer import TransferEngine  # noqa: E402

GB = 1e9


def rss() -> dict:
    """This process's resident memory now (anonymous / file-backed) and its peak so far, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def best_s(fn, repeats: int) -> float:
    fn(-1)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def packed_experts(model, keys) -> list[np.ndarray]:
    """The experts `keys` packed as the store packs them (one buffer each)."""
    layout, mats = layout_of(model), expert_matrices(model)
    out = []
    for m, e in keys:
        ins, down = mats[m]
        buf = np.empty(layout.numel, layout.np_dtype)
        layout.pack([w[e] for w in ins] + [down[e]], buf)
        out.append(buf)
    return out


def bench_kernel(model, repeats: int, n_experts: int = 3) -> dict:
    layout = layout_of(model)
    keys = [(k // model.cfg.num_experts, k % model.cfg.num_experts) for k in range(n_experts)]
    experts = packed_experts(model, keys)
    probe = ReadProbe()
    rows = []
    rng = np.random.default_rng(0)
    for n in (1, 4, 16, 32):
        x = rng.standard_normal((n, layout.shapes[0][0]), dtype=np.float32)
        t = best_s(lambda i, x=x: expert_forward(x, experts[i % len(experts)], layout), repeats)
        read = probe.gbps(repeats)
        rows.append(
            {
                "n_tokens": n,
                "kernel_gbps": layout.nbytes / t / GB,
                "read_gbps": read,
                "ratio": layout.nbytes / t / GB / read,
            }
        )
        print(f"kernel N={n}: {rows[-1]['kernel_gbps']:.1f} GB/s, read {read:.1f} GB/s", flush=True)
    return {"expert_bytes": layout.nbytes, "dtype": layout.dtype, "experts_cycled": n_experts, "rows": rows}


def bench_copy(model, repeats: int, n_experts: int = 3) -> dict:
    """Store -> device copies through the transfer engine (and, for comparison, a bare `device_put`),
    the install of a landed copy into the slot arrays, against numpy memcpy of the same bytes."""
    from moecxl.runtime.slots import _install, storage_dtype  # noqa: PLC0415 (the runtime is above memory)

    hw = Hardware.from_yaml(Path(__file__).resolve().parents[1] / "configs/hardware/cpu-local.yaml")
    keys = [(0, e) for e in range(min(n_experts, model.cfg.num_experts))]
    store = HostStore(model, hw, dict.fromkeys(keys, "dram"))
    transfers = TransferEngine(store, hw, emulate=False)
    try:
        layout, nbytes = store.layout, store.layout.nbytes
        dev = transfers.device_sharding
        srcs = [store.source(k) for k in keys]
        t_put = best_s(lambda i: jax.device_put(srcs[i % len(srcs)], dev).block_until_ready(), repeats)
        t_copy = best_s(
            lambda i: transfers.submit(keys[i % len(keys)], "dram").result().block_until_ready(), repeats
        )
        held = {
            "slots": tuple(
                jnp.zeros((2, *s), storage_dtype(layout.np_dtype), device=dev) for s in layout.shapes
            ),
            "landed": transfers.submit(keys[0], "dram").result(),
        }

        def install(i):
            held["slots"] = _install(held["slots"], (held["landed"],), np.array([i % 2], np.int32), layout)
            jax.block_until_ready(held["slots"])

        t_install = best_s(install, repeats)
        held.clear()
        a = [np.asarray(s).view(np.uint8) for s in srcs]
        dst = np.empty(nbytes, np.uint8)
        t_mem = best_s(lambda i: np.copyto(dst, a[i % len(a)]), repeats)
        t_fresh = best_s(lambda i: np.copyto(np.empty(nbytes, np.uint8), a[i % len(a)]), repeats)
        rss_with_store = rss()
        staging_buffers = transfers.staging.allocated
    finally:
        transfers.close()
        store.close()
    out = {
        "expert_bytes": nbytes,
        "transfer_gbps": nbytes / t_copy / GB,
        "memcpy_gbps": nbytes / t_mem / GB,
        "ratio": t_mem / t_copy,
        "device_put_gbps": nbytes / t_put / GB,
        "device_put_ratio": t_mem / t_put,
        "install_gbps": nbytes / t_install / GB,
        "store_to_slot_gbps": nbytes / (t_copy + t_install) / GB,
        "memcpy_fresh_gbps": nbytes / t_fresh / GB,
        "staging_buffers_allocated": staging_buffers,
        "rss_with_store_of_n_experts": rss_with_store,
        "how": "transfer: TransferEngine(HostStore, cpu-local, emulate=False).submit(key, 'dram').result() "
        "(as the engine copies; ratio = memcpy time / this); device_put: a bare jax.device_put of the "
        "stored pinned_host expert (the path before Staging); install: runtime.slots._install of a landed "
        "copy into 2-slot arrays; memcpy: np.copyto of the same bytes into a reused buffer (fresh: into a "
        "new one, page faults included). Best of repeats, cycling over experts",
    }
    print(
        f"copy: transfer {out['transfer_gbps']:.1f} GB/s, bare device_put {out['device_put_gbps']:.1f}, "
        f"install {out['install_gbps']:.1f}, memcpy {out['memcpy_gbps']:.1f} GB/s",
        flush=True,
    )
    return out


def bench_engine(model, new_tokens: int) -> dict:
    from moecxl.runtime.engine import OffloadEngine  # noqa: PLC0415 (optional part; the runtime is above memory)

    expert_bytes = sum(w.nbytes for ins, out in expert_matrices(model) for w in (*ins, out))
    avail = fullsize.mem_available_bytes()
    if avail is not None and avail < 1.6 * expert_bytes:
        return {
            "skipped": f"{avail / GB:.1f} GB available; the engine's store and cache need ~{1.6 * expert_bytes / GB:.1f}"
        }
    try:
        hw = Hardware.detect(memcpy_gbps=10.0, tflops=0.1)
        engine = OffloadEngine(model, hardware=hw, policy="lru", device_budget=0.5, emulate=False)
        ids = np.array([[1, 5, 9, 13]], np.int32)
        t0 = time.perf_counter()
        res = moecxl.generate(model, ids, max_new_tokens=new_tokens, engine=engine)
        wall = time.perf_counter() - t0
        keep = ("ttft_s", "tpot_s", "tokens_per_s", "hit_rate", "stall_s", "bytes_by_tier", "timing")
        return {"wall_s": wall, "metrics": {k: res.metrics.get(k) for k in keep}, "rss": rss()}
    except Exception as e:  # noqa: BLE001 - recorded, not hidden: the engine may not take this model yet
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/fullsize-mixtral")
    ap.add_argument("--out", default=None, help="JSON output (default: print)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", action="store_true", help="also run moecxl.generate with the offload engine")
    ap.add_argument("--new-tokens", type=int, default=3)
    args = ap.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        sys.exit(
            f"error: {ckpt}: no checkpoint; make one with python -m moecxl.memory.fullsize make --out {ckpt}"
        )
    before = rss()
    t0 = time.perf_counter()
    model = moecxl.load(ckpt, experts="host")
    load_s = time.perf_counter() - t0
    gc.collect()
    after = rss()
    expert_bytes = sum(w.nbytes for ins, out in expert_matrices(model) for w in (*ins, out))
    load = {
        "wall_s": load_s,
        "expert_bytes": expert_bytes,
        "rss_before": before,
        "rss_after": after,
        "peak_rss_bytes": after["VmHWM"],
        "peak_rss_over_expert_bytes": after["VmHWM"] / expert_bytes,
        "added_peak_over_expert_bytes": (after["VmHWM"] - before["VmRSS"]) / expert_bytes,
        "rss_after_over_expert_bytes": after["VmRSS"] / expert_bytes,
    }
    print(
        f"load {load_s:.1f} s: peak RSS {after['VmHWM'] / GB:.2f} GB for {expert_bytes / GB:.2f} GB of experts "
        f"({load['peak_rss_over_expert_bytes']:.2f}x), after {after['VmRSS'] / GB:.2f} GB",
        flush=True,
    )
    rec = {
        "what": "full-size experts on this machine (bench/bench_fullsize.py)",
        "command": "python bench/bench_fullsize.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "timing": "measured-cpu",
        "machine": machine(),
        "checkpoint": {"path": str(ckpt), "config": model.cfg.name, "layers": model.cfg.num_layers,
                       "experts": model.cfg.num_experts, "d_model": model.cfg.hidden_size,
                       "d_ff": model.cfg.intermediate_size, "dtype": model.cfg.dtype},
        "load": load,
        "kernel": bench_kernel(model, args.repeats),
    }  # fmt: skip
    gc.collect()
    rec["copy"] = bench_copy(model, args.repeats)
    gc.collect()
    if args.engine:
        rec["engine"] = bench_engine(model, args.new_tokens)
    rec["load_avg_after"] = list(os.getloadavg())
    if args.out:
        write_json(args.out, rec)
    else:
        print(json.dumps(rec, indent=2, default=float))
    return rec


if __name__ == "__main__":
    main()
