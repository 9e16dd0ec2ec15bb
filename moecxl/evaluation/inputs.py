"""What the eval entries and notebooks open: models, tokenizers, hardware profiles, target shapes.

Each function either returns the thing or raises `EvalError` naming the path or name at fault and
what would have been accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO / "configs" / "hardware"
MODELS_DIR = REPO / "configs" / "models"
SHIPPED_MODEL = REPO / "models" / "mixtral-topology"
TINY_ENV = "MOECXL_NOTEBOOK_TINY"


class EvalError(ValueError):
    """An evaluation cannot run as asked (unknown profile, missing model, bad option); names the culprit."""


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def resolve_profile(name_or_path: str | os.PathLike):
    """A hardware profile by name (`h100-cxl`, from configs/hardware/) or YAML path -> `Hardware`."""
    from moecxl.memory import Hardware

    p = Path(name_or_path)
    if not p.is_file():
        p = PROFILES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise EvalError(
            f"unknown hardware profile {str(name_or_path)!r}: neither a file nor a name in {PROFILES_DIR}; "
            f"known: {', '.join(known_profiles())}"
        )
    return Hardware.from_yaml(p)


def resolve_target(name_or_path: str | os.PathLike | None):
    """The model whose expert bytes emulated links move (`mixtral-8x7b`, a YAML path, or None = self)."""
    from moecxl.config import ModelConfig

    if name_or_path in (None, "", "self"):
        return None
    p = Path(name_or_path)
    if not p.is_file():
        p = MODELS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in MODELS_DIR.glob("*.yaml")))
        raise EvalError(f"unknown target model {str(name_or_path)!r}; known in {MODELS_DIR}: {known}")
    return ModelConfig.from_yaml(p)


def load_model(path: str | os.PathLike):
    """`moecxl.load(path)`, with an error that says how to get a model when the directory is missing."""
    import moecxl

    p = Path(path)
    if not p.is_dir():
        raise EvalError(
            f"{p}: no such model directory (train one: python -m moecxl.train --config "
            f"configs/models/tiny-mixtral.yaml --out runs/tiny --export {p})"
        )
    return moecxl.load(p)


def load_tokenizer_of(model_dir: str | os.PathLike, tokenizer=None, cfg=None):
    """The checkpoint's tokenizer with its special tokens (`moecxl.tokenizer.load`): `tokenizer` (a
    tokenizer.json, a directory holding one, or an object) or else MODEL_DIR/tokenizer.json."""
    from moecxl.tokenizer import TokenizerError, load

    try:
        return load(model_dir, tokenizer, cfg=cfg)
    except (TokenizerError, FileNotFoundError) as e:
        raise EvalError(str(e)) from e


def tiny_mode() -> bool:
    """True when `MOECXL_NOTEBOOK_TINY=1`: notebooks and demos shrink to seconds (the test suite sets it)."""
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def tiny_config():
    """A 4-layer, 8-expert, top-2 Mixtral-family config: runs everything in seconds on a CPU."""
    from moecxl.config import ModelConfig

    return ModelConfig(
        family="mixtral",
        name="tiny-mixtral (random weights)",
        vocab_size=512,
        hidden_size=32,
        intermediate_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        num_experts=8,
        top_k=2,
        max_position_embeddings=512,
    )


def demo_model(path: str | os.PathLike | None = None, tiny: bool | None = None, seed: int = 0):
    """(model, description): the checkpoint at `path` (default: the shipped models/mixtral-topology)
    if it exists and tiny mode is off, else a small random model built from `tiny_config()`."""
    from moecxl.train import build_model

    tiny = tiny_mode() if tiny is None else tiny
    p = Path(path) if path is not None else SHIPPED_MODEL
    if not tiny and p.is_dir():
        return load_model(p), str(p)
    why = "tiny mode" if tiny else f"{p} not found"
    return build_model(tiny_config(), seed), f"random {tiny_config().name} ({why})"


def run_cli(job, *args, **kwargs) -> int:
    """Call `job` for an entry script; a known error prints one line `error: ...` and returns 2."""
    import sys

    from moecxl.config import ConfigError
    from moecxl.data import CorpusError
    from moecxl.evaluation.results import ResultError
    from moecxl.model.hf import CheckpointError
    from moecxl.runtime.engine import EngineError
    from moecxl.runtime.policies import PolicyError

    try:
        return int(job(*args, **kwargs) or 0)
    except (EvalError, ResultError, ConfigError, CorpusError, CheckpointError, EngineError, PolicyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
