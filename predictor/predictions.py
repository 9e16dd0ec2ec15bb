"""A trained predictor's probabilities for every row of a trace set, stored for the simulator to replay.

    python train_predictor.py predict --predictor RUN/predictor --traces DIR [--model DIR] [--out FILE]

For each trace row n and MoE layer l: p[n, l, h, e] = P(expert e is in layer l+1+h's top-k), computed as
the live predictor computes it (pre-gate logits in float32 from the traced model; the previous token's
routing only for decode rows, as a prefill forward has none). Written with `moecxl.sim.stored`
(safetensors, atomically) beside the traces; its header names the predictor checkpoint and its hash,
the trace set's fingerprint and tokenizer. `moecxl.sim.stored.StoredPredictions` replays them.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
from flax import nnx

import moecxl
from moecxl.sim.stored import DEFAULT_NAME, predictions_path, save_predictions, trace_fingerprint
from moecxl.traces import read_traces
from predictor.checkpoint import check_shape, check_tokenizer, load_predictor
from predictor.data import load_arrays
from predictor.train import Learned

DTYPES = {"float32": np.float32, "float16": np.float16}


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 over a predictor checkpoint's files (relative paths and bytes, sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def predict_traces(
    predictor_dir: str | os.PathLike,
    traces: str | os.PathLike,
    *,
    model=None,
    out: str | os.PathLike | None = None,
    dtype: str = "float32",
    name: str = DEFAULT_NAME,
) -> Path:
    """Write the predictor's probabilities for every (row, MoE layer) of `traces`; returns the file.

    `model`: the traced model (path or object) for pre-gate features; default the traces' metadata path.
    `out`: default `<traces>/predictions/<name>.safetensors`. `dtype`: float16 halves the file (a
    probability to ~5e-4), float32 replays the live predictor's numbers."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: known {sorted(DTYPES)}")
    t0 = time.perf_counter()
    net, meta = load_predictor(predictor_dir)
    ts = read_traces(traces)
    tm = ts.metadata
    where = f"traces {ts.path}"
    check_shape(meta, tm["L"], tm["E"], tm["K"], where)
    check_tokenizer(meta.get("tokenizer"), tm.get("tokenizer"), f"predictor {predictor_dir}", where)
    cfg = net.cfg
    if isinstance(model, (str, os.PathLike)):
        model = moecxl.load(model)
    tr = load_arrays(ts, cfg.features, cfg.H, model, pregate_dtype=np.float32)
    graphdef, params = nnx.split(net, nnx.Param)
    learned = Learned(graphdef, params, cfg, history="decode")  # as live: no history in prefill
    N, L = tr.N, tr.L
    n_W = np.repeat(np.arange(N, dtype=np.int64), L)
    l_W = np.tile(np.arange(L, dtype=np.int32), N)
    p_NLHE = learned.predict(tr, n_W, l_W).reshape(N, L, cfg.H, cfg.E).astype(DTYPES[dtype])
    dst = Path(out) if out is not None else predictions_path(ts.path, name)
    record = {
        "predictor": {
            "path": str(Path(predictor_dir).absolute()),
            "hash": checkpoint_hash(predictor_dir),
            "model": meta.get("model"),
            "config": cfg.to_dict(),
            "trained_on": meta.get("traces"),
            "history": "decode rows only (as live)",
        },
        "traces": {
            "path": str(Path(ts.path).absolute()),
            "fingerprint": trace_fingerprint(ts),
            "rows": N,
            "L": tm["L"],
            "E": tm["E"],
            "K": tm["K"],
            "model_hash": (tm.get("model") or {}).get("hash"),
            "tokenizer_hash": (tm.get("tokenizer") or {}).get("hash"),
        },
        "semantics": "p[n, l, h, e] = P(expert e in the top-k of MoE layer l+1+h | trace row n at layer l)",
        "moecxl_version": moecxl.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return save_predictions(dst, p_NLHE, record)
