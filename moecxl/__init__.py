"""moecxl: Mixture-of-Experts inference with experts offloaded across memory tiers.

Public API: `load`, `save`, `generate`, `OffloadEngine`, `Hardware`, `ModelConfig`.
"""

from moecxl.config import ModelConfig
from moecxl.generate import GenerateResult, GenerationError, generate

__version__ = "0.1.0"


def load(path, **kwargs):
    """Open an HF-format checkpoint dir (config.json + safetensors) or a moecxl checkpoint."""
    from moecxl.model.hf import load as _load

    return _load(path, **kwargs)


def save(model, path, **kwargs):
    """Write a checkpoint that transformers can load (config.json + safetensors), atomically."""
    from moecxl.model.hf import save as _save

    return _save(model, path, **kwargs)


def __getattr__(name):
    # Heavier subsystems load on first use.
    if name == "Hardware":
        from moecxl.memory import Hardware

        return Hardware
    if name == "OffloadEngine":
        from moecxl.runtime.engine import OffloadEngine

        return OffloadEngine
    raise AttributeError(f"module 'moecxl' has no attribute {name!r}")


__all__ = [
    "load",
    "save",
    "generate",
    "GenerateResult",
    "GenerationError",
    "ModelConfig",
    "Hardware",
    "OffloadEngine",
]
