"""Shared fixtures: tiny configs built in code, so every test runs in seconds on a CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from moecxl.config import ModelConfig  # noqa: E402
from moecxl.model import MoEDecoder  # noqa: E402

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=5,
    top_k=2,
    max_position_embeddings=512,
)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


@pytest.fixture(scope="session")
def tiny_model() -> MoEDecoder:
    return MoEDecoder(tiny_config(), rngs=nnx.Rngs(0))
