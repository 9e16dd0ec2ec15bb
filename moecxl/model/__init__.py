"""Flax NNX model families."""

from moecxl.model.decoder import MoEDecoder, MoEOutput
from moecxl.model.moe import ExpertBank, ExpertParam

__all__ = ["MoEDecoder", "MoEOutput", "ExpertBank", "ExpertParam"]
