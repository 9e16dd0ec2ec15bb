"""Loading a hardware profile: strict YAML, library `include`/`use`, every field and its source validated.

A profile is YAML (configs/hardware/*.yaml). Device definitions shared by several profiles live in a
library file that a profile `include`s and names with `use:`. Errors name the file, the key and the value.
`Hardware.from_yaml` and `Hardware.from_dict` call `load_profile` and `profile_from_dict` with the class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moecxl.memory.kerneltable import HostKernelError, KernelTable
from moecxl.memory.tiers.schema import (
    GPU,
    SOURCE_KINDS,
    TIER_KINDS,
    Fault,
    HardwareError,
    Host,
    Link,
    Sources,
    Tier,
)

if TYPE_CHECKING:
    from moecxl.memory.tiers.hardware import Hardware

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
    lib: dict[str, dict] = {"gpus": {}, "links": {}, "tiers": {}, "hosts": {}}
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
                raise HardwareError(f"{p}: {section}: expected sections gpus, links, tiers, hosts (mappings)")
            lib[section].update(entries)
    return lib


def _kernel_table(ctx: _Ctx, raw: Any, base_dir: Path | None) -> KernelTable | None:
    """`host.kernel`: a hostbench JSON record's path (relative to the profile's directory), or the
    mapping `KernelTable.to_dict()` writes."""
    if raw is None:
        return None
    try:
        if isinstance(raw, str):
            path = Path(raw) if base_dir is None or Path(raw).is_absolute() else base_dir / raw
            return KernelTable.from_bench(path)
        if isinstance(raw, dict):
            return KernelTable.from_dict(raw)
    except HostKernelError as e:
        raise ctx.fail("host.kernel", str(e)) from e
    raise ctx.fail("host.kernel", f"expected a hostbench record's path or a rates mapping, got {raw!r}")


def _mapping(ctx: _Ctx, key: str, v: Any, required: bool = False) -> dict:
    if v is None and not required:
        return {}
    if not isinstance(v, dict) or (required and not v):
        raise ctx.fail(key, f"expected a non-empty mapping of name -> entry, got {v!r}")
    return v


def load_profile(cls: type[Hardware], path: Path) -> Hardware:
    """Load and strictly validate the profile at `path` as a `cls`; errors name the file and the key."""
    ctx = _Ctx(str(path))
    return _build(cls, _load_yaml(path, ctx), ctx, path.parent, default_name=path.stem)


def profile_from_dict(cls: type[Hardware], data: Mapping[str, Any], origin: str = "<dict>") -> Hardware:
    """A `cls` from a mapping in the profile schema (e.g. `to_dict()` output); no `include`."""
    return _build(cls, dict(data), _Ctx(origin), None, default_name=origin)


def _build(cls: type[Hardware], data: dict, ctx: _Ctx, base_dir: Path | None, default_name: str) -> Hardware:
    """A `cls` (Hardware) from a profile mapping: keys checked, library entries merged, links resolved."""
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
        raise ctx.fail("gpu.host_link", f"link {gpu.host_link!r} is not defined; links: {sorted(link_names)}")

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
        entry, kernel = data["host"], None
        if isinstance(entry, dict):
            entry = dict(entry)  # the caller's mapping stays as it was
            kernel = entry.pop("kernel", None)
        hv, hs = _resolve(ctx, "host", entry, lib["hosts"], _HOST_FIELDS)
        host = Host(**hv, sources=hs, kernel=_kernel_table(ctx, kernel, base_dir))
    name = data.get("name", default_name)
    return cls(
        name, gpu, tuple(links), tuple(tiers), tuple(faults), data.get("description", "").strip(), host
    )
