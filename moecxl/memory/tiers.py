"""Hardware profiles: the GPU, its links and the memory tiers experts can live in, with copy costs.

A profile is YAML (configs/hardware/*.yaml), strictly validated; every number carries its source. Device
definitions shared by several profiles live in a library file that a profile `include`s and names with
`use:`; `Hardware.to_dict()` gives the resolved, self-contained record. Cost functions are pure: a copy
from a tier to the GPU pays latency + a fixed per-copy overhead + bytes at the slowest rate on its path
(device read rate, any intermediate hop, the GPU link). A GPU reads CXL memory through the host root
complex, so CXL bandwidth beyond the GPU link is invisible to one GPU. Units: GB/s = 1e9 bytes/s.
`Hardware.detect()` reads the running machine from sysfs (NUMA nodes, HMAT, memory tiers).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

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
    """

    name: str
    gflops: float
    mem_gbps: float
    kernel_efficiency: float | None = None
    sources: Sources = ()

    source_of = _source_of


@dataclass(frozen=True)
class Fault:
    """A scheduled device failure: `tier` goes offline at a decode step and returns (or not)."""

    tier: str
    offline_at_step: int
    online_at_step: int | None = None


# Field specs: name -> (kind, required). kind: "pos" > 0, "nonneg" >= 0, "int" > 0 integer, "str", ...
_GPU_FIELDS = {
    "name": ("str", True),
    "memory_gbps": ("pos", True),
    "bf16_tflops": ("pos", True),
    "hbm_bytes": ("int", True),
    "host_link": ("str", True),
    "count": ("int", False),
}
_LINK_FIELDS = {"gbps": ("pos", True), "pageable_gbps": ("pos", False)}
_TIER_FIELDS = {
    "kind": ("kind", True),
    "capacity_bytes": ("int", True),
    "read_gbps": ("pos", True),
    "write_gbps": ("pos", True),
    "latency_ns": ("nonneg", True),
    "copy_overhead_us": ("nonneg", True),
    "link": ("str", True),  # not for kind "hbm"
    "via": ("strlist", False),
    "numa_node": ("node", False),
}
_HOST_FIELDS = {
    "name": ("str", True),
    "gflops": ("pos", True),
    "mem_gbps": ("pos", True),
    "kernel_efficiency": ("ratio", False),
}
_NUMERIC = ("pos", "nonneg", "int", "ratio")
MAX_KERNEL_EFFICIENCY = 1.5  # a kernel reading faster than 1.5x a float32 GEMV's read rate is a mistake
_PROFILE_KEYS = {"name", "description", "include", "gpu", "links", "tiers", "faults", "host"}


class _Ctx:
    """Where we are in a file, so every error names file and key."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, msg: str) -> HardwareError:
        return HardwareError(f"{self.path}: {key}: {msg}")


def _check_value(ctx: _Ctx, key: str, kind: str, v: Any) -> Any:
    if kind in _NUMERIC:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ctx.fail(key, f"expected a number, got {v!r}")
        if kind == "int" and (not isinstance(v, int) or v <= 0):
            raise ctx.fail(key, f"expected a positive integer, got {v!r}")
        if kind == "pos" and v <= 0:
            raise ctx.fail(key, f"expected a number > 0, got {v!r}")
        if kind == "nonneg" and v < 0:
            raise ctx.fail(key, f"expected a number >= 0, got {v!r}")
        if kind == "ratio" and not 0 < v <= MAX_KERNEL_EFFICIENCY:
            raise ctx.fail(key, f"expected a ratio in (0, {MAX_KERNEL_EFFICIENCY}], got {v!r}")
        return v
    if kind == "kind":
        if v not in TIER_KINDS:
            raise ctx.fail(key, f"unknown tier kind {v!r}; expected one of {list(TIER_KINDS)}")
        return v
    if kind == "node":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ctx.fail(key, f"expected a NUMA node number >= 0, got {v!r}")
        return v
    if kind == "strlist":
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ctx.fail(key, f"expected a list of link names, got {v!r}")
        return tuple(v)
    if not isinstance(v, str) or not v:
        raise ctx.fail(key, f"expected a non-empty string, got {v!r}")
    return v


def _sources(ctx: _Ctx, key: str, raw: Any, fields: Sequence[str]) -> dict[str, str]:
    """Normalise `source:` (a string, or a mapping field -> string with optional `default`)."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = {"default": raw}
    if not isinstance(raw, dict):
        raise ctx.fail(f"{key}.source", f"expected a string or a mapping of field -> source, got {raw!r}")
    out = {}
    for f, text in raw.items():
        if f != "default" and f not in fields:
            raise ctx.fail(f"{key}.source.{f}", f"not a field of this entry; fields: {sorted(fields)}")
        if not isinstance(text, str) or not text.startswith(SOURCE_KINDS):
            raise ctx.fail(
                f"{key}.source.{f}",
                f"must start with one of {list(SOURCE_KINDS)} (e.g. 'paper: ...'), got {text!r}",
            )
        out[f] = text
    return out


def _resolve(
    ctx: _Ctx, key: str, entry: Any, library: Mapping[str, Any], specs: Mapping
) -> tuple[dict, Sources]:
    """Merge an entry with the library record it `use`s; check keys, values and each number's source."""
    if isinstance(entry, str):
        entry = {"use": entry}
    if not isinstance(entry, dict):
        raise ctx.fail(key, f"expected a mapping, got {entry!r}")
    entry = dict(entry)
    base: dict = {}
    base_src: dict[str, str] = {}
    if "use" in entry:
        name = entry.pop("use")
        if name not in library:
            raise ctx.fail(f"{key}.use", f"{name!r} is not in the included library; known: {sorted(library)}")
        base = dict(library[name])
        base_src = _sources(ctx, f"library {name}", base.pop("source", None), specs)
    own_src = _sources(ctx, key, entry.pop("source", None), specs)
    for k in entry:
        if k not in specs:
            raise ctx.fail(f"{key}.{k}", f"unknown key; expected one of {sorted(specs)} (+ use, source)")
    merged = {**base, **entry}
    values = {}
    sources = {}
    for f, (kind, required) in specs.items():
        if f not in merged or merged[f] is None:
            if required and not (f == "link" and merged.get("kind") == "hbm"):
                raise ctx.fail(f"{key}.{f}", "missing")
            continue
        values[f] = _check_value(ctx, f"{key}.{f}", kind, merged[f])
        if kind in _NUMERIC:  # the source of a number comes from wherever the number came from
            src = own_src if f in entry else base_src
            text = src.get(f) or src.get("default")
            if not text:
                raise ctx.fail(f"{key}.{f}", f"value {merged[f]!r} has no source (add `source:`)")
            sources[f] = text
    default = own_src.get("default") or base_src.get("default") or next(iter(sources.values()), "")
    pairs = [("default", default)] + sorted((f, s) for f, s in sources.items() if s != default)
    return values, tuple(pairs)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that rejects a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (two tiers or links with one name?)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(path: Path, ctx: _Ctx) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except (OSError, yaml.YAMLError) as e:
        raise HardwareError(f"{path}: cannot read YAML: {e}") from e
    if not isinstance(data, dict):
        raise ctx.fail("<top>", f"expected a mapping, got {type(data).__name__}")
    return data


def _load_library(ctx: _Ctx, base_dir: Path | None, include: Any) -> dict[str, dict]:
    lib: dict[str, dict] = {"gpus": {}, "links": {}, "tiers": {}}
    names = [include] if isinstance(include, str) else include or []
    for name in names:
        if base_dir is None:
            raise ctx.fail("include", "only profiles read from a file can include a library")
        p = (base_dir / name).resolve()
        if not p.exists():
            raise ctx.fail("include", f"library file {name!r} not found (looked at {p})")
        data = _load_yaml(p, _Ctx(str(p)))
        for section, entries in data.items():
            if section not in lib or not isinstance(entries, dict):
                raise HardwareError(f"{p}: {section}: expected sections gpus, links, tiers (mappings)")
            lib[section].update(entries)
    return lib


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

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def tiers_of_kind(self, kind: str) -> tuple[Tier, ...]:
        return tuple(t for t in self.tiers if t.kind == kind)

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Hardware:
        """Load and strictly validate a profile; errors name the file and the key."""
        path = Path(path)
        ctx = _Ctx(str(path))
        return cls._from_dict(_load_yaml(path, ctx), ctx, path.parent, default_name=path.stem)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> Hardware:
        """Build from a mapping in the profile schema (e.g. `to_dict()` output); no `include`."""
        return cls._from_dict(dict(data), _Ctx(origin), None, default_name=origin)

    @classmethod
    def _from_dict(cls, data: dict, ctx: _Ctx, base_dir: Path | None, default_name: str) -> Hardware:
        for k in data:
            if k not in _PROFILE_KEYS:
                raise ctx.fail(k, f"unknown key; expected one of {sorted(_PROFILE_KEYS)}")
        lib = _load_library(ctx, base_dir, data.get("include"))
        if "gpu" not in data:
            raise ctx.fail("gpu", "missing")
        gv, gs = _resolve(ctx, "gpu", data["gpu"], lib["gpus"], _GPU_FIELDS)
        gpu = GPU(**gv, sources=gs)

        links = []
        for name, entry in _mapping(ctx, "links", data.get("links")).items():
            lv, ls = _resolve(ctx, f"links.{name}", entry, lib["links"], _LINK_FIELDS)
            links.append(Link(name=name, **lv, sources=ls))
        link_names = {x.name for x in links}
        if gpu.host_link not in link_names:
            raise ctx.fail(
                "gpu.host_link", f"link {gpu.host_link!r} is not defined; links: {sorted(link_names)}"
            )

        tiers = []
        for name, entry in _mapping(ctx, "tiers", data.get("tiers"), required=True).items():
            tv, ts = _resolve(ctx, f"tiers.{name}", entry, lib["tiers"], _TIER_FIELDS)
            for hop in (tv.get("link"), *tv.get("via", ())):
                if hop is not None and hop not in link_names:
                    raise ctx.fail(
                        f"tiers.{name}.link", f"link {hop!r} is not defined; links: {sorted(link_names)}"
                    )
            tiers.append(Tier(name=name, **tv, sources=ts))

        faults = []
        raw_faults = data.get("faults") or []
        if not isinstance(raw_faults, list):
            raise ctx.fail("faults", f"expected a list, got {raw_faults!r}")
        tier_names = [t.name for t in tiers]
        for i, f in enumerate(raw_faults):
            key = f"faults[{i}]"
            if not isinstance(f, dict) or set(f) - {"tier", "offline_at_step", "online_at_step"}:
                raise ctx.fail(key, f"expected {{tier, offline_at_step, online_at_step?}}, got {f!r}")
            if f.get("tier") not in tier_names:
                raise ctx.fail(f"{key}.tier", f"unknown tier {f.get('tier')!r}; tiers: {tier_names}")
            off, on = f.get("offline_at_step"), f.get("online_at_step")
            for k, v in (("offline_at_step", off), ("online_at_step", on)):
                if (v is not None or k == "offline_at_step") and (
                    isinstance(v, bool) or not isinstance(v, int) or v < 0
                ):
                    raise ctx.fail(f"{key}.{k}", f"expected a step number >= 0, got {v!r}")
            if on is not None and on <= off:
                raise ctx.fail(f"{key}.online_at_step", f"{on} is not after offline_at_step {off}")
            faults.append(Fault(f["tier"], off, on))

        host = None
        if data.get("host") is not None:
            hv, hs = _resolve(ctx, "host", data["host"], {}, _HOST_FIELDS)
            host = Host(**hv, sources=hs)
        name = data.get("name", default_name)
        return cls(
            name, gpu, tuple(links), tuple(tiers), tuple(faults), data.get("description", "").strip(), host
        )

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
            out["host"] = record(self.host, skip=())
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
        return _detect(cls, Path(sysfs_root), memcpy_gbps, tflops, host_kernel)


def _mapping(ctx: _Ctx, key: str, v: Any, required: bool = False) -> dict:
    if v is None and not required:
        return {}
    if not isinstance(v, dict) or (required and not v):
        raise ctx.fail(key, f"expected a non-empty mapping of name -> entry, got {v!r}")
    return v


# -- cost model (pure) ------------------------------------------------------------------------------------
def _tier(tier: Tier | str, hw: Hardware) -> Tier:
    return hw.tier(tier) if isinstance(tier, str) else tier


def _link_gbps(link: Link, pinned: bool) -> float:
    if pinned:
        return link.gbps
    if link.pageable_gbps is None:
        raise ValueError(f"link {link.name!r} has no pageable_gbps; pageable copies over it are unknown")
    return link.pageable_gbps


def path_gbps(tier: Tier | str, hw: Hardware, pinned: bool = True) -> float:
    """Sustained GB/s of one copy from `tier` to one GPU: min(device read, every hop, GPU link)."""
    t = _tier(tier, hw)
    if t.link is None:
        return t.read_gbps
    hops = (*t.via, t.link)
    return min(t.read_gbps, *(_link_gbps(hw.link(h), pinned) for h in hops))


def copy_time_s(tier: Tier | str, nbytes: int, hw: Hardware, pinned: bool = True) -> float:
    """Seconds to copy `nbytes` from `tier` to the GPU: latency + per-copy overhead + bytes / path rate.

    HBM is where compute happens: 0 s. Against published pinned H2D points on PCIe (4 KiB 5 us, 64 KiB
    8 us, 1 MiB 36-41 us) this is close for tiny and large copies and optimistic (~35%) near 1 MiB.
    """
    t = _tier(tier, hw)
    if t.kind == "hbm":
        return 0.0
    if nbytes < 0:
        raise ValueError(f"copy_time_s: nbytes must be >= 0, got {nbytes}")
    return t.latency_ns * 1e-9 + t.copy_overhead_us * 1e-6 + nbytes / (path_gbps(t, hw, pinned) * 1e9)


def copy_gbps(tier: Tier | str, nbytes: int, hw: Hardware, pinned: bool = True) -> float:
    """Achieved GB/s of one copy of `nbytes`: small copies pay the fixed costs; levels off at ~8-16 MiB."""
    t = _tier(tier, hw)
    if t.kind == "hbm":
        return t.read_gbps
    return nbytes / copy_time_s(t, nbytes, hw, pinned) / 1e9


def copy_gbps_by_size(
    tier: Tier | str,
    hw: Hardware,
    sizes_bytes: Sequence[int] = tuple(4096 << i for i in range(15)),
    pinned=True,
) -> dict[int, float]:
    """{copy bytes: achieved GB/s} over a size sweep (default 4 KiB .. 64 MiB), for plots and checks."""
    return {int(n): copy_gbps(tier, int(n), hw, pinned) for n in sizes_bytes}


def shared_bandwidth(
    hw: Hardware, flows: Sequence[str | tuple[str, int]], pinned: bool = True
) -> tuple[float, ...]:
    """GB/s each concurrent copy gets (max-min fair) when `flows` run together.

    A flow is a tier name, or (tier name, GPU index) with several GPUs. Shared resources: each tier's
    device read rate, each hop in `via` (host side, one for all GPUs), and each GPU's own link. So two
    GPUs reading one CXL card split the card; two tiers feeding one GPU split its link.
    """
    users: list[list[tuple]] = []
    cap: dict[tuple, float] = {}
    for flow in flows:
        name, g = (flow, 0) if isinstance(flow, str) else flow
        if not 0 <= g < hw.gpu.count:
            raise ValueError(f"flow {flow!r}: GPU index {g} out of range (hardware has {hw.gpu.count})")
        t = hw.tier(name)
        res = [("tier", t.name)]
        cap[("tier", t.name)] = t.read_gbps
        for h in t.via:
            res.append(("via", h))
            cap[("via", h)] = _link_gbps(hw.link(h), pinned)
        if t.link is not None:
            res.append(("link", t.link, g))
            cap[("link", t.link, g)] = _link_gbps(hw.link(t.link), pinned)
        users.append(res)
    rate = [0.0] * len(users)
    active = set(range(len(users)))
    left = dict(cap)
    while active:
        load = {r: sum(1 for i in active if r in users[i]) for r in left}
        inc = min(left[r] / n for r, n in load.items() if n)
        for i in active:
            rate[i] += inc
        for r, n in load.items():
            left[r] -= inc * n
        full = {r for r, n in load.items() if n and left[r] <= 1e-9 * cap[r]}
        active = {i for i in active if not full.intersection(users[i])}
    return tuple(rate)


# -- discovery from sysfs -----------------------------------------------------------------------------------
_DETECTED = "detected from sysfs"
_LOCAL_DDR_NS = 115.0  # Melody (ASPLOS'25): local DRAM 111-117 ns
_CXL_D_GBPS = 52.0  # seed paper 5.1 / Melody: CXL-D, the fastest of its four devices


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _parse_list(text: str | None) -> tuple[int, ...]:
    out: list[int] = []
    for part in (text or "").split(","):
        if part.strip():
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def _format_list(xs: Sequence[int]) -> str:
    return (
        f"{xs[0]}-{xs[-1]}" if len(xs) > 1 and list(xs) == list(range(xs[0], xs[-1] + 1)) else str(list(xs))
    )


def _node_info(node_dir: Path) -> dict[str, Any]:
    """cpus, MemTotal bytes, SLIT distances and HMAT access numbers of one sysfs node directory."""
    info: dict[str, Any] = {"cpus": _parse_list(_read(node_dir / "cpulist")), "hmat": {}}
    mem = 0
    for line in (_read(node_dir / "meminfo") or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "MemTotal:":
            mem = int(parts[3]) * (1024 if parts[4:5] == ["kB"] else 1)
    info["mem_bytes"] = mem
    info["distance"] = [int(x) for x in (_read(node_dir / "distance") or "").split()]
    for access in ("access0", "access1"):
        d = node_dir / access / "initiators"
        vals = {
            k: _read(d / k) for k in ("read_bandwidth", "write_bandwidth", "read_latency", "write_latency")
        }
        if all(v is not None and v.isdigit() and int(v) > 0 for v in vals.values()):
            info["hmat"] = {k: int(v) for k, v in vals.items()} | {"access": access}
            break
    return info


def _memory_tiers(root: Path) -> dict[int, int]:
    """node -> memory tier id from /sys/devices/virtual/memory_tiering (lower id = faster)."""
    out = {}
    base = root / "devices/virtual/memory_tiering"
    for d in sorted(base.glob("memory_tier*")) if base.is_dir() else ():
        tier_id = int(d.name.removeprefix("memory_tier"))
        for n in _parse_list(_read(d / "nodelist")):
            out[n] = tier_id
    return out


def _host_block(kernel: Mapping[str, Any]) -> dict[str, Any]:
    """A profile's `host:` entry from a host-kernel measurement (see `Hardware.detect`)."""
    need = ("read_gbps", "kernel_gbps", "gflops", "source")
    missing = [k for k in need if k not in kernel]
    if missing:
        raise HardwareError(f"Hardware.detect: host_kernel lacks {missing}; expected keys {list(need)}")
    read, rate = float(kernel["read_gbps"]), float(kernel["kernel_gbps"])
    eff = rate / read
    where = str(kernel["source"])
    return {
        "name": "cpu",
        "gflops": float(kernel["gflops"]),
        "mem_gbps": rate,
        "kernel_efficiency": round(eff, 3),
        "source": {
            "default": f"measurement: {where}",
            "gflops": f"measurement: host expert kernel GFLOP/s at its largest measured batch ({where})",
            "mem_gbps": f"measurement: host expert kernel, bf16, 1 token: {rate:.1f} GB/s = read rate "
            f"{read:.1f} GB/s x efficiency {eff:.2f} ({where})",
            "kernel_efficiency": f"measurement: kernel {rate:.1f} GB/s / float32 GEMV read {read:.1f} GB/s ({where})",
        },
    }


def _detect(
    cls: type[Hardware],
    root: Path,
    memcpy_gbps: float | None,
    tflops: float | None,
    host_kernel: Mapping[str, Any] | None = None,
) -> Hardware:
    node_root = root / "devices/system/node"
    dirs = sorted(node_root.glob("node[0-9]*"), key=lambda p: int(p.name[4:]))
    if not dirs:
        raise HardwareError(f"{node_root}: no NUMA node directories (node0, node1, ...) found")
    memtiers = _memory_tiers(root)
    measured = f"measurement: numpy 64 MiB copy on this host ({os.uname().nodename}), median of 5"
    if memcpy_gbps is None:
        memcpy_gbps = measure_host_memcpy_gbps()
    else:
        measured = "measurement: host memcpy rate given to Hardware.detect()"
    tflops_src = "measurement: numpy float32 512^3 matmul on this host (bf16 proxy)"
    if tflops is None:
        tflops = measure_host_matmul_tflops()
    else:
        tflops_src = "measurement: compute rate given to Hardware.detect()"
    nodes = {int(d.name[4:]): _node_info(d) for d in dirs}
    cpu_nodes = [n for n, i in nodes.items() if i["cpus"]] or [min(nodes)]
    local = nodes[cpu_nodes[0]]
    local_ns = local["hmat"].get("read_latency") or _LOCAL_DDR_NS
    tiers: dict[str, Any] = {
        "device": {
            "kind": "hbm",
            "capacity_bytes": sum(nodes[n]["mem_bytes"] for n in cpu_nodes) or 1,
            "read_gbps": memcpy_gbps,
            "write_gbps": memcpy_gbps,
            "latency_ns": local_ns,
            "copy_overhead_us": 0.0,
            "source": {
                "default": measured,
                "capacity_bytes": f"{_DETECTED}: MemTotal of CPU nodes {cpu_nodes} (JAX CPU device memory)",
                "latency_ns": f"{_DETECTED}: HMAT"
                if local["hmat"]
                else "assumption: no HMAT; local DDR 115 ns (Melody, ASPLOS'25: 111-117 ns)",
                "copy_overhead_us": "assumption: the CPU device computes in place; no copy",
            },
        }
    }
    for n, info in nodes.items():
        if info["mem_bytes"] <= 0:
            continue  # memory-less node (e.g. GH200 spare nodes)
        cxl = not info["cpus"]
        h = info["hmat"]
        cpus = info["cpus"]
        where = f"node{n}, " + ("CPU-less (CXL candidate)" if cxl else f"CPUs {_format_list(cpus)}")
        if n in memtiers:
            where += f", memory_tier{memtiers[n]}"
        dist = info["distance"][cpu_nodes[0]] if len(info["distance"]) > cpu_nodes[0] else 10
        if h:
            rw = {
                "read_gbps": h["read_bandwidth"] * MIB / 1e9,
                "write_gbps": h["write_bandwidth"] * MIB / 1e9,
                "latency_ns": float(h["read_latency"]),
            }
            src = {"default": f"{_DETECTED}: {where}, HMAT {h['access']} (MiB/s, ns)"}
        else:
            bw = _CXL_D_GBPS if cxl else memcpy_gbps
            rw = {"read_gbps": bw, "write_gbps": bw, "latency_ns": local_ns * dist / 10}
            src = {
                "default": f"{_DETECTED}: {where}",
                "read_gbps": "assumption: no HMAT; CXL-D-class 52 GB/s (seed paper 5.1, Melody)"
                if cxl
                else measured,
                "latency_ns": f"assumption: no HMAT; local {local_ns:g} ns x SLIT distance {dist}/10",
            }
            src["write_gbps"] = src["read_gbps"]
        tiers[f"{'cxl' if cxl else 'dram'}-node{n}"] = {
            "kind": "cxl" if cxl else "dram",
            "capacity_bytes": info["mem_bytes"],
            **rw,
            "copy_overhead_us": 0.0,
            "link": "host-memcpy",
            "numa_node": n,
            "source": src
            | {
                "capacity_bytes": f"{_DETECTED}: {where}, MemTotal",
                "copy_overhead_us": "assumption: a host memcpy has no DMA setup cost",
            },
        }
    data = {
        "name": "detected",
        "description": f"Detected from {root} at {time.strftime('%Y-%m-%d %H:%M')}; the CPU is the device.",
        "gpu": {
            "name": "cpu",
            "memory_gbps": memcpy_gbps,
            "bf16_tflops": tflops,
            "hbm_bytes": tiers["device"]["capacity_bytes"],
            "host_link": "host-memcpy",
            "source": {"default": measured, "bf16_tflops": tflops_src, "hbm_bytes": f"{_DETECTED}: MemTotal"},
        },
        "links": {"host-memcpy": {"gbps": memcpy_gbps, "pageable_gbps": memcpy_gbps, "source": measured}},
        "tiers": tiers,
    }
    if host_kernel is not None:
        data["host"] = _host_block(host_kernel)
    return cls.from_dict(data, origin=f"detected from {root}")


# -- measurements on this machine -------------------------------------------------------------------------
def measure_host_memcpy_gbps(nbytes: int = 64 * MIB, repeats: int = 5) -> float:
    """Median GB/s of a numpy copy of `nbytes` on this host (a measurement: label it so)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch both buffers first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times)) / 1e9


def measure_host_matmul_tflops(n: int = 512, repeats: int = 3) -> float:
    """Median TFLOP/s of an n x n float32 numpy matmul: a proxy for the CPU's compute peak (no bf16 here)."""
    a = np.ones((n, n), np.float32)
    a @ a
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e12


if __name__ == "__main__":  # python -m moecxl.memory.tiers PROFILE.yaml: print the resolved record
    import sys

    for arg in sys.argv[1:]:
        print(yaml.safe_dump(Hardware.from_yaml(arg).to_dict(), sort_keys=False, width=110))
