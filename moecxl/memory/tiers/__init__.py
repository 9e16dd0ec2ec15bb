"""Hardware profiles: the GPU, its links and the memory tiers experts can live in, with copy costs.

A profile is YAML (configs/hardware/*.yaml), strictly validated; every number carries its source. Device
definitions shared by several profiles live in a library file that a profile `include`s and names with
`use:`; `Hardware.to_dict()` gives the resolved, self-contained record. Cost functions are pure: a copy
from a tier to the GPU pays latency + a fixed per-copy overhead + bytes at the slowest rate on its path
(device read rate, any intermediate hop, the GPU link). A GPU reads CXL memory through the host root
complex, so CXL bandwidth beyond the GPU link is invisible to one GPU. Units: GB/s = 1e9 bytes/s.
`Hardware.detect()` reads the running machine from sysfs (NUMA nodes, HMAT, memory tiers).

Modules: `schema` (the records), `loading` (YAML and validation), `hardware` (`Hardware`), `costs`
(copy times and rates), `detect` (sysfs discovery and host measurements). Import from here.

    python -m moecxl.memory.tiers PROFILE.yaml ...   # print each profile's resolved record
"""

from moecxl.memory.tiers.costs import copy_gbps, copy_gbps_by_size, copy_time_s, path_gbps, shared_bandwidth
from moecxl.memory.tiers.detect import measure_host_matmul_tflops, measure_host_memcpy_gbps
from moecxl.memory.tiers.hardware import Hardware
from moecxl.memory.tiers.loading import MAX_KERNEL_EFFICIENCY
from moecxl.memory.tiers.schema import (
    GPU,
    MIB,
    SOURCE_KINDS,
    TIER_KINDS,
    Fault,
    HardwareError,
    Host,
    Link,
    Sources,
    Tier,
)

__all__ = [
    "GPU",
    "MAX_KERNEL_EFFICIENCY",
    "MIB",
    "SOURCE_KINDS",
    "TIER_KINDS",
    "Fault",
    "Hardware",
    "HardwareError",
    "Host",
    "Link",
    "Sources",
    "Tier",
    "copy_gbps",
    "copy_gbps_by_size",
    "copy_time_s",
    "measure_host_matmul_tflops",
    "measure_host_memcpy_gbps",
    "path_gbps",
    "shared_bandwidth",
]
