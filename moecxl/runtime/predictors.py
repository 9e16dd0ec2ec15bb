"""What the runtime asks of a predictor, and how it finds one without importing anything above it.

A `Predictor` answers, at one MoE-layer visit, which experts the layers ahead will need. The project's
own (`predictor.live.LivePredictor`, a learned sequence model) and the simulator's replay of stored
predictions implement it; so may anyone's, handed to `OffloadEngine(predictor=...)` or `simulate`.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from moecxl.runtime.mechanism import CoreError

PREDICTOR_ENTRY_POINTS = "moecxl.predictors"  # how a package above the runtime offers predictor loaders


@runtime_checkable
class Predictor(Protocol):
    """`candidates(visit, layers, features)`: ((layer, expert), p) for `layers` (the MoE layers the policy
    looks ahead to), best first. Optional: `observe_visit(visit, features)` (every visit, before its
    candidates), `reset()` (a new request's prefill), `bind(model)` (checks it fits the model's L, E, K)."""

    def candidates(self, visit, layers, features) -> list: ...


def check_predictor(predictor, L: int, E: int) -> None:
    """Refuse a predictor that is not one, or that says it was built for another L or E."""
    if not callable(getattr(predictor, "candidates", None)):
        raise CoreError(
            f"predictor {type(predictor).__name__} lacks candidates(visit, layers, features): not a Predictor"
        )
    for attr, want in (("num_layers", L), ("num_experts", E)):
        got = getattr(predictor, attr, None)
        if isinstance(got, int) and got != want:
            raise CoreError(f"predictor {type(predictor).__name__}: {attr} = {got}, but the model has {want}")


def load_predictor(path: str | os.PathLike):
    """A predictor checkpoint through the loader a package registers under the entry-point group
    `moecxl.predictors` (the project's own: `predictor.live:LivePredictor`)."""
    loaders = {ep.name: ep for ep in entry_points(group=PREDICTOR_ENTRY_POINTS)}
    if "live" not in loaders:
        raise CoreError(
            f"predictor {str(path)!r}: no loader registered under entry points {PREDICTOR_ENTRY_POINTS!r} "
            "(install moecxl with `pip install -e .`, which registers predictor.live)"
        )
    return loaders["live"].load().load(path)
