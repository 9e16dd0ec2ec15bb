"""Stored predictions: a learned predictor's probabilities for every trace row, replayed to the decision core.

`train_predictor.py predict` runs a trained predictor over a trace set once and writes, for every row n
and MoE layer l, p[n, l, h, e] = P(expert e is in layer l+1+h's top-k), with the live predictor's
semantics (the previous token's routing only for decode rows: a prefill forward has none). They are
stored next to the traces (`<traces>/predictions/<name>.safetensors`, written to a temporary file then
renamed; metadata in the safetensors header: the predictor checkpoint and its hash, the trace set's
fingerprint and its tokenizer). Per row, not per visit, so one file serves every batch size and
request cut: `StoredPredictions.candidates` combines the rows of the visit the core is at, as
`predictor.live` combines a step's tokens (P(any token uses e) = 1 - prod(1 - p)), and returns the same
best-first candidates. The simulator passes a visit's trace rows as its features (`Request.rows`).

Why stored, not run inside the simulator: the predictor's pre-gate features need the traced model's
forward over every sequence (minutes on a CPU for the paper-scale trace); done once, the simulator
stays free of the model and JAX, and every policy, profile and batch of an experiment reads one file.

Key: N trace rows, L MoE layers, H horizon, E experts, K top-k, R rows of one visit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

KIND = "moecxl.stored_predictions"
FORMAT = 1
TENSOR = "p_NLHE"
DEFAULT_NAME = "learned"
P_MAX = 1.0 - 1e-6  # as predictor.live: a certain token does not make log(1 - p) infinite


class StoredPredictionsError(ValueError):
    """Stored predictions that are missing, unreadable, or made for another trace set or model shape;
    the message names the file and the value."""


def predictions_path(trace_dir: str | os.PathLike, name: str = DEFAULT_NAME) -> Path:
    """Where a trace set's stored predictions live: `<trace_dir>/predictions/<name>.safetensors`."""
    return Path(trace_dir) / "predictions" / f"{name}.safetensors"


def trace_fingerprint(ts) -> str:
    """sha256 of what the rows route (shape, sequence, position, phase, expert ids): predictions keyed by
    row mean something only for the trace set they were made on, wherever it is stored."""
    meta = ts.metadata
    h = hashlib.sha256(f"L={meta['L']} E={meta['E']} K={meta['K']} N={len(ts)}".encode())
    for a in (ts.seq_id.astype(np.int64), ts.pos.astype(np.int64), ts.is_decode.astype(np.uint8)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.ascontiguousarray(ts.expert_ids, np.int32).tobytes())
    return h.hexdigest()


def save_predictions(path: str | os.PathLike, p_NLHE: np.ndarray, meta: dict) -> Path:
    """Write p [N, L, H, E] and `meta` (JSON in the safetensors header) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = np.ascontiguousarray(p_NLHE)
    if p.ndim != 4 or p.dtype not in (np.float16, np.float32):
        raise StoredPredictionsError(f"{path}: p must be float16/32 [N, L, H, E], got {p.dtype} {p.shape}")
    record = {"kind": KIND, "format": FORMAT, **meta, "shape_NLHE": list(p.shape), "dtype": str(p.dtype)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({TENSOR: p}, tmp, metadata={"moecxl": json.dumps(record)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a stored-predictions file (no tensor read)."""
    path = Path(path)
    if not path.is_file():
        raise StoredPredictionsError(
            f"{path}: no stored predictions; write them with `python train_predictor.py predict --predictor "
            f"DIR --traces {path.parent.parent}`"
        )
    try:
        with safe_open(path, "numpy") as f:
            header = f.metadata() or {}
            meta = json.loads(header["moecxl"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise StoredPredictionsError(f"{path}: unreadable stored predictions: {e!r}") from e
    if meta.get("kind") != KIND or meta.get("format") != FORMAT:
        raise StoredPredictionsError(
            f"{path}: kind/format {meta.get('kind')!r}/{meta.get('format')!r}; this moecxl reads {KIND!r}/{FORMAT}"
        )
    return meta


class StoredPredictions:
    """The runtime's `Predictor` from stored per-row probabilities. `features` (what the simulator passes
    with each visit) are the visit's trace rows; `per_layer` candidates per future layer (default 2K,
    as `predictor.live.LivePredictor`)."""

    def __init__(self, p_NLHE: np.ndarray, meta: dict, path: str = "", per_layer: int | None = None):
        self.p_NLHE, self.meta, self.path = p_NLHE, meta, str(path)
        self.N, self.L, self.H, self.E = p_NLHE.shape
        self.K = int(meta["traces"]["K"])
        self.per_layer = per_layer or 2 * self.K
        self.ids_NLK = None  # the trace's routing, once checked against it: each visit's rows are verified

    @classmethod
    def load(cls, path: str | os.PathLike, ts=None, shape=None, per_layer: int | None = None):
        """Read a file; with `ts` (its `TraceSet`) and `shape` (the simulated `ModelShape`), check that
        it belongs to that trace set and fits that model."""
        meta = read_meta(path)
        with safe_open(path, "numpy") as f:
            p = f.get_tensor(TENSOR)
        if list(p.shape) != meta["shape_NLHE"]:
            raise StoredPredictionsError(
                f"{path}: tensor {TENSOR} is {p.shape}, header says {meta['shape_NLHE']}"
            )
        out = cls(p, meta, str(path), per_layer)
        if ts is not None:
            out.check_traces(ts)
        if shape is not None:
            out.check_shape(shape)
        return out

    @property
    def predictor_hash(self) -> str:
        return self.meta["predictor"]["hash"]

    def describe(self) -> dict:
        """What the results say about the predictor replayed: file, checkpoint, hash, horizon."""
        pr = self.meta["predictor"]
        return {
            "file": self.path,
            "predictor": pr.get("path"),
            "predictor_hash": pr.get("hash"),
            "horizon": self.H,
            "per_layer": self.per_layer,
            "trace_fingerprint": self.meta["traces"]["fingerprint"],
            "dtype": self.meta.get("dtype"),
        }

    def check_traces(self, ts) -> None:
        """Refuse predictions of another trace set (fingerprint), another row count or topology."""
        tr = self.meta["traces"]
        meta = ts.metadata
        for key, want in (("L", meta["L"]), ("E", meta["E"]), ("K", meta["K"]), ("rows", len(ts))):
            if tr[key] != want:
                raise StoredPredictionsError(
                    f"{self.path}: made for a trace set with {key}={tr[key]}, but {ts.path} has {key}={want}"
                )
        if (meta["L"], meta["E"]) != (self.L, self.E) or len(ts) != self.N:
            raise StoredPredictionsError(
                f"{self.path}: tensor is [N={self.N}, L={self.L}, H={self.H}, E={self.E}] but {ts.path} has "
                f"N={len(ts)} rows, L={meta['L']}, E={meta['E']}"
            )
        got = trace_fingerprint(ts)
        if tr["fingerprint"] != got:
            raise StoredPredictionsError(
                f"{self.path}: made for trace set {tr.get('path')!r} with fingerprint {tr['fingerprint'][:16]}..., "
                f"but {ts.path} has fingerprint {got[:16]}... (another trace set, or these traces were "
                "re-collected): write the predictions again for these traces"
            )
        want_tok = (meta.get("tokenizer") or {}).get("hash")
        if tr.get("tokenizer_hash") and want_tok and tr["tokenizer_hash"] != want_tok:
            raise StoredPredictionsError(
                f"{self.path}: tokenizer sha256 {tr['tokenizer_hash'][:16]}... but {ts.path}'s is {want_tok[:16]}..."
            )
        self.ids_NLK = ts.expert_ids

    def check_shape(self, shape, horizon: int | None = None) -> None:
        """Refuse a simulated model of other L/E/K, or a policy looking further ahead than was stored."""
        bad = [
            f"{k}: predictions {a}, model {b}"
            for k, a, b in (("L", self.L, shape.L), ("E", self.E, shape.E), ("K", self.K, shape.K))
            if a != b
        ]
        if bad:
            raise StoredPredictionsError(
                f"{self.path}: stored predictions do not fit target model {shape.name!r} ({'; '.join(bad)}); "
                "a tiled layer map cannot replay per-layer predictions"
            )
        if horizon is not None and horizon > self.H:
            raise StoredPredictionsError(
                f"{self.path}: stored horizon H={self.H}, but the policy looks {horizon} layers ahead"
            )

    def reset(self) -> None:
        """Nothing to forget: the rows carry their own history."""

    def probs(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """p [H, E]: P(some row of the visit uses expert e at layer+1+h)."""
        p_RHE = self.p_NLHE[rows, layer].astype(np.float32)
        return 1.0 - np.exp(np.log1p(-np.minimum(p_RHE, np.float32(P_MAX))).sum(0))

    def candidates(self, visit, layers, rows) -> list[tuple[tuple[int, int], float]]:
        """((layer, expert), p) for the `layers` ahead (within the stored horizon), best first."""
        m = visit.layer
        if rows is None:
            raise StoredPredictionsError(
                f"{self.path}: visit of layer {m} ({visit.phase} step {visit.step}) comes without its trace rows; "
                "replay requests built from a trace (moecxl.sim.workload: Request.rows)"
            )
        rows = np.asarray(rows, np.int64)
        if self.ids_NLK is not None:
            got = tuple(int(e) for e in np.unique(self.ids_NLK[rows, m][self.ids_NLK[rows, m] >= 0]))
            if got != tuple(visit.experts):
                raise StoredPredictionsError(
                    f"{self.path}: visit of layer {m} ({visit.phase} step {visit.step}) needs experts "
                    f"{tuple(visit.experts)} but its trace rows {rows[:8].tolist()}... route to {got}: rows "
                    "and visits disagree"
                )
        wanted = [layer for layer in layers if 0 < layer - m <= self.H]
        if not wanted:
            return []
        p_HE = self.probs(m, rows)
        out = []
        for layer in wanted:
            row = p_HE[layer - m - 1]
            for e in np.argsort(-row, kind="stable")[: self.per_layer]:
                out.append(((layer, int(e)), float(row[e])))
        out.sort(key=lambda c: -c[1])
        return out


LEARNED_SUFFIX = "_learned"


def learned_policy(policy):
    """`policy` with the learned predictor as its prefetch source, named `<name>_learned` (moecxl ->
    moecxl_learned: the row beside pre-gating)."""
    return dataclasses.replace(policy, name=policy.name + LEARNED_SUFFIX, prefetch="predictor")
