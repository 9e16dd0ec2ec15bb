"""`Hardware`: a machine's GPU, links, memory tiers, host and faults, looked up by name and recorded.

`Hardware.to_dict()` gives the resolved, self-contained record; `from_yaml`/`from_dict` load a profile
(`loading`), `detect()` reads the running machine (`detect`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecxl.memory.kerneltable import KernelTable
from moecxl.memory.tiers.detect import detect_hardware
from moecxl.memory.tiers.loading import load_profile, profile_from_dict
from moecxl.memory.tiers.schema import GPU, Fault, HardwareError, Host, Link, Tier


@dataclass(frozen=True)
class Hardware:
    """A machine: one GPU kind (× count), named links, named memory tiers, optional scheduled faults."""

    name: str
    gpu: GPU
    links: tuple[Link, ...]
    tiers: tuple[Tier, ...]
    faults: tuple[Fault, ...] = ()
    description: str = ""
    host: Host | None = None

    # -- lookup ---------------------------------------------------------------------------------------
    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"hardware {self.name!r} has no tier {name!r}; tiers: {[t.name for t in self.tiers]}")

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(f"hardware {self.name!r} has no link {name!r}; links: {[x.name for x in self.links]}")

    def with_host_kernel(self, table: KernelTable | str | os.PathLike | None) -> Hardware:
        """This profile with its host's kernel rates set to `table` (a `KernelTable`, or the JSON record
        `python -m moecxl.memory.hostbench` writes; None removes them): every host-computed expert then
        takes at least the kernel's own time for it (`Host.kernel`)."""
        if self.host is None:
            raise HardwareError(
                f"profile {self.name!r} has no host: block to attach kernel rates to; add host: (gflops, "
                "mem_gbps with sources) or use Hardware.detect(host_kernel=...)"
            )
        if table is not None and not isinstance(table, KernelTable):
            table = KernelTable.from_bench(table)
        return dataclasses.replace(self, host=dataclasses.replace(self.host, kernel=table))

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def tiers_of_kind(self, kind: str) -> tuple[Tier, ...]:
        return tuple(t for t in self.tiers if t.kind == kind)

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Hardware:
        """Load and strictly validate a profile; errors name the file and the key."""
        return load_profile(cls, Path(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> Hardware:
        """Build from a mapping in the profile schema (e.g. `to_dict()` output); no `include`."""
        return profile_from_dict(cls, data, origin)

    def to_dict(self) -> dict[str, Any]:
        """The resolved, self-contained record (no include/use); `from_dict(to_dict())` round-trips."""

        def record(obj: Any, skip: tuple[str, ...] = ("name",)) -> dict:
            d = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if f.name in skip or f.name == "sources" or v is None or v == ():
                    continue
                d[f.name] = list(v) if isinstance(v, tuple) else v
            src = dict(obj.sources)
            d["source"] = src["default"] if len(src) == 1 else src
            return d

        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["gpu"] = record(self.gpu, skip=())
        out["links"] = {x.name: record(x) for x in self.links}
        out["tiers"] = {t.name: record(t) for t in self.tiers}
        if self.host is not None:
            out["host"] = record(self.host, skip=("kernel",))
            if self.host.kernel is not None:
                out["host"]["kernel"] = self.host.kernel.to_dict()
        if self.faults:
            out["faults"] = [
                {k: v for k, v in dataclasses.asdict(f).items() if v is not None} for f in self.faults
            ]
        return out

    @classmethod
    def detect(
        cls,
        sysfs_root: str | os.PathLike = "/sys",
        memcpy_gbps: float | None = None,
        tflops: float | None = None,
        host_kernel: Mapping[str, Any] | None = None,
    ) -> Hardware:
        """Describe the running machine from sysfs: NUMA nodes, HMAT numbers, memory tiers.

        The CPU plays the GPU (the JAX device); nodes with CPUs become `dram-nodeN` tiers, CPU-less nodes
        `cxl-nodeN` candidates. Numbers come from HMAT where present, else from a host memcpy measurement
        (`memcpy_gbps`, `tflops` skip the measurement) or labelled assumptions. `sysfs_root` lets tests
        point at a fake tree.

        `host_kernel` adds a `host:` block from a measurement of the host expert kernel on this machine
        (`moecxl.memory.hostbench.measure_host_kernel()`, or `hostbench.detect_hardware()` for both at
        once): {"read_gbps", "kernel_gbps", "gflops", "source"}; `mem_gbps` is the kernel's own rate,
        `kernel_efficiency` its share of the read rate.
        """
        return detect_hardware(cls, Path(sysfs_root), memcpy_gbps, tflops, host_kernel)
