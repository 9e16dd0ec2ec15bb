"""Predictor checkpoints: the exported predictor (params + what it was trained for) and training state.

An exported predictor directory holds `predictor.json` (the `PredictorConfig`: L/E/K/P/H/C, features and
size; the target model's id, hash and layer names; the tokenizer its traces were tokenised with: sha256
and special ids; the sketch projection) and `params/` (orbax). It is
written to a temporary directory and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from predictor.model import ExpertPredictor, PredictorConfig

META = "predictor.json"
PARAMS = "params"
FORMAT = 1


class PredictorError(ValueError):
    """A predictor checkpoint that is missing, unreadable, or made for another model (L/E/K)."""


def save_predictor(path: str | os.PathLike, model: ExpertPredictor, meta: dict) -> Path:
    """Write `model`'s params and `meta` (plus its config) atomically to `path` (replacing it)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        record = {"format": FORMAT, "config": model.cfg.to_dict(), **meta}
        (tmp / META).write_text(json.dumps(record, indent=1))
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS, nnx.state(model, nnx.Param))
        ckptr.wait_until_finished()
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / META
    if not file.is_file():
        raise PredictorError(
            f"{file}: missing; {path} is not a predictor checkpoint (train_predictor.py writes one)"
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PredictorError(f"{file}: unreadable: {e}") from e
    if meta.get("format") != FORMAT:
        raise PredictorError(f"{file}: field 'format' is {meta.get('format')!r}, this code reads {FORMAT}")
    return meta


def load_predictor(path: str | os.PathLike) -> tuple[ExpertPredictor, dict]:
    """The predictor module with its trained params, and its metadata."""
    path = Path(path).absolute()
    meta = read_meta(path)
    cfg = PredictorConfig.from_dict(meta["config"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ExpertPredictor(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    try:
        params = ocp.StandardCheckpointer().restore(path / PARAMS, abstract)
    except (FileNotFoundError, ValueError) as e:
        raise PredictorError(f"{path / PARAMS}: cannot restore the predictor params: {e}") from e
    return nnx.merge(graphdef, params), meta


def check_shape(meta: dict, L: int, E: int, K: int, where: str) -> None:
    """Refuse a predictor trained for another L/E/K, naming each mismatch."""
    cfg = meta["config"]
    bad = [f"{k}: predictor {cfg[k]}, {where} {v}" for k, v in (("L", L), ("E", E), ("K", K)) if cfg[k] != v]
    if bad:
        raise PredictorError(
            f"predictor for model {meta.get('model', {}).get('id')!r} was trained for another shape "
            f"({'; '.join(bad)})"
        )


TOKENIZER_FIELDS = ("path", "hash", "kind", "vocab_size", "special")


def tokenizer_record(trace_tokenizer: dict | None) -> dict | None:
    """What a predictor keeps of its traces' tokenizer metadata (`moecxl.tokenizer` writes it)."""
    if not trace_tokenizer:
        return None
    return {k: trace_tokenizer.get(k) for k in TOKENIZER_FIELDS if k in trace_tokenizer}


def _special_ids(record: dict) -> dict | None:
    sp = record.get("special")
    if not sp:
        return None
    return {k: sp.get(k) for k in ("bos_id", "eos_ids", "pad_id", "decoder_start_id", "add_bos", "add_eos")}


def check_tokenizer(trained: dict | None, other: dict | None, trained_where: str, other_where: str) -> None:
    """Refuse traces or a live run tokenised otherwise than the predictor's training traces: its inputs
    (routing of token ids) mean something only for that tokenizer. Records lacking a digest (traces
    written before moecxl recorded one) are not compared."""
    if not trained or not other or not trained.get("hash") or not other.get("hash"):
        return
    if trained["hash"] != other["hash"]:
        raise PredictorError(
            f"tokenizer mismatch: {trained_where} was trained on traces tokenised by "
            f"{trained.get('path') or '(in memory)'} (sha256 {trained['hash'][:16]}...) but {other_where} "
            f"uses {other.get('path') or '(in memory)'} (sha256 {other['hash'][:16]}...); collect traces "
            f"with the tokenizer the predictor was trained on, or train a predictor on these"
        )
    a, b = _special_ids(trained), _special_ids(other)
    if a is not None and b is not None and a != b:
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        raise PredictorError(
            f"tokenizer special ids differ: {trained_where} {', '.join(f'{k}={v[0]!r}' for k, v in diff.items())}"
            f" but {other_where} {', '.join(f'{k}={v[1]!r}' for k, v in diff.items())} (same tokenizer.json, "
            f"other config.json / generation_config.json)"
        )


def as_numpy(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, np.float32)
