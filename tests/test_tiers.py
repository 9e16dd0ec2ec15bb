"""Hardware profiles: every shipped profile loads; the copy-cost model; strict errors; sysfs discovery."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from moecxl.memory import (
    Hardware,
    HardwareError,
    copy_gbps,
    copy_gbps_by_size,
    copy_time_s,
    path_gbps,
    shared_bandwidth,
)

PROFILES = sorted((Path(__file__).parents[1] / "configs" / "hardware").glob("*.yaml"))
MIB = 1 << 20

MINIMAL = {
    "name": "mini",
    "gpu": {
        "name": "G",
        "memory_gbps": 1000,
        "bf16_tflops": 100,
        "hbm_bytes": 10**10,
        "host_link": "pcie",
        "source": "datasheet: test",
    },
    "links": {"pcie": {"gbps": 50, "pageable_gbps": 12.5, "source": "measurement: test"}},
    "tiers": {
        "hbm": {
            "kind": "hbm",
            "capacity_bytes": 10**10,
            "read_gbps": 1000,
            "write_gbps": 1000,
            "latency_ns": 500,
            "copy_overhead_us": 0,
            "source": "datasheet: test",
        },
        "cxl-b": {
            "kind": "cxl",
            "capacity_bytes": 10**11,
            "read_gbps": 26,
            "write_gbps": 10,
            "latency_ns": 239,
            "copy_overhead_us": 5,
            "link": "pcie",
            "numa_node": 2,
            "source": "paper: test",
        },
    },
}


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_loads_and_round_trips(path):
    hw = Hardware.from_yaml(path)
    assert hw.name == path.stem
    assert hw.tiers_of_kind("hbm"), "every profile names its HBM tier"
    for t in hw.tiers:
        for f in ("capacity_bytes", "read_gbps", "write_gbps", "latency_ns", "copy_overhead_us"):
            assert t.source_of(f).split(":")[0] in (
                "paper",
                "datasheet",
                "spec",
                "measurement",
                "assumption",
                "detected from sysfs",
            )
    assert Hardware.from_dict(hw.to_dict()) == hw
    assert yaml.safe_load(yaml.safe_dump(hw.to_dict())) == hw.to_dict()


def test_contract_example_numbers():
    hw = Hardware.from_yaml(PROFILES[0].parent / "h100-cxl.yaml")
    assert hw.gpu.memory_gbps == 3350 and hw.gpu.bf16_tflops == 989 and hw.gpu.hbm_bytes == 80 * 10**9
    assert {t.kind for t in hw.tiers} == {"hbm", "cxl", "dram", "nvme"}
    cxl = hw.tier("cxl-d")
    assert (cxl.read_gbps, cxl.latency_ns, cxl.numa_node) == (52, 271, 2)
    four = Hardware.from_yaml(PROFILES[0].parent / "h100-4cxl.yaml")
    got = {n: (four.tier(n).latency_ns, four.tier(n).read_gbps) for n in ("cxl-a", "cxl-b", "cxl-c", "cxl-d")}
    assert got == {"cxl-a": (214, 32), "cxl-b": (239, 26), "cxl-c": (394, 18), "cxl-d": (271, 52)}
    assert four.tier("cxl-c").capacity_bytes == 16 * 10**9
    faults = Hardware.from_yaml(PROFILES[0].parent / "h100-4cxl-faults.yaml").faults
    assert [(f.tier, f.offline_at_step, f.online_at_step) for f in faults] == [("cxl-b", 10, 30)]


def test_cxl_is_read_through_the_root_complex_capped_by_the_gpu_link():
    d = Path(PROFILES[0]).parent
    a100 = Hardware.from_yaml(d / "a100-cxl.yaml")  # PCIe 4: 25 GB/s < CXL-D's 52
    h100 = Hardware.from_yaml(d / "h100-cxl.yaml")  # PCIe 5: 53.5 GB/s > CXL-D's 52
    assert path_gbps("cxl-d", a100) == 25.0
    assert path_gbps("cxl-d", h100) == 52
    assert path_gbps("dram", h100) == 53.5  # DRAM (230 GB/s) is link-bound too
    nbytes = 352 * 10**6  # one Mixtral-8x7B expert, bf16
    t = copy_time_s("cxl-d", nbytes, a100)
    assert t == pytest.approx(271e-9 + 5e-6 + nbytes / 25e9)
    assert copy_time_s("cxl-d", nbytes, h100) == pytest.approx(271e-9 + 5e-6 + nbytes / 52e9)
    assert 6.5e-3 < copy_time_s("dram", nbytes, h100) < 6.7e-3  # FACTS: ~6.1-6.4 ms per miss over PCIe 5
    assert 13.5e-3 < copy_time_s("dram", nbytes, a100) < 14.5e-3  # FACTS: 13.5-14.1 ms over PCIe 4
    assert copy_time_s("hbm", nbytes, h100) == 0.0
    # pageable host memory goes at the link's pageable rate
    assert copy_time_s("dram", nbytes, h100, pinned=False) == pytest.approx(115e-9 + 5e-6 + nbytes / 13.5e9)
    # a CXL switch on the path: the slowest hop wins
    data = copy.deepcopy(MINIMAL)
    data["links"]["switch"] = {"gbps": 20, "source": "paper: Beluga"}
    data["tiers"]["cxl-b"]["via"] = ["switch"]
    assert path_gbps("cxl-b", Hardware.from_dict(data)) == 20


def test_bandwidth_levels_off_with_copy_size():
    hw = Hardware.from_yaml(PROFILES[0].parent / "h100-cxl.yaml")
    curve = copy_gbps_by_size("dram", hw)
    sizes = sorted(curve)
    assert all(curve[a] < curve[b] for a, b in zip(sizes, sizes[1:]))
    peak = path_gbps("dram", hw)
    assert curve[4096] < 0.02 * peak  # 4 KiB: ~5 us of fixed cost dominates
    assert curve[1 * MIB] < 0.85 * peak  # 1 MiB: not yet level
    assert curve[8 * MIB] > 0.95 * peak and curve[16 * MIB] > 0.97 * peak  # levels off at 8-16 MiB
    assert copy_gbps("dram", 64 * MIB, hw) < peak


def test_shared_bandwidth_splits_devices_and_links():
    hw = Hardware.from_yaml(PROFILES[0].parent / "h100-4cxl.yaml")
    assert shared_bandwidth(hw, ["cxl-d"]) == (52,)
    assert shared_bandwidth(hw, ["cxl-d", "cxl-d"]) == pytest.approx((26, 26))  # two copies split the card
    # four devices into one GPU: the 53.5 GB/s link is the bottleneck, split fairly
    assert sum(shared_bandwidth(hw, ["cxl-a", "cxl-b", "cxl-c", "cxl-d"])) == pytest.approx(53.5)
    # a slow device keeps its own rate; the rest of the link goes to the fast one (max-min fair)
    assert shared_bandwidth(hw, ["cxl-c", "cxl-d"]) == pytest.approx((18, 35.5))
    # two GPUs, each with its own link, reading one CXL card: they split the card (FACTS: ~27 each)
    data = copy.deepcopy(hw.to_dict())
    data["gpu"]["count"] = 2
    two = Hardware.from_dict(data)
    assert shared_bandwidth(two, [("cxl-d", 0), ("cxl-d", 1)]) == pytest.approx((26, 26))
    assert shared_bandwidth(two, [("cxl-d", 0), ("dram", 1)]) == pytest.approx((52, 53.5))
    with pytest.raises(ValueError, match="GPU index 2"):
        shared_bandwidth(two, [("cxl-d", 2)])


def _write(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _mutate(fn):
    data = copy.deepcopy(MINIMAL)
    fn(data)
    return data


BAD = {
    "unknown top key": (lambda d: d.update(gpus={}), "gpus: unknown key"),
    "unknown tier key": (
        lambda d: d["tiers"]["cxl-b"].update(bandwidth=3),
        "tiers.cxl-b.bandwidth: unknown key",
    ),
    "missing number": (lambda d: d["tiers"]["cxl-b"].pop("read_gbps"), "tiers.cxl-b.read_gbps: missing"),
    "negative number": (lambda d: d["tiers"]["cxl-b"].update(latency_ns=-1), "tiers.cxl-b.latency_ns: .*-1"),
    "zero rate": (lambda d: d["links"]["pcie"].update(gbps=0), "links.pcie.gbps: expected a number > 0"),
    "string number": (lambda d: d["gpu"].update(memory_gbps="fast"), "gpu.memory_gbps: expected a number"),
    "unknown kind": (
        lambda d: d["tiers"]["cxl-b"].update(kind="optane"),
        "tiers.cxl-b.kind: unknown tier kind",
    ),
    "undefined link": (
        lambda d: d["tiers"]["cxl-b"].update(link="nvlink"),
        "tiers.cxl-b.link: link 'nvlink'",
    ),
    "undefined host link": (lambda d: d["gpu"].update(host_link="c2c"), "gpu.host_link: link 'c2c'"),
    "missing link": (lambda d: d["tiers"]["cxl-b"].pop("link"), "tiers.cxl-b.link: missing"),
    "no source": (lambda d: d["tiers"]["cxl-b"].pop("source"), "tiers.cxl-b.capacity_bytes: .*no source"),
    "source kind": (
        lambda d: d["links"]["pcie"].update(source="trust me"),
        "links.pcie.source.default: must start with",
    ),
    "fault unknown tier": (
        lambda d: d.update(faults=[{"tier": "cxl-z", "offline_at_step": 3}]),
        r"faults\[0\].tier: unknown tier 'cxl-z'",
    ),
    "fault order": (
        lambda d: d.update(faults=[{"tier": "cxl-b", "offline_at_step": 9, "online_at_step": 4}]),
        r"faults\[0\].online_at_step: 4 is not after",
    ),
    "bad numa node": (lambda d: d["tiers"]["cxl-b"].update(numa_node=-1), "tiers.cxl-b.numa_node"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_and_key(tmp_path, case):
    fn, pattern = BAD[case]
    path = _write(tmp_path, _mutate(fn))
    with pytest.raises(HardwareError, match=f"^{path}: {pattern}"):
        Hardware.from_yaml(path)


def test_duplicate_tier_names_are_an_error(tmp_path):
    text = yaml.safe_dump(MINIMAL) + ""
    text = text.replace("  hbm:\n", "  cxl-b:\n", 1)  # YAML would silently keep the last one
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(HardwareError, match=f"^{path}: .*duplicate key 'cxl-b'"):
        Hardware.from_yaml(path)


def test_library_use_and_override(tmp_path):
    lib = {"tiers": {"cxl-x": {k: v for k, v in MINIMAL["tiers"]["cxl-b"].items() if k not in ("link",)}}}
    (tmp_path / "lib.yaml").write_text(yaml.safe_dump(lib))
    data = copy.deepcopy(MINIMAL)
    data["include"] = "lib.yaml"
    data["tiers"]["cxl-b"] = {"use": "cxl-x", "link": "pcie", "capacity_bytes": 5 * 10**10}
    path = _write(tmp_path, data)
    with pytest.raises(HardwareError, match="tiers.cxl-b.capacity_bytes: .*no source"):
        Hardware.from_yaml(path)  # an overridden number needs its own source
    data["tiers"]["cxl-b"]["source"] = {"capacity_bytes": "assumption: half"}
    hw = Hardware.from_yaml(_write(tmp_path, data))
    t = hw.tier("cxl-b")
    assert t.capacity_bytes == 5 * 10**10 and t.read_gbps == 26
    assert t.source_of("capacity_bytes") == "assumption: half" and t.source_of("read_gbps") == "paper: test"
    data["tiers"]["cxl-b"]["use"] = "cxl-nope"
    with pytest.raises(HardwareError, match=r"tiers.cxl-b.use: 'cxl-nope' is not in the included library"):
        Hardware.from_yaml(_write(tmp_path, data))


def _fake_sysfs(root: Path, hmat: bool = True) -> Path:
    node = root / "devices/system/node"
    for n, cpus, kib in ((0, "0-3", 16 << 20), (1, "", 64 << 20), (2, "", 0)):
        d = node / f"node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {n} MemTotal:       {kib} kB\nNode {n} MemFree:        1 kB\n")
        (d / "distance").write_text(["10 20 20", "20 10 20", "20 20 10"][n] + "\n")
    if hmat:
        acc = node / "node1/access0/initiators"
        acc.mkdir(parents=True)
        for k, v in {
            "read_bandwidth": 30000,
            "write_bandwidth": 12000,
            "read_latency": 250,
            "write_latency": 300,
        }.items():
            (acc / k).write_text(f"{v}\n")
    for tier, nodes in ((4, "0"), (22, "1")):
        d = root / f"devices/virtual/memory_tiering/memory_tier{tier}"
        d.mkdir(parents=True)
        (d / "nodelist").write_text(nodes + "\n")
    return root


def test_detect_finds_cxl_candidate_with_hmat_numbers(tmp_path):
    hw = Hardware.detect(_fake_sysfs(tmp_path), memcpy_gbps=10.0, tflops=0.1)
    assert hw.tier_names == ("device", "dram-node0", "cxl-node1")  # node2 has no memory: skipped
    cxl = hw.tier("cxl-node1")
    assert cxl.kind == "cxl" and cxl.numa_node == 1 and cxl.capacity_bytes == 64 << 30
    assert cxl.read_gbps == pytest.approx(30000 * MIB / 1e9)
    assert cxl.write_gbps == pytest.approx(12000 * MIB / 1e9)
    assert cxl.latency_ns == 250
    assert cxl.source_of("read_gbps").startswith("detected from sysfs")
    assert "memory_tier22" in cxl.source_of("read_gbps") and "CPU-less" in cxl.source_of("read_gbps")
    dram = hw.tier("dram-node0")
    assert dram.kind == "dram" and dram.capacity_bytes == 16 << 30 and dram.read_gbps == 10.0
    assert dram.source_of("read_gbps").startswith("measurement")
    assert dram.source_of("latency_ns").startswith("assumption")  # no HMAT for node0: said so
    assert Hardware.from_dict(hw.to_dict()) == hw


def test_detect_without_hmat_labels_assumptions(tmp_path):
    hw = Hardware.detect(_fake_sysfs(tmp_path, hmat=False), memcpy_gbps=10.0, tflops=0.1)
    cxl = hw.tier("cxl-node1")
    assert cxl.source_of("read_gbps").startswith("assumption: no HMAT")
    assert cxl.latency_ns == pytest.approx(115 * 2)  # SLIT distance 20/10


def test_detect_empty_tree_is_a_clear_error(tmp_path):
    with pytest.raises(HardwareError, match="no NUMA node directories"):
        Hardware.detect(tmp_path, memcpy_gbps=1.0, tflops=0.1)


def test_detect_on_this_machine():
    hw = Hardware.detect()
    assert hw.tiers_of_kind("dram") and hw.tiers_of_kind("dram")[0].numa_node == 0
    assert hw.gpu.memory_gbps > 0 and hw.link("host-memcpy").gbps > 0
    assert hw.gpu.source_of("memory_gbps").startswith("measurement")
