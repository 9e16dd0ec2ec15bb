"""Measure the host expert kernel against this machine's memory read rate and compute peak.

    python -m moecxl.memory.hostbench --out bench/results/hostbench-cpu-2core.json

Read rate: a float32 matrix-vector product over 512 MiB (numpy's BLAS on every core; a STREAM-style read
that reads each byte once). Compute peak: a float32 4096^3 matmul. Kernel: `hostkernel.expert_forward`
on Mixtral-8x7B-sized experts (d 4096, ff 14336: 352 MB bf16, 176 MB int8) at 1, 4, 8, 16 and 32 tokens,
cycling over several experts so that no call finds its expert in the last-level cache. The kernel has two
paths (row loops; XLA GEMMs from BATCHED_MIN_TOKENS tokens): `paths` times both at every token count, the
evidence for where the kernel switches. Each figure is the
best of `repeats` runs, and the read rate and the compute peak are re-measured next to every kernel row,
so a ratio compares numbers taken within the same few seconds (this VM's speed drifts by 2x over minutes). The roofline of a row is max(bytes / read rate,
FLOPs / compute peak); the peak is a square matmul's, which skinny products (N <= 32 rows) do not reach
on a CPU, so each row also carries the same expert through numpy's BLAS with float32 weights
(`blas_f32_s`, `over_blas_f32`): the machine's own library on the same shapes. The record names the
machine and its load (other processes share this VM).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np

from moecxl.memory import numa
from moecxl.memory.hostkernel import BATCHED_MIN_TOKENS, BF16, expert_forward
from moecxl.memory.kerneltable import KernelTable
from moecxl.memory.store import ExpertLayout, quantize_int8
from moecxl.memory.tiers import Hardware

MIB = 1 << 20
READ_BYTES = 512 * MIB
MIXTRAL_D, MIXTRAL_F = 4096, 14336  # mistralai/Mixtral-8x7B-v0.1 config.json


def _best_s(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of `fn(i)` over `repeats` calls after one warm-up call."""
    fn(-1)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.min(times)), float(np.median(times))


class ReadProbe:
    """This machine's read rate: float32 GEMV over `nbytes` (numpy BLAS, all cores)."""

    def __init__(self, nbytes: int = READ_BYTES, cols: int = 8192):
        rows = max(1, nbytes // (4 * cols))
        self.W_RC = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
        self.x_R = np.ones(rows, np.float32)

    @property
    def nbytes(self) -> int:
        return self.W_RC.nbytes

    def gbps(self, repeats: int = 5) -> float:
        best, _ = _best_s(lambda i: self.x_R @ self.W_RC, repeats)
        return self.nbytes / best / 1e9


def measure_peak_gflops(n: int = 4096, repeats: int = 3) -> float:
    """Best GFLOP/s of an n^3 float32 numpy matmul (the compute roof of this host)."""
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best, _ = _best_s(lambda i: a @ a, repeats)
    return 2 * n**3 / best / 1e9


def make_experts(d_model: int, d_ff: int, n_experts: int, dtype: str, seed: int = 0):
    """`n_experts` packed SwiGLU experts (gate, up [D, F], down [F, D]) in `dtype` ('bfloat16' or 'int8',
    the latter as `store.quantize_int8` pairs), filled with N(0, 0.02) values."""
    layout = ExpertLayout(((d_model, d_ff), (d_model, d_ff), (d_ff, d_model)), "bfloat16")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_experts):
        packed = numa.aligned_zeros(layout.nbytes, align=4096).view(
            BF16
        )  # page-aligned, as the store holds it
        for o in range(0, layout.numel, 1 << 24):  # in chunks: no float32 copy of the whole expert
            n = min(1 << 24, layout.numel - o)
            packed[o : o + n] = rng.standard_normal(n, dtype=np.float32) * 0.02
        out.append(quantize_int8(packed, layout) if dtype == "int8" else packed)
    return layout, out


def machine() -> dict:
    """What this machine is: CPU model, cores, memory, caches, versions, load."""
    cpu, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("?", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512f", "avx2", "amx"))]
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    caches = {}
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, kind = (idx / "level").read_text().strip(), (idx / "type").read_text().strip()
            caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = (
                (idx / "size").read_text().strip()
            )
        except OSError:
            continue
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "mem_bytes": mem,
        "caches_cpu0": dict(sorted(caches.items())),
        "simd_flags": sorted(flags),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }


def run(
    d_model: int = MIXTRAL_D,
    d_ff: int = MIXTRAL_F,
    tokens=(1, 4, 8, 16, 32),
    dtypes=("bfloat16", "int8"),
    repeats: int = 5,
    n_experts: int = 3,
    read_bytes: int = READ_BYTES,
    baseline: bool = True,
    log=print,
    peak_n: int = 4096,
    compare_paths: bool = True,
) -> dict:
    """The whole measurement as one JSON-ready record (see the module docstring)."""
    t_start = time.time()
    load_before = os.getloadavg()
    probe = ReadProbe(read_bytes)
    peak = measure_peak_gflops(peak_n)
    reads = [probe.gbps(repeats)]
    peaks = [peak]
    log(f"read {reads[0]:.1f} GB/s (float32 GEMV over {probe.nbytes / MIB:.0f} MiB), peak {peak:.0f} GFLOP/s")
    rows = []
    blas = _blas_f32_s(d_model, d_ff, tokens, repeats) if baseline else {}
    for dtype in dtypes:
        layout, experts = make_experts(d_model, d_ff, n_experts, dtype)
        nbytes = layout.numel * (1 if dtype == "int8" else 2)
        params = layout.numel
        rng = np.random.default_rng(2)
        for n in tokens:
            x = rng.standard_normal((n, d_model), dtype=np.float32)
            run_one = lambda i, x=x, ex=experts, lay=layout: expert_forward(x, ex[i % n_experts], lay)
            best, med = _best_s(run_one, repeats)
            read = probe.gbps(repeats)
            reads.append(read)
            row_peak = measure_peak_gflops(peak_n)  # beside the row too: this VM's speed drifts
            peaks.append(row_peak)
            roof_s = max(nbytes / (read * 1e9), 2.0 * params * n / (row_peak * 1e9))
            row = {
                "dtype": dtype,
                "n_tokens": n,
                "expert_bytes": nbytes,
                "best_s": best,
                "median_s": med,
                "kernel_gbps": nbytes / best / 1e9,
                "kernel_gflops": 2.0 * params * n / best / 1e9,
                "read_gbps": read,
                "peak_gflops": row_peak,
                "kernel_over_read": nbytes / best / 1e9 / read,
                "roofline_s": roof_s,
                "over_roofline": best / roof_s,
            }
            if n in blas:  # the machine's own library on the same shapes, weights already float32
                row["blas_f32_s"] = blas[n]
                row["over_blas_f32"] = best / blas[n]
            row["path"] = "gemm" if n >= BATCHED_MIN_TOKENS else "loops"
            if compare_paths:
                for path in ("loops", "gemm"):
                    one = lambda i, x=x, ex=experts, lay=layout, p=path: expert_forward(
                        x, ex[i % n_experts], lay, path=p
                    )
                    row[f"{path}_s"] = _best_s(one, repeats)[0]
            rows.append(row)
            log(
                f"{dtype:8s} N={n:2d}: {row['kernel_gbps']:5.1f} GB/s ({row['kernel_gflops']:4.0f} GFLOP/s), "
                f"read {read:4.1f} GB/s -> {row['kernel_over_read']:.2f} of read; "
                f"{row['over_roofline']:.2f}x the roofline ({roof_s * 1e3:.1f} ms at {row_peak:.0f} GFLOP/s)"
                + (f", {row['over_blas_f32']:.2f}x float32 BLAS" if "over_blas_f32" in row else "")
                + (
                    f"; loops {row['loops_s'] * 1e3:.1f} ms, gemm {row['gemm_s'] * 1e3:.1f} ms"
                    if compare_paths
                    else ""
                )
            )
        if baseline and dtype == "bfloat16":  # the engine's numpy path today: float32 copy, then matmul
            x = rng.standard_normal((1, d_model), dtype=np.float32)

            def numpy_path(i, x=x, ex=experts, lay=layout):
                g, u, dn = lay.unpack(np.asarray(ex[i % n_experts], np.float32))
                h = x @ g
                h = h / (1.0 + np.exp(-h)) * (x @ u)
                return h @ dn

            best, _ = _best_s(numpy_path, max(2, repeats // 2))
            base = {"path": "numpy: astype(float32) per call, then matmul", "dtype": dtype, "n_tokens": 1}
            base["gbps"] = nbytes / best / 1e9
            log(f"baseline {base['path']}: {base['gbps']:.1f} GB/s")
    return {
        "what": "host expert kernel (moecxl.memory.hostkernel) vs this machine's read rate",
        "command": "python -m moecxl.memory.hostbench " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "wall_s": time.time() - t_start,
        "machine": machine(),
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "expert": {"d_model": d_model, "d_ff": d_ff, "matrices": "gate, up [D, F]; down [F, D]"},
        "read": {
            "how": f"float32 GEMV x @ W over {probe.nbytes} bytes (numpy BLAS), best of {repeats}",
            "gbps": float(np.median(reads)),
            "all_gbps": reads,
        },
        "peak_gflops": float(np.median(peaks)),
        "all_peak_gflops": peaks,
        "peak_how": f"float32 {peak_n}^3 numpy matmul, best of 3",
        "kernel": rows,
        "baseline": base if baseline and "bfloat16" in dtypes else None,
    }


def _blas_f32_s(d_model: int, d_ff: int, tokens, repeats: int) -> dict[int, float]:
    """Best seconds per token count of the same expert FFN through numpy's BLAS with float32 weights
    (twice the bf16 bytes, no widening): what this machine's library reaches on these skinny shapes,
    the attainable reference beside the roofline (whose peak is a square matmul's)."""
    rng = np.random.default_rng(3)
    g, u = (0.02 * rng.standard_normal((d_model, d_ff), dtype=np.float32) for _ in range(2))
    dn = 0.02 * rng.standard_normal((d_ff, d_model), dtype=np.float32)
    out = {}
    for n in tokens:
        x = rng.standard_normal((n, d_model), dtype=np.float32)

        def ffn(i, x=x):
            h = x @ g
            return (h / (1.0 + np.exp(-h)) * (x @ u)) @ dn

        out[n] = _best_s(ffn, repeats)[0]
    return out


def measure_host_kernel(
    d_model: int = 2048, d_ff: int = 7168, n_tokens: int = 16, n_experts: int = 4, repeats: int = 3
) -> dict:
    """A quick measurement for `Hardware.detect(host_kernel=...)`: the read rate, the kernel's bf16 rate at
    1 token and its GFLOP/s at `n_tokens`, on experts of d_model x d_ff (default 88 MB each, cycled over
    `n_experts` so that they do not sit in the last-level cache). A few seconds (plus compiling once)."""
    rec = run(
        d_model, d_ff, (1, n_tokens), ("bfloat16",), repeats, n_experts, 256 * MIB, baseline=False,
        log=lambda s: None, peak_n=1024, compare_paths=False,
    )  # fmt: skip
    one, big = rec["kernel"]
    return {
        "read_gbps": one["read_gbps"],
        "kernel_gbps": one["kernel_gbps"],
        "gflops": big["kernel_gflops"],
        "source": f"moecxl.memory.hostbench.measure_host_kernel on {rec['machine']['cpu']} "
        f"({rec['machine']['cores']} cores, {rec['machine']['hostname']}), {rec['date']}, "
        f"load {rec['load_avg_before'][0]:.2f}",
    }


def host_kernel_of(record: dict, dtype: str = "bfloat16") -> dict:
    """`Hardware.detect(host_kernel=...)`'s measurement from a stored `run` record (1-token rate, the
    GFLOP/s at its largest batch), citing the record's machine, date and load."""
    rows = sorted((r for r in record["kernel"] if r["dtype"] == dtype), key=lambda r: r["n_tokens"])
    if not rows:
        raise KeyError(f"record has no {dtype} rows")
    m = record["machine"]
    return {
        "read_gbps": rows[0]["read_gbps"],
        "kernel_gbps": rows[0]["kernel_gbps"],
        "gflops": rows[-1]["kernel_gflops"],
        "source": f"{record.get('command', 'moecxl.memory.hostbench')} on {m['cpu']} ({m['cores']} cores, "
        f"{m['hostname']}), {record['date']}, load {record['load_avg_before'][0]:.2f}",
    }


@functools.cache
def kernel_table_here() -> KernelTable:
    """This machine's kernel rates per dtype (bf16, int8) and token count (1, 4, 8, 16, 32), measured once
    per process on 88 MB experts cycled four at a time (~10 s on 2 cores; `run`'s record, quick)."""
    rec = run(
        2048, 7168, (1, 4, 8, 16, 32), ("bfloat16", "int8"), 2, 4, 256 * MIB, baseline=False,
        log=lambda s: None, peak_n=512, compare_paths=False,
    )  # fmt: skip
    rec["command"] = "moecxl.memory.hostbench.kernel_table_here()"
    return KernelTable.from_bench(rec)


def detect_hardware(**kw) -> Hardware:
    """`Hardware.detect(**kw)` with a `host:` block measured by `measure_host_kernel()`."""
    return Hardware.detect(host_kernel=measure_host_kernel(), **kw)


def efficiency(record: dict, dtype: str = "bfloat16", n_tokens: int = 1) -> float:
    """Kernel bytes/s over read bytes/s for one row of a record (the profiles' `kernel_efficiency`)."""
    for r in record["kernel"]:
        if r["dtype"] == dtype and r["n_tokens"] == n_tokens:
            return float(r["kernel_over_read"])
    raise KeyError(f"record has no row for {dtype} at {n_tokens} tokens")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the JSON record here (default: print it)")
    ap.add_argument("--d-model", type=int, default=MIXTRAL_D)
    ap.add_argument("--d-ff", type=int, default=MIXTRAL_F)
    ap.add_argument("--tokens", default="1,4,8,16,32", help="comma-separated token counts")
    ap.add_argument("--dtypes", default="bfloat16,int8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--experts", type=int, default=3, help="experts cycled over (defeats the LLC)")
    ap.add_argument("--read-mib", type=int, default=READ_BYTES // MIB)
    args = ap.parse_args(argv)
    rec = run(
        args.d_model,
        args.d_ff,
        tuple(int(t) for t in args.tokens.split(",")),
        tuple(args.dtypes.split(",")),
        args.repeats,
        args.experts,
        args.read_mib * MIB,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    text = json.dumps(rec, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return rec


if __name__ == "__main__":
    main()
