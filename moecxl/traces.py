"""Router traces: the schema, `collect` (prefill forwards + greedy `generate`), reading, and statistics.

A trace directory holds `metadata.json` and Parquet shards `shard-NNNNN.parquet`, one row per routed token:

  seq_id int64 · pos int32 (position in its sequence) · token_id int32 (the token whose hidden state was
  routed) · phase "prefill" | "decode" · domain (prose, code, ... from the corpus) · doc_id ·
  expert_ids [L][K] int16 · expert_weights [L][K] float32 · optional router_logits [L][E] float32 (raw)
  · optional hidden_sketch [L][P] float32 (each MoE layer's input hidden state times the seeded Gaussian
  projection [D, P] stored in the metadata, so a predictor can sketch live hidden states the same way).

Layers are the model's MoE layers in order. A sequence is a chunk of a document framed as a prompt of the
checkpoint's tokenizer (`moecxl.tokenizer`: BOS first where the tokenizer adds one; Switch: EOS last), at
most `prompt_len` tokens (prefill rows, pos 0..T-1); every `decode_every`-th sequence is continued greedily by `generate` and its
decode rows follow (pos T..T+M-1). Switch (encoder-decoder): layers are the encoder's sparse layers, then the
decoder's; prefill rows are encoder tokens, decode rows decoder tokens (token_id is the decoder input, the
start token first; pos continues after the S encoder tokens, so the decoder position is pos - S), and the
layers a token does not pass through hold expert id -1, weight 0, logits and sketch NaN.

Shard i holds sequences [i*S, (i+1)*S). A shard is written to a temp name and renamed, so a rerun keeps
the complete shards and computes only the missing ones: no row is duplicated or lost.

`--data-parallel N` splits each prefill batch over N devices (a `data` mesh axis, one SPMD program);
the rows are those of a single-device collection. Decode (`generate`) stays on one device.

    python -m moecxl.traces collect --model DIR --corpus mixed --split test --tokens 100000 --out DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moecxl.traces collect ... --data-parallel 8
    python -m moecxl.traces stats DIR --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from flax import nnx

from moecxl.model.family import family_of

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


RUN_ONLY_ARGS = ("batch", "data_parallel")  # how a collection ran, not what it holds: may change on resume


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


def _read_shard(file: Path, feats: datasets.Features) -> pa.Table:
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
        t = _read_shard(f, feats)
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


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TraceSeq:
    """One planned sequence: a chunk of a document, and whether `generate` continues it."""

    seq_id: int
    doc_id: str
    domain: str
    ids: tuple[int, ...]
    decode: bool


def plan_sequences(
    docs: Sequence[dict],
    prompt_len: int,
    total_rows: int,
    decode_tokens: int = 0,
    decode_every: int = 1,
    frame: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> list[TraceSeq]:
    """Cut documents into prompts of at most `prompt_len` tokens, each `prefix + chunk + suffix` with
    `frame` = (prefix, suffix) the tokenizer's prompt framing (tails kept when the prompt has >= 2
    tokens), interleave the domains round-robin (so a short collection still covers prose and code), and
    stop once the planned rows (prompt tokens + `decode_tokens` for every `decode_every`-th sequence)
    reach `total_rows`."""
    prefix, suffix = tuple(frame[0]), tuple(frame[1])
    step = prompt_len - len(prefix) - len(suffix)
    if step < 1:
        raise TraceError(
            f"collect: prompt_len {prompt_len} leaves no room for text between {prefix} and {suffix}"
        )
    streams: dict[str, list] = {}
    for d in docs:
        ids = list(d["input_ids"])
        for s in range(0, len(ids), step):
            chunk = prefix + tuple(ids[s : s + step]) + suffix
            if len(chunk) >= 2:
                streams.setdefault(d["domain"], []).append((d["doc_id"], d["domain"], chunk))
    order = [streams[k] for k in sorted(streams)]
    out, rows, i = [], 0, 0
    while rows < total_rows and any(i < len(s) for s in order):
        for s in order:
            if i < len(s) and rows < total_rows:
                decode = decode_tokens > 0 and len(out) % decode_every == 0
                out.append(TraceSeq(len(out), *s[i], decode))
                rows += len(s[i][2]) + (decode_tokens if decode else 0)
        i += 1
    return out


# ------------------------------------------------------------------------------------------- forwards


def _stacked_routing(r, proj_DP):
    """Per-layer routing lists (a decoder output or a Switch `Routing`) stacked on axis 2: logits [B, T, L, E],
    ids and weights [B, T, L, K], sketch [B, T, L, P] (each MoE input times the projection)."""
    st = partial(jnp.stack, axis=2)
    sketch = [jnp.einsum("BTD,DP->BTP", x.astype(jnp.float32), proj_DP) for x in r.moe_inputs]
    return (
        st(r.router_logits).astype(jnp.float32),
        st(r.expert_ids),
        st(r.expert_weights).astype(jnp.float32),
        st(sketch),
    )


def _decoder_routing_fn(graphdef, state, ids_BT, mask_BT, proj_DP):
    """Routing of every MoE layer of a decoder-only model, stacked: logits, ids, weights, sketch."""
    return _stacked_routing(nnx.merge(graphdef, state)(ids_BT, mask_BT), proj_DP)


def _switch_encoder_routing_fn(graphdef, state, ids_BS, mask_BS, proj_DP):
    """Routing of the encoder's sparse blocks of a Switch model, stacked as `_decoder_routing_fn`."""
    return _stacked_routing(nnx.merge(graphdef, state).encode(ids_BS, mask_BS).routing, proj_DP)


@partial(jax.jit, static_argnums=0)
def _switch_decoder_routing(graphdef, state, ids_BS, mask_BS, dec_in_BT, proj_DP):
    """Teacher-forced routing of the decoder's sparse blocks over `dec_in_BT`, stacked (the LM head is
    computed and dropped by XLA: only routing leaves the jit)."""
    model = nnx.merge(graphdef, state)
    enc = model.encode(ids_BS, mask_BS)
    _, routing = model.decode(dec_in_BT, enc.hidden_BSD, mask_BS)
    return _stacked_routing(routing, proj_DP)


_decoder_routing = jax.jit(_decoder_routing_fn, static_argnums=0)
_switch_encoder_routing = jax.jit(_switch_encoder_routing_fn, static_argnums=0)


@lru_cache(maxsize=8)
def _dp_routing(graphdef, mesh, switch: bool):
    """The prefill routing with the batch split over `mesh`'s `data` axis; cached, so a resumed or
    repeated collection on the same devices compiles it once."""
    from moecxl.distributed import data_parallel

    fn = _switch_encoder_routing_fn if switch else _decoder_routing_fn
    return data_parallel(partial(fn, graphdef), mesh, batch_args=(1, 2))


def _padded_batch(seqs: Sequence[TraceSeq], T: int, B: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [B, T]; missing rows repeat the first sequence (fixed shapes, one compile)."""
    ids = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), bool)
    for b in range(B):
        s = seqs[b] if b < len(seqs) else seqs[0]
        ids[b, T - len(s.ids) :] = s.ids
        mask[b, T - len(s.ids) :] = True
    return ids, mask


def _rows(seqs, phase, token_BT, pos_BT, valid_BT, ids_BTLK, w_BTLK, logits_BTLE, sketch_BTLP) -> dict:
    """Flatten the valid positions of the first len(seqs) batch rows into trace columns."""
    n = len(seqs)
    valid = valid_BT[:n]
    b_idx, t_idx = np.nonzero(valid)
    rows = {
        "seq_id": np.asarray([seqs[b].seq_id for b in b_idx], np.int64),
        "pos": pos_BT[:n][valid].astype(np.int32),
        "token_id": token_BT[:n][valid].astype(np.int32),
        "phase": np.asarray([phase] * len(b_idx), object),
        "domain": np.asarray([seqs[b].domain for b in b_idx], object),
        "doc_id": np.asarray([seqs[b].doc_id for b in b_idx], object),
        "expert_ids": ids_BTLK[:n][valid],
        "expert_weights": w_BTLK[:n][valid],
    }
    if logits_BTLE is not None:
        rows["router_logits"] = logits_BTLE[:n][valid]
    if sketch_BTLP is not None:
        rows["hidden_sketch"] = sketch_BTLP[:n][valid]
    return rows


def _concat_rows(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _sort_rows(rows: dict) -> dict:
    order = np.lexsort((rows["pos"], rows["seq_id"]))
    return {k: v[order] for k, v in rows.items()}


class _Collector:
    """Routing rows of a batch of sequences, for one model (decoder-only or Switch).

    With a `mesh`, each prefill batch is split over its `data` axis (one SPMD program, every device
    routes its rows; the batch is padded to a multiple of the axis size like a short last batch).
    Decode stays on one device: `generate` is the engine's per-layer loop with host hand-offs, and its
    batch (batch / decode_every sequences) is smaller than the device count at the defaults.
    """

    def __init__(
        self,
        model,
        prompt_len: int,
        decode_tokens: int,
        batch: int,
        decode_batch: int,
        proj_DP: np.ndarray,
        router_logits: bool,
        mesh=None,
        pad_id: int = 0,
    ):
        self.model, self.cfg, self.pad_id = model, model.cfg, pad_id
        self.T, self.M, self.B, self.Bd = prompt_len, decode_tokens, batch, decode_batch
        self.proj_DP = np.asarray(proj_DP, np.float32)
        self.want_logits, self.want_sketch = router_logits, proj_DP.shape[1] > 0
        self.graphdef, self.state = nnx.split(model)
        self.encoder_decoder = family_of(self.cfg).encoder_decoder
        if mesh is None:
            route = _switch_encoder_routing if self.encoder_decoder else _decoder_routing
            self._route, self._route_state = partial(route, self.graphdef), self.state
        else:
            from moecxl.distributed import DATA, replicate_tree

            n = mesh.shape[DATA]
            self.B = -(-batch // n) * n
            self._route = _dp_routing(self.graphdef, mesh, self.encoder_decoder)
            self._route_state = replicate_tree(self.state, mesh)

    def rows(self, seqs: Sequence[TraceSeq]) -> dict:
        """Prefill rows of every sequence and decode rows of those marked `decode`."""
        parts = [self._prefill(seqs)]
        dec = [s for s in seqs if s.decode]
        for i in range(0, len(dec), self.Bd):
            parts.append(self._decode(dec[i : i + self.Bd]))
        return _sort_rows(_concat_rows(parts))

    def _pad_layers(self, x_BTLX: np.ndarray, fill, first: bool) -> np.ndarray:
        """Switch: place encoder (first) or decoder layers in the full layer axis, `fill` elsewhere."""
        L = self.cfg.num_moe_layers
        B, T, Lh, X = x_BTLX.shape
        out = np.full((B, T, L, X), fill, x_BTLX.dtype)
        if first:
            out[:, :, :Lh] = x_BTLX
        else:
            out[:, :, L - Lh :] = x_BTLX
        return out

    def _prefill(self, seqs):
        ids, mask = _padded_batch(seqs, self.T, self.B, self.pad_id)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        lg, e, w, sk = (np.asarray(a) for a in self._route(self._route_state, ids, mask, self.proj_DP))
        if self.encoder_decoder:  # encoder rows: the encoder's layers first; the decoder's not passed
            lg, e, w, sk = (
                self._pad_layers(lg, np.nan, True),
                self._pad_layers(e, -1, True),
                self._pad_layers(w, 0, True),
                self._pad_layers(sk, np.nan, True),
            )
        return _rows(
            seqs,
            "prefill",
            ids,
            pos,
            mask,
            e,
            w,
            lg if self.want_logits else None,
            sk if self.want_sketch else None,
        )

    def _decode(self, seqs):
        if self.encoder_decoder:
            return self._decode_switch(seqs)
        from moecxl.generate import generate

        T, M = self.T, self.M
        ids, mask = _padded_batch(seqs, T, self.Bd, self.pad_id)
        res = generate(self.model, ids, max_new_tokens=M + 1, attention_mask=mask)
        new_BM = res.tokens[:, :M]
        e = np.stack([a[:, T : T + M] for a in res.expert_ids], axis=2)
        w = np.stack([a[:, T : T + M] for a in res.expert_weights], axis=2).astype(np.float32)
        pos = mask.sum(axis=1, keepdims=True) + np.arange(M)[None, :]
        lg = sk = None
        if self.want_logits or self.want_sketch:
            # generate returns ids and weights only: logits and sketches come from a teacher-forced
            # forward over prompt + generated tokens (the same causal computation, without the cache).
            full = np.concatenate([ids, new_BM], axis=1)
            full_mask = np.concatenate([mask, np.ones_like(new_BM, bool)], axis=1)
            lg, _, _, sk = (
                np.asarray(a)[:, T:]
                for a in _decoder_routing(self.graphdef, self.state, full, full_mask, self.proj_DP)
            )
        return _rows(
            seqs,
            "decode",
            new_BM,
            pos,
            np.ones_like(new_BM, bool),
            e,
            w,
            lg if self.want_logits else None,
            sk if self.want_sketch else None,
        )

    def _decode_switch(self, seqs):
        from moecxl.model.switch import switch_generate

        cfg, M = self.cfg, self.M
        ids, mask = _padded_batch(seqs, self.T, self.Bd, self.pad_id)
        gen = switch_generate(self.model, ids, M, mask)
        toks = np.asarray(gen.tokens)  # [B, M'] (M' < M when every row ended)
        Mg = toks.shape[1]
        dec_in = np.concatenate(
            [np.full((len(toks), 1), cfg.decoder_start_token_id, np.int32), toks[:, :-1]], axis=1
        )
        e = np.stack([np.asarray(a) for a in gen.decoder_expert_ids], axis=2)
        # Logits and sketches: a teacher-forced decoder over the generated tokens (as the decoder-only path).
        lg, _, _, sk = (
            np.asarray(a)
            for a in _switch_decoder_routing(self.graphdef, self.state, ids, mask, dec_in, self.proj_DP)
        )
        # The cached decoder routes one token at a time, so capacity never drops it: weight = top-1 prob.
        prob = np.exp(lg - lg.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        w = np.take_along_axis(prob, e, axis=-1).astype(np.float32)
        alive = np.ones_like(toks, bool)
        if cfg.eos_token_id is not None:  # rows after a row's EOS feed padding: not traced
            alive[:, 1:] = np.cumsum(toks[:, :-1] == cfg.eos_token_id, axis=1) == 0
        # Positions continue after the encoder tokens, so (seq_id, pos) stays a key; decoder position = pos - S.
        pos = mask.sum(axis=1, keepdims=True) + np.arange(Mg)[None, :]
        e, w, lg, sk = (
            self._pad_layers(e, -1, False),
            self._pad_layers(w, 0, False),
            self._pad_layers(lg, np.nan, False),
            self._pad_layers(sk, np.nan, False),
        )
        return _rows(
            seqs,
            "decode",
            dec_in,
            pos,
            alive,
            e,
            w,
            lg if self.want_logits else None,
            sk if self.want_sketch else None,
        )


# ------------------------------------------------------------------------------------------- collection


def model_hash(model) -> str:
    """blake2b over every parameter's path, shape, dtype and bytes: which weights made these traces."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in sorted(nnx.to_flat_state(nnx.state(model)), key=lambda kv: str(kv[0])):
        a = np.asarray(leaf.get_value() if hasattr(leaf, "get_value") else leaf[...])
        h.update(f"{'/'.join(map(str, path))}:{a.shape}:{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


def layer_names(cfg) -> list[str]:
    """Names of the traced layers in order: decoder 'layer.i'; Switch 'encoder.i' then 'decoder.i'."""
    return family_of(cfg).layer_names(cfg)


def sketch_projection(D: int, P: int, seed: int = 0) -> np.ndarray:
    """float32 [D, P] Gaussian random projection with entries N(0, 1/P) (Johnson-Lindenstrauss scaling)."""
    return (np.random.default_rng(seed).standard_normal((D, P)) / math.sqrt(max(P, 1))).astype(np.float32)


def _write_json_atomic(path: Path, data: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)


def _check_append(meta_path: Path, old: dict, new: dict) -> None:
    """Refuse to add to traces of another model shape, model, tokenizer or collection."""
    for key in ("L", "E", "K"):
        if old.get(key) != new[key]:
            raise TraceError(
                f"{meta_path}: field {key!r} is {old.get(key)} in the existing traces but the model has "
                f"{new[key]}; write these traces to another --out directory"
            )
    pairs = [
        ("model.hash", old["model"].get("hash"), new["model"]["hash"]),
        ("tokenizer.hash", old["tokenizer"].get("hash"), new["tokenizer"]["hash"]),
    ]
    if "special" in old["tokenizer"]:  # traces written before special ids were recorded lack it
        pairs.append(("tokenizer.special", old["tokenizer"]["special"], new["tokenizer"]["special"]))
    pairs += [(f"args.{k}", old["args"].get(k), v) for k, v in new["args"].items() if k not in RUN_ONLY_ARGS]
    for field, a, b in pairs:
        if a != b:
            raise TraceError(
                f"{meta_path}: field {field!r} is {a!r} in the existing traces, {b!r} now; resume only "
                f"with the same model and arguments, or write to another --out directory"
            )


def collect(
    model,
    out: str | os.PathLike,
    corpus: str,
    split: str = "test",
    tokens: int = 10_000,
    *,
    tokenizer=None,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    decode_every: int = 4,
    batch: int = 8,
    router_logits: bool = False,
    sketch: int = 0,
    sketch_seed: int = 0,
    shard_seqs: int = 64,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    holdout_domain: str | None = None,
    max_shards: int | None = None,
    data_parallel: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Collect router traces of `model` (a checkpoint path or a model object) on a corpus split into `out`.

    `tokenizer`: a tokenizer.json path (or directory), a `tokenizers.Tokenizer` or a
    `moecxl.tokenizer.CheckpointTokenizer`; default MODEL/tokenizer.json. Special ids come from the
    checkpoint's config files (`moecxl.tokenizer.load`), or from the model's config for a model object.

    Resumes automatically: complete shards already in `out` are kept and their sequences skipped; an
    existing directory of another model shape, model or arguments is an error. `max_shards` stops after
    writing that many new shards (an interruption, for tests). `data_parallel` > 1 splits each prefill
    batch over that many of this process's devices (0: all), padding `batch` up to a multiple of it; the
    traces equal a single-device collection's (floats up to rounding), so either may resume the other.
    Returns `out`.
    """
    import moecxl
    from moecxl import tokenizer as checkpoint_tokenizer
    from moecxl.data import SplitSpec, trace_documents

    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = Path(model)
        model = moecxl.load(model_path)
    if tokenizer is None and model_path is None:
        raise TraceError("collect: pass `tokenizer` (a path or Tokenizer) with a model object")
    tok = checkpoint_tokenizer.load(model_path, tokenizer, cfg=model.cfg)
    cfg = model.cfg
    for name, v in (
        ("prompt_len", prompt_len),
        ("batch", batch),
        ("shard_seqs", shard_seqs),
        ("decode_every", decode_every),
        ("tokens", tokens),
    ):
        if v < 1:
            raise TraceError(f"collect: {name} must be >= 1, got {v}")
    mesh = None
    if data_parallel != 1:
        from moecxl.distributed import DATA, MeshError, data_mesh

        try:
            mesh = data_mesh(data_parallel)
        except MeshError as e:
            raise TraceError(f"collect: --data-parallel {data_parallel}: {e}") from e
        data_parallel = mesh.shape[DATA]
    family = family_of(cfg)
    if family.bounded_positions and prompt_len + decode_tokens + 1 > cfg.max_position_embeddings:
        raise TraceError(
            f"collect: prompt_len + decode_tokens + 1 = {prompt_len + decode_tokens + 1} exceeds "
            f"the model's max_position_embeddings {cfg.max_position_embeddings}"
        )
    out = Path(out)
    L, E, K, D = cfg.num_moe_layers, cfg.num_experts, family.routed_k(cfg), cfg.hidden_size
    proj_DP = sketch_projection(D, sketch, sketch_seed)
    args = {
        "corpus": corpus,
        "split": split,
        "tokens": tokens,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "decode_every": decode_every,
        "router_logits": router_logits,
        "sketch": sketch,
        "sketch_seed": sketch_seed,
        "shard_seqs": shard_seqs,
        "fractions": list(fractions),
        "holdout_domain": holdout_domain,
        "batch": batch,
        "data_parallel": data_parallel,
    }
    feats = features(L, E, K, sketch, router_logits)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "id": cfg.name or (model_path.name if model_path else type(model).__name__),
            "path": str(model_path) if model_path else None,
            "family": cfg.family,
            "hash": model_hash(model),
            "config": cfg.to_dict(),
        },
        "corpus": corpus,
        "split": split,
        "L": L,
        "E": E,
        "K": K,
        "P": sketch,
        "D": D,
        "layers": layer_names(cfg),
        "tokenizer": tok.metadata(),  # sha256 of tokenizer.json, special ids and their sources, framing
        "moecxl_version": moecxl.__version__,
        "args": args,
        "columns": list(feats),
        "sketch": {"P": sketch, "seed": sketch_seed, "projection_DP": proj_DP.tolist()} if sketch else None,
    }
    meta_path = out / METADATA
    if meta_path.is_file():
        old = _read_metadata(out)
        _check_append(meta_path, old, meta)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*"):  # temp files of an interrupted shard
        stale.unlink()

    docs = trace_documents(corpus, tok, split, SplitSpec(tuple(fractions), holdout_domain))
    seqs = plan_sequences(docs, prompt_len, tokens, decode_tokens, decode_every, tok.prompt_frame())
    if not seqs:
        raise TraceError(f"collect: corpus {corpus!r} split {split!r} has no document of >= 2 tokens")
    too_big = max(max(s.ids) for s in seqs)
    if too_big >= cfg.vocab_size:
        raise TraceError(
            f"collect: tokenizer gives token id {too_big} >= the model's vocab_size {cfg.vocab_size}"
        )
    shards = [seqs[i : i + shard_seqs] for i in range(0, len(seqs), shard_seqs)]
    decode_batch = max(1, -(-batch // decode_every)) if decode_tokens else 1
    col = _Collector(
        model,
        prompt_len,
        decode_tokens,
        batch,
        decode_batch,
        proj_DP,
        router_logits,
        mesh,
        tok.special.pad_id,
    )
    say = progress or (lambda msg: print(msg, file=sys.stderr))

    manifest, written = [], 0
    meta.update(num_sequences=len(seqs), shards=manifest, complete=False)
    for k, shard in enumerate(shards):
        file = out / f"shard-{k:05d}.parquet"
        want = [s.seq_id for s in shard]
        if file.is_file():
            table = _read_shard(file, feats)
            have = np.unique(table.column("seq_id").to_numpy())
            if have.tolist() != want:
                raise TraceError(
                    f"{file}: holds seq_ids {have[:3].tolist()}..., planned {want[:3]}...; "
                    "the directory was written with other arguments"
                )
        else:
            if max_shards is not None and written >= max_shards:
                _write_json_atomic(meta_path, meta)
                return out
            parts = [col.rows(shard[i : i + batch]) for i in range(0, len(shard), batch)]
            table = rows_table(_concat_rows(parts), feats)
            tmp = out / f".{file.name}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, file)
            written += 1
            say(f"traces: {file.name}: {table.num_rows} rows, sequences {want[0]}..{want[-1]} of {len(seqs)}")
        manifest.append(
            {"file": file.name, "rows": table.num_rows, "first_seq": want[0], "last_seq": want[-1]}
        )
        _write_json_atomic(meta_path, meta)
    meta["complete"] = True
    meta["num_rows"] = sum(s["rows"] for s in manifest)
    _write_json_atomic(meta_path, meta)
    return out


# ------------------------------------------------------------------------------------------- statistics
# Pure functions over numpy arrays. Ids are int [N, L, K] (or [N, K] for one layer); -1 marks a layer a
# token does not pass through (Switch), and such tokens are left out of that layer's statistics.


def popularity(ids_NLK: np.ndarray, E: int) -> np.ndarray:
    """float [L, E]: each expert's share of the routing slots of its layer (each row sums to 1)."""
    N, L, K = ids_NLK.shape
    counts_LE = np.zeros((L, E), np.float64)
    for l in range(L):
        ids = ids_NLK[:, l][ids_NLK[:, l] >= 0]
        counts_LE[l] = np.bincount(ids, minlength=E)[:E]
    return counts_LE / np.maximum(counts_LE.sum(axis=1, keepdims=True), 1)


def _valid_rows(a_NK: np.ndarray, b_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = (a_NK >= 0).all(axis=1) & (b_NK >= 0).all(axis=1)
    return a_NK[ok], b_NK[ok]


def _pairs(a_NK: np.ndarray, b_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (choice at a, choice at b) of each token: [N*Ka*Kb] each, so each token weighs the same."""
    N, Ka = a_NK.shape
    Kb = b_NK.shape[1]
    return np.repeat(a_NK, Kb, axis=1).reshape(-1), np.tile(b_NK, (1, Ka)).reshape(-1)


def transition_matrix(a_NK: np.ndarray, b_NK: np.ndarray, E: int) -> np.ndarray:
    """float [E, E]: P(an expert chosen at b is j | an expert chosen at a is i), over every pair of
    choices; rows of experts never chosen at a are zero."""
    a, b = _pairs(*_valid_rows(a_NK, b_NK))
    counts_EE = np.bincount(a * E + b, minlength=E * E).reshape(E, E).astype(np.float64)
    return counts_EE / np.maximum(counts_EE.sum(axis=1, keepdims=True), 1)


def entropy_bits(x_N: np.ndarray) -> float:
    """Plug-in Shannon entropy (bits) of the empirical distribution of symbols x."""
    if len(x_N) == 0:
        return float("nan")
    _, counts = np.unique(x_N, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy_bits(x_N: np.ndarray, y_N: np.ndarray) -> float:
    """Plug-in H(Y | X) = H(X, Y) - H(X) in bits, for integer symbol arrays of equal length."""
    _, joint = np.unique(np.stack([x_N, y_N], axis=1), axis=0, return_inverse=True)
    return entropy_bits(joint.reshape(-1)) - entropy_bits(x_N)


def set_symbols(ids_NK: np.ndarray) -> np.ndarray:
    """int [N]: one symbol per distinct top-k set (order of the K choices ignored)."""
    if len(ids_NK) == 0:
        return np.zeros(0, np.int64)
    _, inv = np.unique(np.sort(ids_NK, axis=1), axis=0, return_inverse=True)
    return inv.reshape(-1)


def routing_entropy(a_NK: np.ndarray, b_NK: np.ndarray) -> dict:
    """Marginal H(B) and conditional H(B | A) of routing at b given routing at a, two ways (bits):

    - "set": A and B are the top-k sets as single symbols; ranges over [0, log2 C(E, K)].
    - "choice": (a, b) is a pair of one choice at a and one at b, uniform over the K_a x K_b pairs of a
      token; ranges over [0, log2 E]. The two agree for top-1.
    A deterministic map A -> B gives a set conditional entropy of 0; independent uniform routing gives
    conditional = marginal (log2 E per choice). Plug-in estimates: biased low when N is small against
    the number of symbols (report `n`).
    """
    a_NK, b_NK = _valid_rows(a_NK, b_NK)
    sa, sb = set_symbols(a_NK), set_symbols(b_NK)
    pa_, pb = _pairs(a_NK, b_NK)
    return {
        "n": int(len(a_NK)),
        "set": {"marginal": entropy_bits(sb), "conditional": conditional_entropy_bits(sa, sb)},
        "choice": {"marginal": entropy_bits(pb), "conditional": conditional_entropy_bits(pa_, pb)},
    }


def previous_token(seq_id_N: np.ndarray, pos_N: np.ndarray) -> np.ndarray:
    """int [N]: the row of the same sequence at pos - 1, or -1 (rows sorted by seq_id, pos)."""
    prev = np.full(len(seq_id_N), -1, np.int64)
    if len(seq_id_N) > 1:
        ok = (seq_id_N[1:] == seq_id_N[:-1]) & (pos_N[1:] == pos_N[:-1] + 1)
        prev[1:][ok] = np.flatnonzero(ok)
    return prev


def layer_entropies(ids_NLK: np.ndarray) -> list[dict | None]:
    """H(E[l+1] | E[l]) beside H(E[l+1]) for l = 0..L-2 (None where no token passes both layers)."""
    out = []
    for l in range(ids_NLK.shape[1] - 1):
        r = routing_entropy(ids_NLK[:, l], ids_NLK[:, l + 1])
        out.append(r if r["n"] else None)
    return out


def temporal_entropies(ids_NLK: np.ndarray, seq_id_N: np.ndarray, pos_N: np.ndarray) -> list[dict | None]:
    """H(E_t[l] | E_{t-1}[l]) beside H(E_t[l]) per layer, over consecutive tokens of a sequence."""
    prev = previous_token(seq_id_N, pos_N)
    cur = np.flatnonzero(prev >= 0)
    out = []
    for l in range(ids_NLK.shape[1]):
        r = routing_entropy(ids_NLK[prev[cur], l], ids_NLK[cur, l])
        out.append(r if r["n"] else None)
    return out


def reuse_distances(ids_NK: np.ndarray, seq_id_N: np.ndarray, pos_N: np.ndarray) -> tuple[np.ndarray, int]:
    """Temporal reuse distance at one layer: for each use of expert e by a token, the number of tokens
    since the previous use of e in the same sequence (1 = the previous token used it too). Returns the
    distances and the count of first uses (no earlier use in the sequence)."""
    ok = (ids_NK >= 0).all(axis=1)
    ids_NK, seq, pos = ids_NK[ok], seq_id_N[ok], pos_N[ok]
    K = ids_NK.shape[1]
    e, s, p = ids_NK.reshape(-1), np.repeat(seq, K), np.repeat(pos, K)
    order = np.lexsort((p, s, e))
    e, s, p = e[order], s[order], p[order]
    same = (e[1:] == e[:-1]) & (s[1:] == s[:-1])
    return (p[1:] - p[:-1])[same].astype(np.int64), int(len(e) - same.sum())


def tv_distance(p_LE: np.ndarray, q_LE: np.ndarray) -> np.ndarray:
    """float [L]: total variation distance between two popularity distributions per layer (0..1)."""
    return 0.5 * np.abs(p_LE - q_LE).sum(axis=-1)


def _hist(d: np.ndarray, max_d: int) -> list[int]:
    """Counts of distance 1..max_d, then one bin for everything longer."""
    c = np.bincount(np.minimum(d, max_d + 1), minlength=max_d + 2)
    return c[1:].tolist()


def compute_stats(ts: TraceSet, max_distance: int = 64) -> dict:
    """Every statistic of a trace set as plain JSON data (popularities, transitions, entropies, reuse)."""
    meta = ts.metadata
    E, L = meta["E"], meta["L"]
    ids, sid, pos = ts.expert_ids, ts.seq_id, ts.pos
    domain, is_dec = ts.domain, ts.is_decode
    pop = popularity(ids, E)
    by_domain = {d: popularity(ids[domain == d], E) for d in sorted(set(domain.tolist()))}
    names = sorted(by_domain)
    domain_tv = {
        f"{a}|{b}": tv_distance(by_domain[a], by_domain[b]).tolist()
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    phase_tv = (
        tv_distance(popularity(ids[~is_dec], E), popularity(ids[is_dec], E)).tolist()
        if is_dec.any() and (~is_dec).any()
        else None
    )
    valid_pairs = [l for l in range(L - 1) if ((ids[:, l] >= 0).all(1) & (ids[:, l + 1] >= 0).all(1)).any()]
    shown = (
        sorted(
            {
                valid_pairs[i]
                for i in np.linspace(0, len(valid_pairs) - 1, min(4, len(valid_pairs)), dtype=int)
            }
        )
        if valid_pairs
        else []
    )
    reuse = []
    for l in range(L):
        d, cold = reuse_distances(ids[:, l], sid, pos)
        reuse.append(
            {
                "hist": _hist(d, max_distance),
                "first_uses": cold,
                "mean": float(d.mean()) if len(d) else None,
                "median": float(np.median(d)) if len(d) else None,
            }
        )
    return {
        "trace": str(ts.path),
        "model": meta["model"]["id"],
        "corpus": meta["corpus"],
        "split": meta["split"],
        "rows": len(ts),
        "sequences": int(len(np.unique(sid))),
        "decode_rows": int(is_dec.sum()),
        "L": L,
        "E": E,
        "K": meta["K"],
        "layers": meta["layers"],
        "log2_E": math.log2(E),
        "log2_sets": math.log2(math.comb(E, meta["K"])),
        "popularity": pop.tolist(),
        "popularity_by_domain": {d: p.tolist() for d, p in by_domain.items()},
        "domain_tv": domain_tv,
        "phase_tv": phase_tv,
        "transitions": {str(l): transition_matrix(ids[:, l], ids[:, l + 1], E).tolist() for l in shown},
        "layer_entropy": layer_entropies(ids),
        "temporal_entropy": temporal_entropies(ids, sid, pos),
        "reuse_distance": {"max_distance": max_distance, "per_layer": reuse},
    }


def plot_stats(stats: dict, out: str | os.PathLike) -> list[Path]:
    """The PNGs of `compute_stats`' output: popularity, transitions, entropy, reuse distance, domains."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    L, files = stats["L"], []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)

    fig, ax = plt.subplots(figsize=(8, 0.25 * L + 2))
    im = ax.imshow(np.asarray(stats["popularity"]), aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert popularity ({stats['model']})")
    fig.colorbar(im, ax=ax, label="share of routing slots")
    save(fig, "popularity.png")

    if stats["transitions"]:
        tr = stats["transitions"]
        fig, axes = plt.subplots(1, len(tr), figsize=(3.6 * len(tr), 3.4), squeeze=False)
        for ax, (l, m) in zip(axes[0], tr.items()):
            ax.imshow(np.asarray(m), cmap="magma", vmin=0)
            ax.set(
                title=f"P(e at {int(l) + 1} | e at {l})",
                xlabel=f"expert at layer {int(l) + 1}",
                ylabel=f"expert at layer {l}",
            )
        save(fig, "transitions.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key, title, x0 in (
        (axes[0, 0], "layer_entropy", "layer l -> l+1", 1),
        (axes[0, 1], "temporal_entropy", "token t-1 -> t, same layer", 0),
    ):
        for kind, style in (("choice", "-"), ("set", "--")):
            xs = [i + x0 for i, r in enumerate(stats[key]) if r]
            for part, color in (("marginal", "tab:gray"), ("conditional", "tab:blue")):
                ys = [r[kind][part] for r in stats[key] if r]
                ax.plot(xs, ys, style, color=color, marker=".", label=f"{part} ({kind})")
        ax.axhline(stats["log2_E"], color="k", lw=0.5, label="log2 E")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title=f"routing entropy: {title}", xlabel="layer", ylabel="bits")
        ax.legend(fontsize=7)
    save(fig, "entropy.png")

    reuse = stats["reuse_distance"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for l in sorted({int(i) for i in np.linspace(0, L - 1, min(L, 5))}):
        h = np.asarray(reuse["per_layer"][l]["hist"], float)
        if h.sum():
            ax.plot(np.arange(1, len(h) + 1), h / h.sum(), marker=".", label=stats["layers"][l])
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"reuse distance (tokens; last bin > {reuse['max_distance']})",
        ylabel="fraction of reuses",
        title="temporal reuse distance",
    )
    ax.legend(fontsize=7)
    save(fig, "reuse_distance.png")

    if stats["domain_tv"]:
        doms = list(stats["popularity_by_domain"])
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.2 * L + 3), squeeze=False)
        for pair, tv in stats["domain_tv"].items():
            axes[0, 0].plot(range(L), tv, marker=".", label=pair)
        axes[0, 0].set(xlabel="MoE layer", ylabel="total variation", title="popularity difference by domain")
        axes[0, 0].legend(fontsize=7)
        a, b = ("code", "prose") if {"code", "prose"} <= set(doms) else (doms[0], doms[1])
        diff = np.asarray(stats["popularity_by_domain"][a]) - np.asarray(stats["popularity_by_domain"][b])
        lim = max(float(np.abs(diff).max()), 1e-9)
        im = axes[0, 1].imshow(diff, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
        axes[0, 1].set(xlabel="expert", ylabel="MoE layer", title=f"popularity {a} - {b}")
        fig.colorbar(im, ax=axes[0, 1])
        save(fig, "domain_popularity.png")
    return files


def stats(trace_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Read a trace directory, write stats.json and the PNGs into `out`, return the statistics."""
    ts = read_traces(trace_dir)
    if not len(ts):
        raise TraceError(f"{trace_dir}: no trace rows")
    result = compute_stats(ts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = [p.name for p in plot_stats(result, out)]
    _write_json_atomic(out / "stats.json", result)
    return result


def _summary(s: dict) -> dict:
    """Per-layer means of the headline numbers, for the terminal."""

    def mean(key, kind, part):
        vals = [r[kind][part] for r in s[key] if r]
        return round(float(np.mean(vals)), 3) if vals else None

    return {
        "rows": s["rows"],
        "sequences": s["sequences"],
        "decode_rows": s["decode_rows"],
        "log2_E": round(s["log2_E"], 3),
        "layer_entropy_choice": {p: mean("layer_entropy", "choice", p) for p in ("marginal", "conditional")},
        "temporal_entropy_choice": {
            p: mean("temporal_entropy", "choice", p) for p in ("marginal", "conditional")
        },
        "domain_tv_mean": {k: round(float(np.mean(v)), 3) for k, v in s["domain_tv"].items()},
        "figures": s["figures"],
    }


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moecxl.traces", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "collect", help="collect router traces (prefill + greedy decode); resumes automatically"
    )
    c.add_argument("--model", required=True, help="checkpoint directory moecxl.load opens")
    c.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a directory holding one (default: MODEL/tokenizer.json); any the "
        "`tokenizers` library reads. Special ids: MODEL's config.json, generation_config.json, "
        "then tokenizer_config.json / special_tokens_map.json beside the tokenizer",
    )
    c.add_argument(
        "--corpus", required=True, help="stdlib, shakespeare, mixed, pydocs, kjv, file:GLOB, hf:NAME"
    )
    c.add_argument("--split", default="test", choices=("train", "validation", "test"))
    c.add_argument("--tokens", type=int, default=10_000, help="rows to collect (prefill + decode), at least")
    c.add_argument("--out", required=True)
    c.add_argument("--prompt-len", type=int, default=128, help="tokens per prefill sequence")
    c.add_argument(
        "--decode-tokens", type=int, default=32, help="decode rows per continued sequence (0: none)"
    )
    c.add_argument("--decode-every", type=int, default=4, help="continue every n-th sequence with generate")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each prefill batch over N devices (0: all; batch padded to a multiple of N). "
        "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N",
    )
    c.add_argument("--router-logits", action="store_true", help="store raw router logits [L][E]")
    c.add_argument(
        "--sketch", type=int, default=0, metavar="P", help="store hidden sketches [L][P] (e.g. 16)"
    )
    c.add_argument("--sketch-seed", type=int, default=0)
    c.add_argument("--shard-seqs", type=int, default=64, help="sequences per Parquet shard")
    c.add_argument("--fractions", default="0.9,0.05,0.05", help="train,validation,test document fractions")
    c.add_argument("--holdout-domain", default=None)
    s = sub.add_parser(
        "stats", help="popularity, transitions, entropies, reuse distance, domains: JSON + PNGs"
    )
    s.add_argument("trace_dir")
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    try:
        if args.command == "collect":
            fractions = tuple(float(x) for x in args.fractions.split(","))
            out = collect(
                args.model,
                args.out,
                args.corpus,
                args.split,
                args.tokens,
                tokenizer=args.tokenizer,
                prompt_len=args.prompt_len,
                decode_tokens=args.decode_tokens,
                decode_every=args.decode_every,
                batch=args.batch,
                data_parallel=args.data_parallel,
                router_logits=args.router_logits,
                sketch=args.sketch,
                sketch_seed=args.sketch_seed,
                shard_seqs=args.shard_seqs,
                fractions=fractions,
                holdout_domain=args.holdout_domain,
            )
            meta = read_traces(out).metadata
            print(
                json.dumps(
                    {
                        "out": str(out),
                        "rows": meta.get("num_rows"),
                        "sequences": meta["num_sequences"],
                        "L": meta["L"],
                        "E": meta["E"],
                        "K": meta["K"],
                    }
                )
            )
        else:
            print(json.dumps(_summary(stats(args.trace_dir, args.out)), indent=1))
    except (TraceError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
