"""Data-parallel trace collection (rows/s) and predictor training (steps/s) on 1, 2, 4, 8 devices
(JSON in bench/results/dp_scaleout.json).

On this machine the devices are CPU-emulated: `--xla_force_host_platform_device_count=8` makes 8 XLA
devices that share the same few physical cores, so splitting a batch over more of them adds dispatch
and collectives without adding compute: scaling is NOT expected here. The figure checks the path and its
overhead; on a machine with real accelerators run it as is (it uses every device it finds, up to 8).
Each row also says whether the data-parallel result equals the one-device result (traces: ids equal and
floats within 1e-5 relative; training: losses within 1e-5 relative).

    python -m bench.bench_dp [--tokens 4096] [--steps 20] [--out bench/results/dp_scaleout.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

if "jax" not in sys.modules and not os.environ.get("MOECXL_BENCH_REAL_DEVICES"):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import datasets
import jax
import numpy as np
from flax import nnx

from bench.bench_scaleout import CONFIG
from bench.common import machine, write_json
from moecxl.config import ModelConfig
from moecxl.data import SplitSpec, train_tokenizer
from moecxl.distributed import data_mesh, replicate_tree
from moecxl.model import MoEDecoder
from moecxl.traces import collect, read_traces
from predictor.data import TraceArrays, gather
from predictor.model import PredictorConfig, init
from predictor.train import TrainConfig, make_train_step, optimizer

ALL_TRAIN = (1.0, 0.0, 0.0)
STDLIB_FILES = ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py", "fnmatch.py")
TOL = 1e-5


def device_counts() -> list[int]:
    return [n for n in (1, 2, 4, 8) if n <= jax.local_device_count()]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ---------------------------------------------------------------------------------------- traces


def corpus_dir(root: Path) -> str:
    """A code corpus of a few CPython stdlib modules (always present), as a `file:` corpus."""
    d = root / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        (d / name).write_text((stdlib / name).read_text())
    return f"file:{d}"


def trace_rows_per_s(model, tok, corpus: str, root: Path, kw: dict, devices: int) -> tuple[float, Path]:
    """Rows/s of one collection after a warm-up collection (compiles) on the same devices."""
    collect(model, root / f"warm{devices}", corpus, tokenizer=tok, data_parallel=devices, **kw)
    t = time.perf_counter()
    out = collect(model, root / f"dp{devices}", corpus, tokenizer=tok, data_parallel=devices, **kw)
    elapsed_s = time.perf_counter() - t
    return len(read_traces(out)) / elapsed_s, out


def same_traces(a_dir: Path, b_dir: Path) -> bool:
    a, b = read_traces(a_dir), read_traces(b_dir)
    return (
        len(a) == len(b)
        and a.table.column("seq_id").equals(b.table.column("seq_id"))
        and a.table.column("pos").equals(b.table.column("pos"))
        and bool((a.expert_ids == b.expert_ids).all())
        and rel_err(b.expert_weights, a.expert_weights) < TOL
    )


def bench_traces(root: Path, tokens: int, batch: int, prompt_len: int, decode_tokens: int) -> dict:
    cfg = ModelConfig(**CONFIG)
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0))
    corpus = corpus_dir(root)
    tok = train_tokenizer(corpus, vocab_size=cfg.vocab_size, splits=SplitSpec(ALL_TRAIN))
    rows = []
    for decode in (0, decode_tokens):
        kw = dict(
            split="train",
            tokens=tokens,
            prompt_len=prompt_len,
            decode_tokens=decode,
            decode_every=4,
            batch=batch,
            shard_seqs=64,
            fractions=ALL_TRAIN,
            progress=lambda msg: None,
        )
        ref = None
        for n in device_counts():
            rate, out = trace_rows_per_s(model, tok, corpus, root / f"decode{decode}", kw, n)
            ref = ref or out
            rows.append(
                {
                    "devices": n,
                    "decode_tokens": decode,
                    "rows_per_s": rate,
                    "equals_one_device": same_traces(ref, out),
                }
            )
            print(rows[-1], flush=True)
    return {
        "what": "python -m moecxl.traces collect --data-parallel N: rows/s of a whole collection (prefill "
        "split over N devices; decode rows, when any, from single-device generate), after a warm-up run",
        "model_config": CONFIG,
        "batch": batch,
        "prompt_len": prompt_len,
        "tokens": tokens,
        "rows": rows,
    }


# -------------------------------------------------------------------------------------- predictor


def synthetic_arrays(N: int, L: int, E: int, K: int, seed: int = 0) -> TraceArrays:
    """Random routing of N rows in sequences of 64 (the step's cost does not depend on the routing)."""
    rng = np.random.default_rng(seed)
    ids_NLK = np.argsort(rng.random((N, L, E)), axis=-1)[..., :K].astype(np.int32)
    seq_N = np.arange(N) // 64
    prev_N = np.where(np.arange(N) % 64 > 0, np.arange(N) - 1, -1)
    return TraceArrays(
        "synthetic",
        L,
        E,
        K,
        0,
        ids_NLK,
        np.full((N, L, K), 1.0 / K, np.float32),
        prev_N,
        seq_N,
        np.zeros(N, bool),
        np.full(N, "code"),
    )


def bench_predictor(steps: int, batch_size: int) -> dict:
    tc = TrainConfig(features=("current", "history"), batch_size=batch_size)
    L, E, K = 8, 8, 2
    tr = synthetic_arrays(8192, L, E, K)
    pcfg = PredictorConfig(L, E, K, 0, tc.horizon, tc.current_layers, tc.features, tc.d_model)
    n_W = np.repeat(np.arange(tr.N), L - 1)
    l_W = np.tile(np.arange(L - 1), tr.N)
    opt = optimizer(tc.weight_decay)
    lr = np.float32(1e-3)
    rows, ref_losses = [], None
    for n in device_counts():
        graphdef, params = init(pcfg, tc.seed)
        opt_state = jax.jit(opt.init)(params)
        mesh = data_mesh(n) if n > 1 else None
        if mesh is not None:
            params, opt_state = replicate_tree(params, mesh), replicate_tree(opt_state, mesh)
        step = make_train_step(graphdef, opt, E, False, mesh)
        losses, times_s = [], []
        for i in range(steps + 2):  # the first two: compile and warm-up, not timed
            pick = np.random.default_rng([tc.seed, i]).integers(0, len(n_W), batch_size)
            t = time.perf_counter()
            b = gather(tr, n_W[pick], l_W[pick], tc.horizon, tc.current_layers, tc.features)
            params, opt_state, loss = step(params, opt_state, b, lr)
            losses.append(float(loss))  # a host sync per step, as in train()
            times_s.append(time.perf_counter() - t)
        ref_losses = ref_losses or losses
        rows.append(
            {
                "devices": n,
                "steps_per_s": steps / sum(times_s[2:]),
                "windows_per_s": steps * batch_size / sum(times_s[2:]),
                "losses_equal_one_device": rel_err(losses, ref_losses) < TOL,
                "loss_rel_err": rel_err(losses, ref_losses),
            }
        )
        print(rows[-1], flush=True)
    return {
        "what": "predictor training step (gather + jitted AdamW step, train_predictor.py --data-parallel N)"
        ", batch split over N devices, gradients of the whole batch",
        "predictor": pcfg.to_dict(),
        "batch_size": batch_size,
        "timed_steps": steps,
        "optimizer": "AdamW (clip 1.0), constant lr 1e-3",
        "rows": rows,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="trace rows per collection")
    ap.add_argument("--batch", type=int, default=8, help="trace collection batch (sequences)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed predictor steps")
    ap.add_argument("--predictor-batch", type=int, default=512)
    ap.add_argument("--out", default="bench/results/dp_scaleout.json")
    args = ap.parse_args(argv)
    datasets.disable_progress_bars()
    backend = jax.default_backend()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MOECXL_CACHE", str(Path(tmp) / "cache"))
        traces = bench_traces(Path(tmp), args.tokens, args.batch, args.prompt_len, args.decode_tokens)
    result = {
        "devices_kind": f"CPU-emulated devices sharing {os.cpu_count()} cores (forced XLA host devices on "
        "the same physical cores): scaling is not expected"
        if backend == "cpu"
        else f"{backend} devices",
        "trace_collection": traces,
        "predictor_training": bench_predictor(args.steps, args.predictor_batch),
        "machine": machine(),
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
