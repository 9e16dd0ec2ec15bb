"""Control-plane time per MoE-layer visit, as the engine's bench measured it, for the simulator to charge.

The engine spends host time deciding before a layer's expert step can launch (`control`: hit layers a
few tens of us, miss layers about a millisecond on a small CPU) and more after the launch (`after`: the
prefetch decisions, overlapping the device's compute). A control file (configs/control/*.yaml, written
by `bench/bench_control.py --table`) holds the medians per policy and batch size with their source
(bench file, machine, date). The simulator charges each visit:

    hit_us or miss_us (did the visit miss?)  +  max(0, after_us - the visit's compute)

at its token count: piecewise linear in log2(tokens) between the measured batch sizes, held flat
outside them (decision work grows with the distinct experts a visit touches, which saturates at E; a
prefill visit of batch x prompt tokens is charged as the largest measured batch). `idealised: true`
charges nothing, and says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from moecxl.config import load_yaml

IDEALISED = "idealised"
FIELDS = ("hit_us", "miss_us", "after_us")


class ControlError(ValueError):
    """A control-cost file or lookup is wrong; the message names the file, key and value."""


@dataclass(frozen=True)
class ControlCosts:
    """Per policy: ((batch, hit_us, miss_us, after_us), ...) ascending in batch; `same_as` maps a policy
    not measured to the one measured in its stead, `same_as_why` says why (the file's `same_as:` entry
    `{as: POLICY, why: TEXT}`, or a bare policy name in older files)."""

    path: str
    idealised: bool
    source: dict = field(default_factory=dict)
    table: dict = field(default_factory=dict)
    same_as: dict = field(default_factory=dict)
    same_as_why: dict = field(default_factory=dict)

    @classmethod
    def idealised_costs(cls, why: str = "stated in the experiment") -> ControlCosts:
        return cls(IDEALISED, True, {"note": f"no control-plane time charged ({why})"})

    @classmethod
    def load(cls, spec: str | os.PathLike) -> ControlCosts:
        """A control file (path), or the word `idealised`."""
        if str(spec) == IDEALISED:
            return cls.idealised_costs()
        path = Path(spec)
        try:
            raw = load_yaml(path)
        except (OSError, ValueError) as e:
            raise ControlError(f"{path}: unreadable control-cost file: {e}") from e
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, path: str = "<dict>") -> ControlCosts:
        if not isinstance(raw, dict):
            raise ControlError(f"{path}: expected a mapping, got {type(raw).__name__}")
        if raw.get("idealised") is True:
            return cls(path, True, dict(raw.get("source") or {}))
        if raw.get("idealised") is not False:
            raise ControlError(f"{path}: key 'idealised' must be true or false, got {raw.get('idealised')!r}")
        source = raw.get("source")
        if not isinstance(source, dict) or not {"bench", "machine", "date"} <= set(source):
            raise ControlError(
                f"{path}: key 'source' must name the bench file, machine and date, got {source!r}"
            )
        policies = raw.get("policies")
        if not isinstance(policies, dict) or not policies:
            raise ControlError(f"{path}: key 'policies' must map policy -> batch -> {{{', '.join(FIELDS)}}}")
        table = {}
        for pol, by_batch in policies.items():
            rows = []
            for batch, cell in (by_batch or {}).items():
                try:
                    b = int(batch)
                    vals = tuple(float(cell[f]) for f in FIELDS)
                except (KeyError, TypeError, ValueError) as e:
                    raise ControlError(
                        f"{path}: policies.{pol}.{batch} must be a batch size with numbers {FIELDS}, got {cell!r}"
                    ) from e
                if b < 1 or min(vals) < 0:
                    raise ControlError(
                        f"{path}: policies.{pol}.{batch}: batch >= 1 and times >= 0, got {cell!r}"
                    )
                rows.append((b, *vals))
            if not rows:
                raise ControlError(f"{path}: policies.{pol} has no batch sizes")
            table[pol] = tuple(sorted(rows))
        same_as, why = {}, {}
        for pol, entry in dict(raw.get("same_as") or {}).items():
            if isinstance(entry, dict):
                if set(entry) != {"as", "why"} or not str(entry["why"]).strip():
                    raise ControlError(
                        f"{path}: same_as.{pol} must be {{as: POLICY, why: TEXT}} (or a policy name), got {entry!r}"
                    )
                entry, why[pol] = entry["as"], " ".join(str(entry["why"]).split())
            if entry not in table:
                raise ControlError(
                    f"{path}: same_as.{pol} names {entry!r}, which is not measured ({sorted(table)})"
                )
            same_as[pol] = entry
        return cls(path, False, dict(source), table, same_as, why)

    def describe(self) -> dict:
        """What a result says about its control-plane charge: the file, idealised or not, its source."""
        return {"file": self.path, "idealised": self.idealised, "source": self.source}

    def check(self, policy: str) -> None:
        """Refuse a policy this file has no figures for (before a run, not mid-way)."""
        if not self.idealised and policy not in self.table and policy not in self.same_as:
            raise ControlError(
                f"{self.path}: no control-plane figures for policy {policy!r}; measured: {sorted(self.table)} "
                "(run bench/bench_control.py --table for it, or map it under 'same_as:')"
            )

    def cell_us(self, policy: str, n_tokens: int) -> tuple[float, float, float]:
        """(hit_us, miss_us, after_us) at `n_tokens` tokens per visit, interpolated in log2(tokens)."""
        self.check(policy)
        rows = self.table[self.same_as.get(policy, policy)]
        if n_tokens <= rows[0][0]:
            return rows[0][1:]
        if n_tokens >= rows[-1][0]:
            return rows[-1][1:]
        for lo, hi in zip(rows, rows[1:]):
            if lo[0] <= n_tokens <= hi[0]:
                f = (math.log2(n_tokens) - math.log2(lo[0])) / (math.log2(hi[0]) - math.log2(lo[0]))
                return tuple(a + f * (b - a) for a, b in zip(lo[1:], hi[1:]))
        raise AssertionError("unreachable: rows are sorted")

    def visit_s(self, policy: str, n_tokens: int, missed: bool, compute_s: float) -> float:
        """Seconds a visit's decisions add: before the launch (hit or miss layer), and the prefetch
        decisions after it beyond what the visit's compute hides."""
        if self.idealised:
            return 0.0
        hit_us, miss_us, after_us = self.cell_us(policy, n_tokens)
        return (miss_us if missed else hit_us) * 1e-6 + max(0.0, after_us * 1e-6 - compute_s)
