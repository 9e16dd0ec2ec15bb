"""Full-size experts on this machine: memory, host-kernel rate and copy rate at 352 MB per expert.

    python -m moecxl.memory.fullsize make --out runs/fullsize-mixtral        # once: 5.6 GB
    python bench/bench_fullsize.py --ckpt runs/fullsize-mixtral --out bench/results/fullsize-cpu-2core.json

Measures, in one run and labelled measured-cpu:
  load    `moecxl.load(experts="host")`: wall time, peak RSS and RSS after, against the experts' bytes;
  kernel  `hostkernel.expert_forward` on the checkpoint's own experts (1, 4, 16, 32 tokens: row loops under
          16, XLA GEMMs from 16, as the engine runs it) against a
          float32 GEMV read of 512 MiB (this machine's read rate), measured beside it;
  copy    a stored expert (pinned_host, as `HostStore` keeps it) to the JAX device through the transfer
          engine (and a bare `jax.device_put`), and its install into the slot arrays, against a numpy
          copy of the same bytes (this machine's memcpy rate);
  engine  (--engine) `moecxl.generate` with `OffloadEngine(policy="lru", device_budget=0.5)`, unemulated,
          if the engine runs on this checkpoint; its error is recorded otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
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
from moecxl.memory import fullsize, numa  # noqa: E402
from moecxl.memory.hostbench import ReadProbe  # noqa: E402
from moecxl.memory.hostkernel import expert_forward  # noqa: E402
from moecxl.memory.store import HostStore, expert_matrices, layout_of, packed_slab  # noqa: E402
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


def best_s(fn, repeats: int, warmup: int = 1) -> float:
    """Best of `repeats` timed calls after `warmup` untimed ones."""
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def packed_experts(model, keys) -> list[np.ndarray]:
    """The experts `keys` as the store holds them: the loader's own page-aligned slab (no copy), or a
    packed copy in a page-aligned buffer."""
    layout, mats = layout_of(model), expert_matrices(model)
    out = []
    for m, e in keys:
        ins, down = mats[m]
        parts = [w[e] for w in ins] + [down[e]]
        buf = packed_slab(parts, layout)
        if buf is None:
            buf = numa.aligned_zeros(layout.nbytes, align=4096).view(layout.np_dtype)
            layout.pack(parts, buf)
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
        # Warm-up: the staging pool's buffers and the memcpy's target each cycled a few times. On this VM
        # fresh pages reach full speed only after several passes (a copy into a staging buffer ran at 0.3,
        # 6.7, 7.6, then 10.7 GB/s on its first four rounds), and a single warm-up timed that ramp.
        warm = 3 * len(keys)
        t_put = best_s(lambda i: jax.device_put(srcs[i % len(srcs)], dev).block_until_ready(), repeats, warm)
        t_copy = best_s(
            lambda i: transfers.submit(keys[i % len(keys)], "dram").result().block_until_ready(),
            repeats,
            warm,
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
        t_mem = best_s(lambda i: np.copyto(dst, a[i % len(a)]), repeats, warm)
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


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so a later peak is that stage's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def recording_device_steps():
    """Record the argument shapes of every call to the engine's jitted expert steps (`_stored_step_jit`,
    `_mixed_jit`) so that `device_step_temp_bytes` can ask XLA for their working memory afterwards."""
    from moecxl.runtime import engine as engine_mod  # noqa: PLC0415 (optional part, above memory)

    calls: list = []
    originals = {name: getattr(engine_mod, name) for name in ("_stored_step_jit", "_mixed_jit")}

    def recorder(fn):
        def call(*args, **kw):
            shapes = jax.tree.map(
                lambda a: (
                    jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, (jax.Array, np.ndarray)) else a
                ),
                args,
            )
            calls.append((fn, shapes, kw))
            return fn(*args, **kw)

        return call

    for name, fn in originals.items():
        setattr(engine_mod, name, recorder(fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(engine_mod, name, fn)


def device_step_temp_bytes(calls) -> int:
    """The largest XLA temporary allocation (compiled memory analysis) over the recorded step calls: the
    device step's working memory (one expert's slot rows at a time since the step runs its experts in a
    scan; the gathered, float32-widened rows of every routed expert before), device memory on a GPU and
    host RAM on this machine."""
    seen, most = set(), 0
    for fn, shapes, kw in calls:
        key = (id(fn), str(shapes), str(sorted(kw.items())))
        if key in seen:
            continue
        seen.add(key)
        analysis = fn.lower(*shapes, **kw).compile().memory_analysis()
        if analysis is not None:
            most = max(most, int(analysis.temp_size_in_bytes))
    return most


def bench_engine(model, new_tokens: int, runs, prompt_len: int) -> dict:
    """`moecxl.generate` through the offload engine for each (policy, budget) in `runs`, unemulated;
    each run's peak RSS is its own (reset before it), split into the device cache and staging (device
    memory, which is host RAM on this machine), the device expert step's XLA temporaries (compiled
    memory analysis of the shapes the run used: device memory too) and the rest (the experts held once,
    the interpreter)."""
    from moecxl.runtime.engine import OffloadEngine  # noqa: PLC0415 (optional part; the runtime is above memory)

    expert_bytes = sum(w.nbytes for ins, out in expert_matrices(model) for w in (*ins, out))
    layer_expert_bytes = layout_of(model).nbytes
    ids = (np.arange(prompt_len, dtype=np.int32)[None] * 4 + 1) % model.cfg.vocab_size
    hw = Hardware.detect(memcpy_gbps=10.0, tflops=0.1, host_kernel=hostbench_host_kernel())
    out = {"prompt": ids.tolist(), "new_tokens": new_tokens, "runs": []}
    keep = ("ttft_s", "tpot_s", "tokens_per_s", "hit_rate", "stall_s", "bytes_by_tier", "timing")
    for policy, budget in runs:
        rec = {"policy": policy, "device_budget": budget}
        out["runs"].append(rec)
        gc.collect()
        need = (budget if budget <= 1 else budget / expert_bytes) * expert_bytes + 3 * layer_expert_bytes
        avail = fullsize.mem_available_bytes()
        if avail is not None and avail < 1.1 * need:
            rec["skipped"] = (
                f"{avail / GB:.1f} GB available; the device cache and staging need ~{need / GB:.1f}"
            )
            continue
        reset_peak_rss()
        engine = None
        try:
            engine = OffloadEngine(model, hardware=hw, policy=policy, device_budget=budget, emulate=False)
            t0 = time.perf_counter()
            with recording_device_steps() as calls:
                res = moecxl.generate(model, ids, max_new_tokens=new_tokens, engine=engine)
            rec["wall_s"] = time.perf_counter() - t0
            rec["metrics"] = {k: res.metrics.get(k) for k in keep}
            now = rss()
            cache_bytes = engine.n_slots * layer_expert_bytes
            staging_bytes = engine.transfers.staging.allocated * layer_expert_bytes
            rec["rss"] = now
            rec["device_cache_bytes"] = cache_bytes
            rec["staging_bytes"] = staging_bytes
            rec["peak_rss_over_expert_bytes"] = now["VmHWM"] / expert_bytes
            rec["peak_rss_less_device_over_expert_bytes"] = (
                now["VmHWM"] - cache_bytes - staging_bytes
            ) / expert_bytes
            temp = device_step_temp_bytes(calls)  # after the peak was read: compiling allocates little
            rec["device_step_temp_bytes"] = temp
            rec["peak_rss_less_device_and_step_over_expert_bytes"] = (
                now["VmHWM"] - cache_bytes - staging_bytes - temp
            ) / expert_bytes
            rec["store_aliases_model_arrays"] = all(
                r.get("aliases_model_arrays", False) for r in engine.store.node_report.values()
            )
            print(
                f"engine {policy} @ {budget}: TPOT {rec['metrics']['tpot_s']:.2f} s, peak RSS "
                f"{rec['peak_rss_over_expert_bytes']:.2f}x experts "
                f"({rec['peak_rss_less_device_over_expert_bytes']:.2f}x less device cache and staging, "
                f"{rec['peak_rss_less_device_and_step_over_expert_bytes']:.2f}x less the device step's "
                f"{temp / GB:.2f} GB of XLA temporaries too)",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - recorded, not hidden: the engine may refuse a budget
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"engine {policy} @ {budget}: {rec['error'][:160]}", flush=True)
        finally:
            if engine is not None:
                engine.close()
            del engine
    return out


def hostbench_host_kernel() -> dict | None:
    """This machine's host-kernel measurement (bench/results/hostbench-cpu-2core.json), for host runs."""
    from moecxl.memory.hostbench import host_kernel_of  # noqa: PLC0415

    path = Path(__file__).resolve().parent / "results" / "hostbench-cpu-2core.json"
    return host_kernel_of(json.loads(path.read_text())) if path.is_file() else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/fullsize-mixtral")
    ap.add_argument("--out", default=None, help="JSON output (default: print)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", action="store_true", help="also run moecxl.generate with the offload engine")
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=1, help="prompt tokens (a 25%% budget holds 2 slots)")
    ap.add_argument(
        "--runs",
        default="lru:0.5",
        help="engine runs, policy:budget comma-separated (fetch-only lru, host-only moecxl_host, "
        "three-way moecxl_nd), e.g. lru:0.25,lru:0.5,moecxl_host:0.25,moecxl_nd:0.5",
    )
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
        runs = [(r.split(":")[0], float(r.split(":")[1])) for r in args.runs.split(",")]
        rec["engine"] = bench_engine(model, args.new_tokens, runs, args.prompt_len)
    rec["load_avg_after"] = list(os.getloadavg())
    if args.out:
        write_json(args.out, rec)
    else:
        print(json.dumps(rec, indent=2, default=float))
    return rec


if __name__ == "__main__":
    main()
