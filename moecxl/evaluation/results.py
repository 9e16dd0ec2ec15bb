"""Result JSON files of the eval entries: one envelope, a schema version, a kind, validated on read.

Every file written by `eval/*.py` is `{"schema_version", "kind", "created", "machine", "model",
"config", "rows": [...]}`. Reading checks the version and each row's required fields, so a report never
silently mixes an old layout with a new one: errors name the file, the row and the field.

Row fields shared by `latency` and `simulation` (the engine's metric names; latency rows hold medians
over repeats and the interquartile range in `<metric>_iqr`): profile, policy, budget, batch, prompt_len,
timing, ttft_s, tpot_s, tokens_per_s, hit_rate, stall_s, bytes_by_tier, hit_rate_by_layer.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

SCHEMA_VERSION = 1
TIMINGS = ("measured-cpu", "measured-gpu", "emulated", "simulated")
_PERF_FIELDS = {
    "profile": str,
    "policy": str,
    "budget": (int, float),
    "batch": int,
    "prompt_len": int,
    "timing": str,
    "ttft_s": (int, float),
    "tpot_s": (int, float),
    "tokens_per_s": (int, float),
}
# kind -> required row fields and their types
ROW_FIELDS: dict[str, dict] = {
    "perplexity": {"policy": str, "perplexity": (int, float), "nll": (int, float), "tokens": int},
    "latency": _PERF_FIELDS,
    "simulation": _PERF_FIELDS,
}
KINDS = tuple(ROW_FIELDS)


class ResultError(ValueError):
    """A result file is missing, unreadable, of another schema version or kind; names file and field."""


def machine() -> dict:
    """What the numbers were produced on (they mean something only beside this)."""
    import jax

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax_backend": jax.default_backend(),
        "jax": jax.__version__,
    }


def envelope(kind: str, rows: list[dict], *, model: dict | None = None, config: dict | None = None) -> dict:
    """A complete result document of `kind`, validated before it is returned."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": model or {},
        "config": config or {},
        "rows": rows,
    }
    validate(doc, "<new result>")
    return doc


def _clean(x):
    # JSON has no NaN/inf: write null so that every reader parses the file.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy scalars
        return _clean(x.item())
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    return x


def write_result(path: str | os.PathLike, doc: dict) -> Path:
    """Write a result document atomically (temp file in the same folder, then rename)."""
    validate(doc, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(doc), indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)
    return path


def read_result(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Read and validate one result file; `kind` also checks which kind it is."""
    path = Path(path)
    if not path.is_file():
        raise ResultError(f"{path}: no such result file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultError(f"{path}: not valid JSON ({e})") from e
    validate(doc, str(path))
    if kind is not None and doc["kind"] != kind:
        raise ResultError(f"{path}: field 'kind' is {doc['kind']!r}, expected {kind!r}")
    return doc


def validate(doc, source: str) -> None:
    """Check the envelope and every row of a result document; raise ResultError naming the culprit."""
    if not isinstance(doc, dict):
        raise ResultError(f"{source}: expected a JSON object at the top level, got {type(doc).__name__}")
    if "schema_version" not in doc:
        raise ResultError(f"{source}: missing field 'schema_version' (not a moecxl result file?)")
    v = doc["schema_version"]
    if v != SCHEMA_VERSION:
        hint = (
            "re-run the eval entry that wrote it"
            if isinstance(v, int) and v < SCHEMA_VERSION
            else ("written by a newer moecxl")
        )
        raise ResultError(
            f"{source}: field 'schema_version' is {v!r}; this moecxl reads version {SCHEMA_VERSION} ({hint})"
        )
    kind = doc.get("kind")
    if kind not in ROW_FIELDS:
        raise ResultError(f"{source}: field 'kind' is {kind!r}; known kinds: {', '.join(KINDS)}")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ResultError(f"{source}: field 'rows' must be a list, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ResultError(f"{source}: rows[{i}] must be an object, got {type(row).__name__}")
        if row.get("skipped"):
            continue  # a configuration that could not run says why instead of carrying figures
        for name, typ in ROW_FIELDS[kind].items():
            if name not in row:
                raise ResultError(f"{source}: rows[{i}] is missing field {name!r} (kind {kind!r})")
            val = row[name]
            if val is None and typ is not str:
                continue  # a figure that does not exist (TPOT of one token) is null
            if isinstance(val, bool) or not isinstance(val, typ):
                raise ResultError(
                    f"{source}: rows[{i}].{name} is {val!r} ({type(val).__name__}), expected {_tname(typ)}"
                )
        if "timing" in row and row["timing"] not in TIMINGS:
            raise ResultError(f"{source}: rows[{i}].timing is {row['timing']!r}; known: {', '.join(TIMINGS)}")


def _tname(typ) -> str:
    return " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__


def find_results(root: str | os.PathLike) -> list[Path]:
    """Result files under `root` (recursive): every `*.json` except predictor `metrics.json` files."""
    root = Path(root)
    if not root.is_dir():
        raise ResultError(f"{root}: no such results directory")
    return sorted(p for p in root.rglob("*.json") if p.name != "metrics.json" and not p.name.startswith("."))
