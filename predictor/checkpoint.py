"""Predictor checkpoints: the exported predictor (params + what it was trained for) and training state.

An exported predictor directory holds `predictor.json` (the `PredictorConfig`: L/E/K/P/H/C, features and
size; the target model's id, hash and layer names; the sketch projection) and `params/` (orbax). It is
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


def as_numpy(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, np.float32)
