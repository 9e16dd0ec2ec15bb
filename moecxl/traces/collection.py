"""`collect`: router traces of a model on a corpus split, written shard by shard and resumable.

A sequence is a chunk of a document framed as a prompt of the checkpoint's tokenizer (`moecxl.tokenizer`:
BOS first where the tokenizer adds one; Switch: EOS last), at most `prompt_len` tokens (prefill rows, pos
0..T-1); every `decode_every`-th sequence is continued greedily by `generate` and its decode rows follow
(pos T..T+M-1). Switch (encoder-decoder): prefill rows are encoder tokens, decode rows decoder tokens
(token_id is the decoder input, the start token first; pos continues after the S encoder tokens, so the
decoder position is pos - S).

A shard is written to a temp name and renamed, so a rerun keeps the complete shards and computes only the
missing ones: no row is duplicated or lost. `--data-parallel N` splits each prefill batch over N devices
(a `data` mesh axis, one SPMD program); the rows are those of a single-device collection. Decode
(`generate`) stays on one device.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from flax import nnx

from moecxl.model.family import family_of
from moecxl.traces.collector import Collector, concat_rows
from moecxl.traces.plan import plan_sequences
from moecxl.traces.schema import (
    METADATA,
    SCHEMA_VERSION,
    TraceError,
    features,
    read_metadata,
    read_shard,
    rows_table,
    write_json_atomic,
)

RUN_ONLY_ARGS = ("batch", "data_parallel")  # how a collection ran, not what it holds: may change on resume


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
        old = read_metadata(out)
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
    col = Collector(
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
            table = read_shard(file, feats)
            have = np.unique(table.column("seq_id").to_numpy())
            if have.tolist() != want:
                raise TraceError(
                    f"{file}: holds seq_ids {have[:3].tolist()}..., planned {want[:3]}...; "
                    "the directory was written with other arguments"
                )
        else:
            if max_shards is not None and written >= max_shards:
                write_json_atomic(meta_path, meta)
                return out
            parts = [col.rows(shard[i : i + batch]) for i in range(0, len(shard), batch)]
            table = rows_table(concat_rows(parts), feats)
            tmp = out / f".{file.name}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, file)
            written += 1
            say(f"traces: {file.name}: {table.num_rows} rows, sequences {want[0]}..{want[-1]} of {len(seqs)}")
        manifest.append(
            {"file": file.name, "rows": table.num_rows, "first_seq": want[0], "last_seq": want[-1]}
        )
        write_json_atomic(meta_path, meta)
    meta["complete"] = True
    meta["num_rows"] = sum(s["rows"] for s in manifest)
    write_json_atomic(meta_path, meta)
    return out
