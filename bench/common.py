"""Shared helpers for benchmarks: machine description and atomic JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import jax


def machine() -> dict:
    """What the numbers were measured on (they are only meaningful beside this)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "jax_backend": jax.default_backend(),
        "jax": jax.__version__,
        "commit": commit,
    }


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)
    return path
