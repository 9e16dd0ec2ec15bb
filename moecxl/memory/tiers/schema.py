"""The records a hardware profile is made of: links, the GPU, memory tiers, the host CPUs, scheduled faults.

Every number carries its source (`sources`: (field, source) pairs, field "default" covering the rest).
Units: GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moecxl.memory.kerneltable import KernelTable

TIER_KINDS = ("hbm", "cxl", "dram", "nvme")
SOURCE_KINDS = ("paper", "datasheet", "spec", "measurement", "assumption", "detected from sysfs")
MIB = 1 << 20


class HardwareError(ValueError):
    """A hardware profile is wrong; the message names the file, the key and the value."""


Sources = tuple[tuple[str, str], ...]  # (field, source) pairs; field "default" covers the rest


def _source_of(obj: Any, field: str) -> str:
    d = dict(obj.sources)
    return d.get(field) or d["default"]


@dataclass(frozen=True)
class Link:
    """A hop on the way to the GPU (PCIe, NVLink-C2C, a CXL switch): sustained GB/s, pinned and pageable."""

    name: str
    gbps: float
    pageable_gbps: float | None = None
    sources: Sources = ()

    source_of = _source_of


@dataclass(frozen=True)
class GPU:
    """The accelerator: HBM bandwidth and size, bf16 peak, and the link it reaches host memory by."""

    name: str
    memory_gbps: float
    bf16_tflops: float
    hbm_bytes: int
    host_link: str
    count: int = 1
    sources: Sources = ()

    source_of = _source_of


@dataclass(frozen=True)
class Tier:
    """A place expert bytes can live. `link` is the hop into the GPU; `via` are hops before it."""

    name: str
    kind: str
    capacity_bytes: int
    read_gbps: float
    write_gbps: float
    latency_ns: float
    copy_overhead_us: float
    link: str | None = None  # None only for kind "hbm": already on the GPU
    via: tuple[str, ...] = ()
    numa_node: int | None = None
    sources: Sources = ()

    source_of = _source_of


@dataclass(frozen=True)
class Host:
    """The host CPUs, for computing an expert where it lives: sustained GFLOP/s on an expert FFN and
    the memory read rate they reach (a tier slower than this caps it).

    `kernel_efficiency` (optional) is the host expert kernel's measured expert bytes/s over the same
    machine's read rate (`python -m moecxl.memory.hostbench`); where a profile gives it, `mem_gbps`
    already includes it (read rate x efficiency), and its source says how.

    `kernel` (optional) is the kernel's measured rates per dtype and token count (`KernelTable`): an
    expert computed on this host then takes no less than the kernel's own time for it, scaled to the
    expert's size (`runtime.gate.host_compute_on_tier_s`). `Hardware.with_host_kernel` attaches one.
    """

    name: str
    gflops: float
    mem_gbps: float
    kernel_efficiency: float | None = None
    sources: Sources = ()
    kernel: KernelTable | None = None

    source_of = _source_of


@dataclass(frozen=True)
class Fault:
    """A scheduled device failure: `tier` goes offline at a decode step and returns (or not)."""

    tier: str
    offline_at_step: int
    online_at_step: int | None = None
