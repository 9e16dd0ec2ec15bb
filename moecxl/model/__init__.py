"""Flax NNX model families."""

from moecxl.model import hf_gptoss  # noqa: F401  (registers GPT-OSS checkpoints with hf.load / hf.save)
from moecxl.model.decoder import MoEDecoder, MoEOutput
from moecxl.model.moe import ExpertBank, ExpertParam

__all__ = ["MoEDecoder", "MoEOutput", "ExpertBank", "ExpertParam"]
