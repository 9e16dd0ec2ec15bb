"""The host kernel's measured rates, and its own seconds for an expert of any size (pure: no numba).

`python -m moecxl.memory.hostbench` measures the kernel (`memory.hostkernel`) per weight dtype and token
count; a `KernelTable` holds those rates. A profile's host may carry one (`Host.kernel`): the host's time
for an expert is then never shorter than the kernel's own (`runtime.gate.host_compute_on_tier_s`), in the
engine and the simulator alike, so an emulated run cannot hide a slow kernel behind a fast profile.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

KERNEL_DTYPES = {1: "int8", 2: "bfloat16", 4: "float32"}  # bytes per stored parameter -> measured dtype


class HostKernelError(ValueError):
    """The kernel cannot compute this expert; the message names the dtype, shape or argument at fault."""


@dataclass(frozen=True)
class KernelTable:
    """Measured kernel rates: expert bytes/s by (weight dtype, tokens), with where they were measured."""

    gbps: Mapping[tuple[str, int], float]
    read_gbps: float
    source: str
    machine: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_bench(cls, path_or_record: str | os.PathLike | Mapping) -> KernelTable:
        """Read the JSON record `python -m moecxl.memory.hostbench` writes."""
        if isinstance(path_or_record, Mapping):
            rec = path_or_record
            where = f"{rec.get('command', '<record>')}, {rec.get('date', 'undated')}"
        else:
            where = str(path_or_record)
            try:
                rec = json.loads(Path(path_or_record).read_text())
            except (OSError, ValueError) as e:
                raise HostKernelError(f"{where}: cannot read a hostbench record: {e}") from e
        try:
            gbps = {(r["dtype"], int(r["n_tokens"])): float(r["kernel_gbps"]) for r in rec["kernel"]}
            read = float(rec["read"]["gbps"])
        except (KeyError, TypeError, ValueError) as e:
            raise HostKernelError(f"{where}: not a hostbench record (missing {e})") from e
        src = f"measurement: moecxl.memory.hostbench ({where}) on {rec.get('machine', {}).get('cpu', '?')}"
        return cls(gbps, read, src, dict(rec.get("machine", {})))

    def __hash__(self) -> int:  # a profile's Host holds one, and profiles are hashed
        return hash((tuple(sorted(self.gbps.items())), self.read_gbps, self.source))

    def to_dict(self) -> dict:
        """The record a profile's `host.kernel` holds (`from_dict` reads it back)."""
        rates: dict[str, dict[int, float]] = {}
        for (dtype, n), g in sorted(self.gbps.items()):
            rates.setdefault(dtype, {})[n] = g
        return {"rates_gbps": rates, "read_gbps": self.read_gbps, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "host.kernel") -> KernelTable:
        """From `to_dict()`'s record: rates_gbps {dtype: {tokens: GB/s}}, read_gbps, source."""
        try:
            gbps = {
                (str(dtype), int(n)): float(g)
                for dtype, row in d["rates_gbps"].items()
                for n, g in row.items()
            }
            table = cls(gbps, float(d["read_gbps"]), str(d["source"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HostKernelError(
                f"{where}: expected {{rates_gbps: {{dtype: {{tokens: GB/s}}}}, read_gbps, source}} ({e!r})"
            ) from e
        bad = [k for k, g in gbps.items() if not (math.isfinite(g) and g > 0)]
        if not gbps or bad:
            raise HostKernelError(f"{where}: rates must be positive GB/s, got {dict(gbps) or 'none'}")
        return table


def kernel_expert_s(dtype: str, n_tokens: int, expert_bytes: int, table: KernelTable) -> float:
    """Seconds the kernel needs for an expert of `expert_bytes` stored bytes and `n_tokens` tokens.

    Time per byte is interpolated linearly in tokens between measured batch sizes (a kernel's time is
    a read term plus a per-token compute term) and extrapolated along the last segment beyond the
    largest; below the smallest it is the smallest's. Pure: no measurement here. Emulation can take
    max(profile time, this) so that a slow kernel shows.
    """
    if n_tokens < 0 or expert_bytes < 0:
        raise ValueError(f"kernel_expert_s: n_tokens {n_tokens} and expert_bytes {expert_bytes} must be >= 0")
    pts = sorted((n, 1.0 / (g * 1e9)) for (d, n), g in table.gbps.items() if d == dtype)
    if not pts:
        have = sorted({d for d, _ in table.gbps})
        raise HostKernelError(
            f"no measured kernel rate for dtype {dtype!r} ({table.source}); measured: {have}"
        )
    if n_tokens == 0 or expert_bytes == 0:
        return 0.0
    if n_tokens <= pts[0][0] or len(pts) == 1:  # one measured point: no slope to go on
        s_per_byte = pts[0][1]
    else:
        i = next((k for k in range(1, len(pts)) if pts[k][0] >= n_tokens), len(pts) - 1)
        (n0, t0), (n1, t1) = pts[i - 1], pts[i]
        s_per_byte = t0 + (t1 - t0) * (n_tokens - n0) / (n1 - n0)
    return float(expert_bytes * max(s_per_byte, 0.0)) if math.isfinite(s_per_byte) else math.inf


def kernel_dtype(expert_bytes: int, expert_params: int) -> str:
    """The measured dtype whose rates stand for an expert stored in `expert_bytes` for `expert_params`:
    by bytes per parameter (2: bfloat16, also for float16; 1: int8; 4: float32). Below one byte
    (int4, HQQ 2-3 bit), int8's time per stored byte (the nearest measured, likely optimistic)."""
    if expert_params <= 0:
        raise HostKernelError(f"kernel_dtype: expert_params must be > 0, got {expert_params}")
    per = expert_bytes / expert_params
    if per < 1.0:
        return "int8"
    itemsize = min(KERNEL_DTYPES, key=lambda b: abs(b - per))
    return KERNEL_DTYPES[itemsize]
