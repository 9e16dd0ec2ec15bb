"""Discovery of the running machine from sysfs (NUMA nodes, HMAT numbers, memory tiers), and host rates
measured on it (memcpy, matmul) where sysfs has none: `Hardware.detect()`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moecxl.memory.tiers.schema import MIB, HardwareError

if TYPE_CHECKING:
    from moecxl.memory.tiers.hardware import Hardware

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


def detect_hardware(
    cls: type[Hardware],
    root: Path,
    memcpy_gbps: float | None,
    tflops: float | None,
    host_kernel: Mapping[str, Any] | None = None,
) -> Hardware:
    """A `cls` (Hardware) describing the machine under sysfs `root`: see `Hardware.detect`."""
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
