"""Stored precision (bytes per parameter), the software library and device budgets as systems get them."""

import dataclasses
import tempfile
from pathlib import Path

import pytest

from moecxl.memory.tiers import Hardware
from moecxl.sim import budget as budget_mod
from moecxl.sim.costmodel import load_shape, visit_cost, with_precision
from moecxl.sim.precision import PrecisionError, hqq_bits, precision_of
from moecxl.sim.stack import StackError, kernel_efficiency, stack_of

REPO = Path(__file__).resolve().parents[1]
MIXTRAL = REPO / "configs" / "models" / "mixtral-8x7b.yaml"
LIBRARY_GPUS = (
    "t4",
    "rtx-3060",
    "rtx-3080-laptop",
    "a100-80g-sxm",
    "rtx-a5000",
    "quadro-rtx-6000",
    "l4",
    "rtx-6000-ada",
    "rtx-a6000",
    "rtx-4090",
)


def test_hqq_bits_follow_the_packed_format():
    # 2-bit codes + 8-bit scale and zero per 16 + fp16 scale/zero of the scales per 128 groups
    assert hqq_bits(2, 16, 128) == pytest.approx(2 + 0.5 + 0.5 + 32 / 2048)
    assert precision_of("hqq2").bits_per_param == pytest.approx(3.015625)
    assert precision_of("hqq3").bits_per_param == pytest.approx(3.2 + 0.25 + 32 / (64 * 128))
    assert precision_of("hqq4").bits_per_param == pytest.approx(4 + 0.25 + 32 / (64 * 256))
    assert precision_of("hqq4-g64-s128").bits_per_param == pytest.approx(4 + 0.25 + 32 / (64 * 128))
    assert precision_of("bf16").bytes_per_param == 2 == precision_of("fp16").bytes_per_param
    assert precision_of("int8").bytes_per_param == pytest.approx(1.0, abs=0.01)
    assert precision_of("int4").bits_per_param == pytest.approx(4.25)
    # one Mixtral expert: 176.2M params -> 352 MB bf16, 66.4 MB HQQ 2-bit (what mixtral-offloading copies)
    assert precision_of("hqq2").nbytes(3 * 4096 * 14336) == pytest.approx(66.4e6, rel=2e-3)


@pytest.mark.parametrize("name", ["fp32", "hqq5", "hqq2-g12-s128", "int3", 4])
def test_unknown_precision_names_the_known_ones(name):
    with pytest.raises(PrecisionError, match="precision|HQQ"):
        precision_of(name)


def test_software_library_is_sourced_and_known():
    for kernel in ("fp16", "int8", "int4", "hqq"):
        assert 0 < kernel_efficiency(kernel) <= 1
    for name in ("hf-eager", "mixtral-offloading", "deepspeed", "moe-infinity", "fiddler", "pregated"):
        st = stack_of(name)
        assert st.layer_overhead_s >= 0 and st.workspace_of(24_000_000_000) > 0
    with pytest.raises(StackError, match="no stack 'vllm'"):
        stack_of("vllm")
    with pytest.raises(StackError, match="no kernel family"):
        kernel_efficiency("fp8")


def test_library_has_the_published_gpus_and_links():
    lib = REPO / "configs" / "hardware" / "library" / "devices.yaml"
    with tempfile.TemporaryDirectory() as d:  # a tiny profile per GPU and link (from_dict has no include)
        for gpu in LIBRARY_GPUS:
            for link in ("pcie3-x16", "pcie4-x16", "pcie5-x16"):
                p = Path(d) / f"{gpu}-{link}.yaml"
                p.write_text(
                    f"include: {lib}\ngpu: {{use: {gpu}, host_link: {link}, source: {{host_link: 'assumption: test'}}}}\n"
                    f"links: {{{link}: {link}}}\ntiers:\n  dram: {{use: dram-ddr4-2ch, link: {link}}}\n"
                )
                hw = Hardware.from_yaml(p)
                assert hw.gpu.hbm_bytes >= 12e9 and hw.gpu.memory_gbps >= 300
                assert hw.link(link).pageable_gbps <= hw.link(link).gbps
                assert all(
                    text.split(":")[0] in ("datasheet", "spec", "assumption") for _, text in hw.gpu.sources
                )


def test_precision_reaches_copies_and_reads():
    shape = load_shape(MIXTRAL)
    q = with_precision(shape, precision_of("hqq2").bytes_per_param, precision_of("hqq4").bytes_per_param)
    assert q.expert_bytes == precision_of("hqq2").nbytes(shape.expert_params)
    assert q.dense_bytes < shape.dense_bytes
    _, b16 = visit_cost(shape, 1, 2, 100, 1, False)
    _, b2 = visit_cost(q, 1, 2, 100, 1, False)
    assert b2 < b16 / 4
    slow = dataclasses.replace(q, expert_read_efficiency=0.5)
    _, b2_slow = visit_cost(slow, 1, 2, 100, 1, False)
    assert b2_slow == pytest.approx(b2 + 2 * q.expert_bytes, rel=1e-6)


def test_device_budget_subtracts_dense_kv_and_workspace():
    shape = load_shape(MIXTRAL)
    fp16 = precision_of("fp16")
    b = budget_mod.device_budget(
        shape,
        gpu_bytes=24_000_000_000,
        experts=fp16,
        dense=fp16,
        batch=1,
        context_tokens=512,
        workspace_bytes=1_500_000_000,
    )
    assert b.dense_bytes == pytest.approx(3.2e9, rel=0.05)  # attention + routers + embeddings, fp16
    assert b.kv_bytes == 32 * 2 * 8 * 128 * 2 * 512  # 64 MiB
    assert b.experts_bytes == 24_000_000_000 - b.dense_bytes - b.kv_bytes - 1_500_000_000
    k4 = budget_mod.device_budget(
        shape,
        gpu_bytes=16_000_000_000,
        experts=precision_of("hqq2"),
        dense=precision_of("hqq4"),
        batch=1,
        context_tokens=256,
        workspace_bytes=1_500_000_000,
        fixed_experts=4 * 32,
    )
    assert k4.experts_bytes == 128 * precision_of("hqq2").nbytes(shape.expert_params)


def test_a_gpu_too_small_says_by_how_much():
    shape = load_shape(MIXTRAL)
    fp16 = precision_of("fp16")
    with pytest.raises(budget_mod.BudgetError, match=r"case.yaml: hardware: .*short by 0\.\d\d GB"):
        budget_mod.device_budget(
            shape,
            gpu_bytes=4_000_000_000,
            experts=fp16,
            dense=fp16,
            batch=1,
            context_tokens=512,
            workspace_bytes=1_000_000_000,
            where="case.yaml: hardware",
        )
    with pytest.raises(budget_mod.BudgetError, match="fixed cache of 128 experts"):
        budget_mod.device_budget(
            shape,
            gpu_bytes=24_000_000_000,
            experts=fp16,
            dense=fp16,
            batch=1,
            context_tokens=512,
            workspace_bytes=1_000_000_000,
            fixed_experts=128,
        )


def test_a_profile_uses_a_library_host():
    hw = Hardware.from_yaml(REPO / "configs" / "hardware" / "published" / "quadro-rtx6000-skylake.yaml")
    assert hw.host is not None and hw.host.name == "xeon-skylake-48c" and hw.host.mem_gbps == 50
    assert hw.host.source_of("mem_gbps").startswith("measurement: efeslab/fiddler")
