"""The software a system runs on, as the cost model needs it: kernel efficiencies and framework costs.

Read from configs/hardware/library/software.yaml (every number with its source); the same for every
published case: a case names a system, the system names its stack, and nothing per case changes these.
- `kernel_efficiency(kernel)`: the share of the GPU's datasheet memory bandwidth a batch-1 weight read
  reaches with that kernel family (`Precision.kernel`).
- `Stack`: fixed host seconds per MoE-layer visit (eager dispatch, host syncs) and the GPU memory the
  stack keeps for itself (bytes, or a fraction of the GPU's memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SOFTWARE_LIBRARY = REPO / "configs" / "hardware" / "library" / "software.yaml"
SOURCE_KINDS = ("paper", "datasheet", "spec", "measurement", "assumption", "code")


class StackError(ValueError):
    """An unknown stack or kernel, or a malformed software library; the message names file and key."""


@dataclass(frozen=True)
class Stack:
    """A framework's fixed costs: seconds per MoE-layer visit and the GPU memory it keeps."""

    name: str
    layer_overhead_s: float
    workspace_bytes: int = 0
    workspace_fraction: float = 0.0
    sources: tuple = ()

    def workspace_of(self, gpu_bytes: int) -> int:
        """GPU bytes the stack keeps for itself on a GPU of `gpu_bytes`."""
        return int(self.workspace_bytes + self.workspace_fraction * gpu_bytes)


def _check_sources(path: Path, key: str, entry: dict, fields: list[str]) -> dict:
    src = entry.get("source")
    if isinstance(src, str):
        src = {f: src for f in fields}
    if not isinstance(src, dict):
        raise StackError(f"{path}: {key}.source: expected a string or a mapping field -> source")
    for f in fields:
        text = src.get(f) or src.get("default")
        if not isinstance(text, str) or not text.startswith(SOURCE_KINDS):
            raise StackError(
                f"{path}: {key}.{f}: value {entry[f]!r} needs a source starting with one of {list(SOURCE_KINDS)}"
            )
    return src


@cache
def _library(path: Path = SOFTWARE_LIBRARY) -> tuple[dict, dict]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StackError(f"{path}: cannot read the software library: {e}") from e
    if not isinstance(data, dict) or set(data) != {"kernels", "stacks"}:
        raise StackError(f"{path}: expected exactly the sections 'kernels' and 'stacks'")
    kernels = {}
    for name, entry in data["kernels"].items():
        eff = entry.get("hbm_efficiency") if isinstance(entry, dict) else None
        if not isinstance(eff, (int, float)) or not 0 < eff <= 1:
            raise StackError(
                f"{path}: kernels.{name}.hbm_efficiency: expected a share in (0, 1], got {eff!r}"
            )
        _check_sources(path, f"kernels.{name}", entry, ["hbm_efficiency"])
        kernels[name] = float(eff)
    stacks = {}
    allowed = {"layer_overhead_us", "workspace_bytes", "workspace_fraction", "source"}
    for name, entry in data["stacks"].items():
        if not isinstance(entry, dict) or set(entry) - allowed or "layer_overhead_us" not in entry:
            raise StackError(
                f"{path}: stacks.{name}: expected layer_overhead_us and workspace_bytes or workspace_fraction "
                f"(+ source), got {sorted(entry) if isinstance(entry, dict) else entry!r}"
            )
        fields = [f for f in ("layer_overhead_us", "workspace_bytes", "workspace_fraction") if f in entry]
        for f in fields:
            v = entry[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise StackError(f"{path}: stacks.{name}.{f}: expected a number >= 0, got {v!r}")
        src = _check_sources(path, f"stacks.{name}", entry, fields)
        stacks[name] = Stack(
            name,
            entry["layer_overhead_us"] * 1e-6,
            int(entry.get("workspace_bytes", 0)),
            float(entry.get("workspace_fraction", 0.0)),
            tuple(sorted((k, v) for k, v in src.items())),
        )
    return kernels, stacks


def kernel_efficiency(kernel: str) -> float:
    """Share of datasheet memory bandwidth a batch-1 weight read reaches with this kernel family."""
    kernels, _ = _library()
    if kernel not in kernels:
        raise StackError(f"{SOFTWARE_LIBRARY}: no kernel family {kernel!r}; known: {sorted(kernels)}")
    return kernels[kernel]


def stack_of(name: str) -> Stack:
    _, stacks = _library()
    if name not in stacks:
        raise StackError(f"{SOFTWARE_LIBRARY}: no stack {name!r}; known: {sorted(stacks)}")
    return stacks[name]
