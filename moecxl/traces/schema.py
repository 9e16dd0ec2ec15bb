"""The trace format: the schema of a row, writing rows as Arrow, reading and validating a trace directory.

A trace directory holds `metadata.json` and Parquet shards `shard-NNNNN.parquet`, one row per routed token:

  seq_id int64 · pos int32 (position in its sequence) · token_id int32 (the token whose hidden state was
  routed) · phase "prefill" | "decode" · domain (prose, code, ... from the corpus) · doc_id ·
  expert_ids [L][K] int16 · expert_weights [L][K] float32 · optional router_logits [L][E] float32 (raw)
  · optional hidden_sketch [L][P] float32 (each MoE layer's input hidden state times the seeded Gaussian
  projection [D, P] stored in the metadata, so a predictor can sketch live hidden states the same way).

Layers are the model's MoE layers in order (`moecxl.model.family`: a decoder's, or Switch's encoder's then
decoder's); the layers a token does not pass through hold expert id -1, weight 0, logits and sketch NaN.
Shard i holds sequences [i*S, (i+1)*S); rows are sorted by (seq_id, pos).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
METADATA = "metadata.json"
SHARD_GLOB = "shard-*.parquet"
PHASES = ("prefill", "decode")
REQUIRED_METADATA = (
    "schema_version",
    "model",
    "corpus",
    "split",
    "L",
    "E",
    "K",
    "P",
    "layers",
    "tokenizer",
    "moecxl_version",
    "args",
    "columns",
    "shards",
    "num_sequences",
    "complete",
)


class TraceError(ValueError):
    """A trace directory is missing, corrupted, of an unknown schema, or does not match the model."""


# ------------------------------------------------------------------------------------------------- schema


def features(L: int, E: int, K: int, P: int, router_logits: bool) -> datasets.Features:
    """The HF `datasets` features of one trace row (fixed-size lists, so columns reshape to numpy)."""
    cols = {
        "seq_id": datasets.Value("int64"),
        "pos": datasets.Value("int32"),
        "token_id": datasets.Value("int32"),
        "phase": datasets.Value("string"),
        "domain": datasets.Value("string"),
        "doc_id": datasets.Value("string"),
        "expert_ids": datasets.List(datasets.List(datasets.Value("int16"), length=K), length=L),
        "expert_weights": datasets.List(datasets.List(datasets.Value("float32"), length=K), length=L),
    }
    if router_logits:
        cols["router_logits"] = datasets.List(datasets.List(datasets.Value("float32"), length=E), length=L)
    if P:
        cols["hidden_sketch"] = datasets.List(datasets.List(datasets.Value("float32"), length=P), length=L)
    return datasets.Features(cols)


def _nested(x_NLX: np.ndarray) -> pa.Array:
    N, L, X = x_NLX.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x_NLX).reshape(-1)), X)
    return pa.FixedSizeListArray.from_arrays(inner, L)


def rows_table(rows: dict[str, np.ndarray], feats: datasets.Features) -> pa.Table:
    """An Arrow table of the schema `feats` from numpy columns ([N] scalars, [N, L, X] nested)."""
    schema = feats.arrow_schema
    arrays = []
    for field in schema:
        col = rows[field.name]
        arrays.append(
            _nested(col.astype(field.type.value_type.value_type.to_pandas_dtype()))
            if col.ndim == 3
            else pa.array(col, type=field.type)
        )
    return pa.Table.from_arrays(arrays, schema=schema)


def _nested_numpy(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """A [N][L][X] fixed-size list column as a numpy array [N, L, X], without Python lists."""
    L = column.type.list_size
    X = column.type.value_type.list_size
    flat = np.concatenate(
        [c.flatten().flatten().to_numpy(zero_copy_only=False) for c in column.chunks] or [np.zeros(0, dtype)]
    )
    return flat.astype(dtype, copy=False).reshape(-1, L, X)


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class TraceSet:
    """A trace directory read and validated: the metadata and one Arrow table of every row."""

    path: Path
    metadata: dict
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def dataset(self) -> datasets.Dataset:
        """The rows as an HF `datasets.Dataset` (in memory)."""
        return datasets.Dataset(datasets.table.InMemoryTable(self.table))

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    @property
    def expert_ids(self) -> np.ndarray:
        """int32 [N, L, K]; -1 where a token does not pass a layer (Switch)."""
        return _nested_numpy(self.table.column("expert_ids"), np.int32)

    @property
    def expert_weights(self) -> np.ndarray:
        """float32 [N, L, K]."""
        return _nested_numpy(self.table.column("expert_weights"), np.float32)

    @property
    def router_logits(self) -> np.ndarray | None:
        """float32 [N, L, E], or None when not collected."""
        if "router_logits" not in self.table.column_names:
            return None
        return _nested_numpy(self.table.column("router_logits"), np.float32)

    @property
    def hidden_sketch(self) -> np.ndarray | None:
        """float32 [N, L, P], or None when not collected."""
        if "hidden_sketch" not in self.table.column_names:
            return None
        return _nested_numpy(self.table.column("hidden_sketch"), np.float32)

    @property
    def sketch_projection(self) -> np.ndarray | None:
        """float32 [D, P]: apply to a live MoE input hidden state to get its sketch."""
        sk = self.metadata.get("sketch")
        return None if not sk else np.asarray(sk["projection_DP"], np.float32)

    @property
    def seq_id(self) -> np.ndarray:
        return self.column("seq_id")

    @property
    def pos(self) -> np.ndarray:
        return self.column("pos")

    @property
    def is_decode(self) -> np.ndarray:
        """bool [N]: phase == "decode"."""
        return pc.equal(self.table.column("phase"), "decode").to_numpy(zero_copy_only=False)

    @property
    def domain(self) -> np.ndarray:
        """str [N]."""
        return self.table.column("domain").to_numpy(zero_copy_only=False).astype(str)

    def seq_bounds(self) -> np.ndarray:
        """int64 [S + 1]: rows of sequence i are [b[i], b[i+1]) (rows are sorted by seq_id, then pos)."""
        sid = self.seq_id
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]]) if len(sid) else np.zeros(0, np.int64)
        return np.r_[starts, len(sid)].astype(np.int64)


def _read_metadata(path: Path) -> dict:
    meta_path = path / METADATA
    if not path.is_dir():
        raise TraceError(f"{path}: no such trace directory")
    if not meta_path.is_file():
        raise TraceError(f"{meta_path}: missing metadata file ({METADATA}); not a trace directory")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TraceError(f"{meta_path}: unreadable metadata: {e}") from e
    if not isinstance(meta, dict):
        raise TraceError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if "schema_version" not in meta:
        raise TraceError(f"{meta_path}: missing field 'schema_version'")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise TraceError(
            f"{meta_path}: field 'schema_version' is {meta['schema_version']!r}; this moecxl reads "
            f"version {SCHEMA_VERSION}"
        )
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise TraceError(f"{meta_path}: missing field(s) {missing}")
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """A trace directory's metadata alone, validated (no shard is read)."""
    return _read_metadata(Path(path))


def _meta_features(meta: dict) -> datasets.Features:
    return features(meta["L"], meta["E"], meta["K"], meta["P"], "router_logits" in meta["columns"])


def read_shard(file: Path, feats: datasets.Features) -> pa.Table:
    """One shard, checked against the schema; a truncated or corrupted file names itself."""
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as e:
        raise TraceError(f"{file}: corrupted or truncated shard: {e}") from e
    want = feats.arrow_schema
    for field in want:
        if field.name not in table.column_names:
            raise TraceError(f"{file}: missing column {field.name!r}")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise TraceError(f"{file}: column {field.name!r} has type {got}, expected {field.type}")
    return table.select(want.names).cast(want)


def read_traces(path: str | os.PathLike, require_complete: bool = False) -> TraceSet:
    """Read and validate a trace directory: metadata, schema version, every shard listed and readable."""
    path = Path(path)
    meta = _read_metadata(path)
    feats = _meta_features(meta)
    listed = {s["file"]: s for s in meta["shards"]}
    files = sorted(path.glob(SHARD_GLOB))
    present = {f.name for f in files}
    lost = sorted(set(listed) - present)
    if lost:
        raise TraceError(f"{path}: shard(s) {lost} listed in {METADATA} are missing")
    if require_complete and not meta["complete"]:
        raise TraceError(f"{path / METADATA}: field 'complete' is false (collection unfinished; rerun it)")
    tables = []
    for f in files:
        t = read_shard(f, feats)
        if f.name in listed and listed[f.name]["rows"] != t.num_rows:
            raise TraceError(f"{f}: {t.num_rows} rows, {METADATA} says {listed[f.name]['rows']}")
        tables.append(t)
    table = pa.concat_tables(tables) if tables else feats.arrow_schema.empty_table()
    ts = TraceSet(path, meta, table)
    sid, pos = ts.seq_id, ts.pos
    if len(sid) > 1:
        step_ok = (sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (pos[1:] > pos[:-1]))
        if not step_ok.all():
            i = int(np.argmin(step_ok)) + 1
            raise TraceError(f"{path}: rows out of order or duplicated at seq_id {sid[i]}, pos {pos[i]}")
    return ts


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as JSON through a temp file and a rename: a reader sees the old file or the new one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)
