"""The host expert kernel against the float64 loop reference, its errors, its timing table and the bench.

Shapes are tiny and chosen to reach every branch: D and F not multiples of 4 (row remainders), token
counts under and over DIRECT_MAX_TOKENS (direct and blocked nests, token remainders), matrices split
over threads (PARALLEL_MIN_BYTES lowered) and not. Compiling the loops (bf16, int8, float32) is most of
this file's time; numba's on-disk cache makes a second run fast.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import moecxl
from moecxl.memory import fullsize, hostbench, hostgemm, hostkernel, numa
from moecxl.memory.hostkernel import (
    BATCHED_MIN_TOKENS,
    HostKernelError,
    KernelTable,
    expert_forward,
    kernel_expert_s,
    supported,
)
from moecxl.memory.store import ExpertLayout, HostStore, expert_matrices, layout_of, quantize_int8
from moecxl.memory.tiers import Hardware, HardwareError
from tests.reference_moe import reference_moe

D, F = 22, 37  # not multiples of 4: the row loops' remainders run
SWIGLU = ExpertLayout(((D, F), (D, F), (F, D)), "bfloat16")
BF16_ = np.dtype(ml_dtypes.bfloat16)
shutil_usage = namedtuple("usage", "total used free")


def _expert(layout: ExpertLayout, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(layout.numel) * 0.3).astype(layout.np_dtype)


def _reference(x_ND, mats) -> np.ndarray:
    """The float64 loop reference for one expert (E = 1, K = 1, weight 1)."""
    ins, out = mats[:-1], mats[-1]
    n = len(x_ND)
    return reference_moe(
        x_ND, np.zeros((n, 1), int), np.ones((n, 1)), [w[None] for w in ins], np.asarray(out)[None]
    )


def _pinned(a: np.ndarray) -> jax.Array:
    dev = jax.devices()[0]
    kinds = {m.kind for m in dev.addressable_memories()}
    return jax.device_put(
        a,
        jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host" if "pinned_host" in kinds else None),
    )


def _close(y, ref, rtol):
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("n_tokens", [1, 3, 4, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_swiglu_matches_reference(n_tokens, threads, monkeypatch):
    if threads > 1:  # tiny matrices run on the calling thread unless told otherwise
        monkeypatch.setattr(hostkernel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(hostkernel, "n_threads", lambda: threads)
    packed = _expert(SWIGLU)
    x = np.random.default_rng(n_tokens).standard_normal((n_tokens, D)).astype(np.float32)
    y = expert_forward(x, packed, SWIGLU)
    # bf16 weights are exact in float32; what is left is float32 accumulation.
    _close(y, _reference(x, [m.astype(np.float64) for m in SWIGLU.unpack(packed)]), 1e-5)
    bits = packed.view(np.uint16)  # the same expert as its bit pattern, and as a pinned_host jax array
    np.testing.assert_array_equal(expert_forward(x, bits, SWIGLU), y)
    np.testing.assert_array_equal(expert_forward(x, _pinned(packed), SWIGLU), y)


def test_int8_with_scales_matches_dequantized_reference():
    packed = _expert(SWIGLU, seed=1)
    q, scales = quantize_int8(packed, SWIGLU)
    x = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
    mats, o, r = [], 0, 0
    for shape, n in zip(SWIGLU.shapes, SWIGLU.sizes):  # dequantise in float64: one scale per row
        rows = n // shape[-1]
        mats.append(q[o : o + n].reshape(rows, shape[-1]) * scales[r : r + rows, None].astype(np.float64))
        o, r = o + n, r + rows
    y = expert_forward(x, (q, scales), SWIGLU)
    _close(y, _reference(x, mats), 1e-5)
    # and within int8's own tolerance of the bf16 expert it came from
    _close(y, _reference(x, [m.astype(np.float64) for m in SWIGLU.unpack(packed)]), 0.05)


ALIGNED = ExpertLayout(((32, 48), (32, 48), (48, 32)), "bfloat16")  # each matrix a multiple of 64 bytes


def _aligned(a: np.ndarray) -> np.ndarray:
    """`a` flat in a 64-byte-aligned buffer, as the store and the loader hold experts."""
    out = numa.aligned_zeros(a.nbytes).view(a.dtype)
    out[:] = a.reshape(-1)
    return out


def _dequantized(q, scales, layout):
    mats, o, r = [], 0, 0
    for shape, n in zip(layout.shapes, layout.sizes):  # dequantise in float64: one scale per row
        rows = n // shape[-1]
        mats.append(q[o : o + n].reshape(rows, shape[-1]) * scales[r : r + rows, None].astype(np.float64))
        o, r = o + n, r + rows
    return mats


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
@pytest.mark.parametrize("n_tokens", [1, 9, 40])
def test_gemm_path_matches_reference(dtype, n_tokens, monkeypatch):
    """The batched path (XLA GEMMs on 16/8-bit operands with split activations) is float32-accurate
    against the float64 reference of the stored expert, in chunks too (40 tokens, 16 per call)."""
    monkeypatch.setattr(hostgemm, "MAX_ROWS", 16)
    monkeypatch.setattr(hostkernel, "GEMM_MIN_BYTES", 0)  # tiny experts take the GEMMs too under "auto"
    layout = ExpertLayout(ALIGNED.shapes, "float32" if dtype == "float32" else "bfloat16")
    packed = _aligned(_expert(layout, seed=5))
    x = np.random.default_rng(n_tokens).standard_normal((n_tokens, 32)).astype(np.float32)
    if dtype == "int8":
        q, scales = quantize_int8(packed, layout)
        stored, ref_mats, rtol = (q, scales), _dequantized(q, scales, layout), 2e-4
    else:
        stored, ref_mats, rtol = packed, [m.astype(np.float64) for m in layout.unpack(packed)], 2e-5
    y = expert_forward(x, stored, layout, path="gemm")
    _close(y, _reference(x, ref_mats), rtol)
    _close(expert_forward(x, stored, layout, path="loops"), y, rtol)
    if n_tokens >= BATCHED_MIN_TOKENS:  # "auto" takes the GEMMs from this many tokens
        np.testing.assert_array_equal(expert_forward(x, stored, layout), y)


def test_small_experts_stay_on_the_loops_under_auto():
    """A GEMM call costs ~1 ms more than the loops: experts under GEMM_MIN_BYTES keep the loops."""
    packed = _aligned(_expert(ALIGNED))
    x = np.random.default_rng(8).standard_normal((BATCHED_MIN_TOKENS * 2, 32)).astype(np.float32)
    assert packed.nbytes < hostkernel.GEMM_MIN_BYTES
    np.testing.assert_array_equal(
        expert_forward(x, packed, ALIGNED), expert_forward(x, packed, ALIGNED, path="loops")
    )


def test_gemm_path_reads_the_stored_bytes_in_place():
    w = _aligned(_expert(ALIGNED))[: 32 * 48].reshape(32, 48)
    a = hostgemm.aliased(w)
    assert a is not None and a.unsafe_buffer_pointer() == w.ctypes.data  # no copy of the expert
    raw = numa.aligned_zeros(32 * 48 * 2 + 16)
    assert hostgemm.aliased(raw[16:].view(BF16_).reshape(32, 48)) is None  # would be copied: refused


def test_gemm_path_falls_back_to_the_loops_where_it_cannot_read_in_place(monkeypatch):
    monkeypatch.setattr(hostkernel, "GEMM_MIN_BYTES", 0)
    x = np.random.default_rng(7).standard_normal((BATCHED_MIN_TOKENS + 1, D)).astype(np.float32)
    packed = _aligned(_expert(SWIGLU))  # D x F bf16 matrices: the second starts 1628 bytes in, not aligned
    np.testing.assert_array_equal(
        expert_forward(x, packed, SWIGLU), expert_forward(x, packed, SWIGLU, path="loops")
    )
    with pytest.raises(HostKernelError, match="64-byte aligned"):
        expert_forward(x, packed, SWIGLU, path="gemm")
    monkeypatch.setattr(hostgemm, "INT32_SAFE_K", 8)  # rows too long for an exact int32 sum: loops
    q, scales = quantize_int8(_aligned(_expert(ALIGNED)), ALIGNED)
    xa = x[:, :1].repeat(32, axis=1)
    np.testing.assert_array_equal(
        expert_forward(xa, (q, scales), ALIGNED), expert_forward(xa, (q, scales), ALIGNED, path="loops")
    )
    with pytest.raises(HostKernelError, match="path"):
        expert_forward(xa, (q, scales), ALIGNED, path="fast")


def test_relu_expert_matches_reference():
    layout = ExpertLayout(((D, F), (F, D)), "bfloat16")
    packed = _expert(layout, seed=3)
    x = np.random.default_rng(4).standard_normal((6, D)).astype(np.float32)
    y = expert_forward(x, packed, layout, act="relu")
    _close(y, _reference(x, [m.astype(np.float64) for m in layout.unpack(packed)]), 1e-5)


def test_reads_what_the_host_store_holds(tiny_model):
    """The store's pinned_host copies and int8 pairs go straight in: no float32 copy first."""
    hw = Hardware.from_yaml("configs/hardware/cpu-local.yaml")
    store = HostStore(tiny_model, hw, {(1, e): "dram" for e in range(2)}, low_precision=True)
    try:
        layout = store.layout
        (gate, up), down = expert_matrices(tiny_model)[1]
        x = np.random.default_rng(5).standard_normal((3, layout.shapes[0][0])).astype(np.float32)
        for e in range(2):
            ref = _reference(x, [np.asarray(w[e], np.float64) for w in (gate, up, down)])
            src = store.source((1, e))
            assert type(src).__module__.startswith("jax")  # a pinned_host array, read in place
            _close(expert_forward(x, src, layout), ref, 1e-5)
            _close(expert_forward(x, store.source((1, e), low_precision=True), layout), ref, 0.05)
    finally:
        store.close()


def test_supported_dtypes_and_clear_errors():
    assert all(supported(d) for d in ("bfloat16", ml_dtypes.bfloat16, "float32", np.int8))
    assert not any(supported(d) for d in ("float16", "int4", np.float64, "nonsense"))
    x = np.zeros((1, D), np.float32)
    half = ExpertLayout(SWIGLU.shapes, "float16")
    with pytest.raises(HostKernelError, match="float16.*not supported"):
        expert_forward(x, np.zeros(half.numel, np.float16), half)
    q, s = quantize_int8(_expert(SWIGLU), SWIGLU)
    with pytest.raises(HostKernelError, match="int8 expert needs its scales"):
        expert_forward(x, q, SWIGLU)
    with pytest.raises(HostKernelError, match=r"2 scales, layout .* has 81 rows"):
        expert_forward(x, (q, s[:2]), SWIGLU)
    with pytest.raises(HostKernelError, match="needs 2442"):
        expert_forward(x, _expert(SWIGLU)[:-1], SWIGLU)
    with pytest.raises(HostKernelError, match=r"activations of shape \(1, 5\), expected \[N, 22\]"):
        expert_forward(np.zeros((1, 5), np.float32), _expert(SWIGLU), SWIGLU)
    with pytest.raises(HostKernelError, match="act 'relu' with 3 matrices"):
        expert_forward(x, _expert(SWIGLU), SWIGLU, act="relu")


def _table(points):
    return KernelTable({("bfloat16", n): g for n, g in points.items()}, read_gbps=30.0, source="test")


def test_kernel_expert_s_interpolates_the_measured_table():
    t = _table({1: 20.0, 4: 10.0, 32: 2.0})
    nbytes = 352_000_000
    assert kernel_expert_s("bfloat16", 1, nbytes, t) == pytest.approx(nbytes / 20e9)
    assert kernel_expert_s("bfloat16", 4, nbytes, t) == pytest.approx(nbytes / 10e9)
    # halfway between 1 and 4 tokens in time per byte
    mid = (1 / 20e9 + 1 / 10e9) / 2
    assert kernel_expert_s("bfloat16", 2.5, nbytes, t) == pytest.approx(nbytes * mid)
    # beyond the largest: the last segment continued (compute grows with tokens)
    slope = (1 / 2e9 - 1 / 10e9) / 28
    assert kernel_expert_s("bfloat16", 64, nbytes, t) == pytest.approx(nbytes * (1 / 2e9 + 32 * slope))
    # time scales with the target's expert bytes; no tokens, no time
    assert kernel_expert_s("bfloat16", 4, 2 * nbytes, t) == pytest.approx(2 * nbytes / 10e9)
    assert kernel_expert_s("bfloat16", 0, nbytes, t) == 0.0
    with pytest.raises(HostKernelError, match="no measured kernel rate for dtype 'int8'"):
        kernel_expert_s("int8", 1, nbytes, t)


def test_hostbench_record_round_trips_into_a_table(tmp_path):
    rec = hostbench.run(
        d_model=16, d_ff=24, tokens=(1, 4), repeats=1, n_experts=2, read_bytes=1 << 20, peak_n=128,
        log=lambda s: None,
    )  # fmt: skip
    # beside the roofline: the same expert through the machine's float32 BLAS, per token count
    assert all(r["blas_f32_s"] > 0 and r["over_blas_f32"] > 0 for r in rec["kernel"])
    assert {(r["dtype"], r["n_tokens"]) for r in rec["kernel"]} == {
        (d, n) for d in ("bfloat16", "int8") for n in (1, 4)
    }
    assert rec["read"]["gbps"] > 0 and rec["machine"]["cores"] >= 1 and len(rec["load_avg_before"]) == 3
    path = tmp_path / "hostbench.json"
    path.write_text(__import__("json").dumps(rec))
    table = KernelTable.from_bench(path)
    assert table.gbps[("int8", 4)] == pytest.approx(rec["kernel"][3]["kernel_gbps"])
    assert table.source.startswith("measurement: moecxl.memory.hostbench")
    assert hostbench.efficiency(rec, "bfloat16", 1) == pytest.approx(rec["kernel"][0]["kernel_over_read"])
    with pytest.raises(HostKernelError, match="not a hostbench record"):
        KernelTable.from_bench({"kernel": []})


def test_profiles_carry_the_measured_kernel_efficiency():
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    eff = hw.host.kernel_efficiency
    assert 0.5 < eff <= 1.0 and hw.host.source_of("kernel_efficiency").startswith("measurement")
    assert hw.host.mem_gbps == pytest.approx(230 * eff, abs=1)  # socket read rate x measured efficiency
    assert "measured efficiency 0.81" in hw.host.source_of("mem_gbps")
    assert Hardware.from_dict(hw.to_dict()) == hw
    assert Hardware.from_yaml("configs/hardware/cpu-local.yaml").host.kernel_efficiency is None  # optional
    bad = hw.to_dict()
    bad["host"]["kernel_efficiency"] = 3.0
    with pytest.raises(HardwareError, match=r"host.kernel_efficiency: expected a ratio in \(0, 1.5\]"):
        Hardware.from_dict(bad)
    bad["host"]["kernel_efficiency"] = 0.8
    bad["host"]["source"] = {"default": "assumption: x", "kernel_eff": "measurement: y"}
    with pytest.raises(HardwareError, match="kernel_eff: not a field"):
        Hardware.from_dict(bad)


def test_detect_takes_a_host_kernel_measurement():
    kernel = {"read_gbps": 30.0, "kernel_gbps": 24.0, "gflops": 120.0, "source": "a test run"}
    hw = Hardware.detect(memcpy_gbps=10.0, tflops=0.1, host_kernel=kernel)
    assert hw.host.mem_gbps == 24.0 and hw.host.kernel_efficiency == pytest.approx(0.8)
    assert hw.host.gflops == 120.0
    assert "read rate 30.0 GB/s x efficiency 0.80" in hw.host.source_of("mem_gbps")
    assert Hardware.from_dict(hw.to_dict()) == hw
    assert Hardware.detect(memcpy_gbps=10.0, tflops=0.1).host is None  # no measurement, no host block
    with pytest.raises(HardwareError, match=r"host_kernel lacks \['gflops', 'source'\]"):
        Hardware.detect(memcpy_gbps=10.0, tflops=0.1, host_kernel={"read_gbps": 1, "kernel_gbps": 1})


# ---- the full-size checkpoint command -------------------------------------------------------------------
def test_fullsize_plan_and_a_tiny_checkpoint_that_loads(tmp_path):
    p = fullsize.plan(fullsize.config())  # the default: 2 MoE layers x 8 Mixtral-8x7B experts
    assert p.expert_bytes == 2 * 8 * 3 * 4096 * 14336 * 2 and p.expert_bytes / p.total_bytes > 0.98
    out = fullsize.make(tmp_path / "ckpt", fullsize.config(1, 2, d_model=32, d_ff=48), log=lambda s: None)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]  # the temporary directory is gone
    model = moecxl.load(out, experts="host")
    assert model.cfg.hidden_size == 32 and model.cfg.dtype == "bfloat16"
    layout = layout_of(model)
    (gate, up), down = expert_matrices(model)[0]
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    packed = np.empty(layout.numel, layout.np_dtype)
    layout.pack([gate[1], up[1], down[1]], packed)
    ref = _reference(x, [np.asarray(w[1], np.float64) for w in (gate, up, down)])
    _close(expert_forward(x, packed, layout), ref, 1e-5)
    with pytest.raises(fullsize.FullsizeError, match="exists"):
        fullsize.make(out, fullsize.config(1, 2, d_model=32, d_ff=48), log=lambda s: None)


def test_fullsize_says_how_much_disk_it_needs_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fullsize.shutil, "disk_usage", lambda p: shutil_usage(1, 1, 10**9))
    with pytest.raises(fullsize.FullsizeError, match=r"1.0 GB free, the checkpoint .* needs 5.8 GB"):
        fullsize.make(tmp_path / "ckpt", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(fullsize, "mem_available_bytes", lambda: 10**9)
    with pytest.raises(fullsize.FullsizeError, match=r"needs ~7.1 GB of host memory .* 1.0 GB is available"):
        fullsize.check_ram(fullsize.plan(fullsize.config()))


@pytest.mark.slow
def test_fullsize_full_width_expert_loads_lazily_and_computes(tmp_path):
    """One MoE layer x 2 experts at Mixtral-8x7B's width (0.7 GB): the checkpoint loads without a second
    resident copy of its experts, and the kernel agrees with float32 BLAS on the real-size expert."""
    out = fullsize.make(tmp_path / "ckpt", fullsize.config(1, 2), log=lambda s: None)
    model = moecxl.load(out, experts="host")
    layout = layout_of(model)
    assert layout.nbytes == 352_321_536
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())
    rss_bytes = int(status["VmRSS"].split()[0]) * 1024
    assert rss_bytes < 2 * 2 * layout.nbytes + 2 * 10**9  # the experts, the interpreter and JAX; no more
    (gate, up), down = expert_matrices(model)[0]
    packed = np.empty(layout.numel, layout.np_dtype)
    layout.pack([gate[0], up[0], down[0]], packed)
    x = np.random.default_rng(0).standard_normal((3, 4096)).astype(np.float32)
    g, u = x @ gate[0].astype(np.float32), x @ up[0].astype(np.float32)
    ref = (g / (1 + np.exp(-g)) * u) @ down[0].astype(np.float32)
    np.testing.assert_allclose(
        expert_forward(x, packed, layout), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max()
    )


# ---- the kernel's time as the floor of the host's (engine and simulator through runtime.gate) ----------
def test_a_profile_host_carries_kernel_rates_and_they_floor_the_host_time(tmp_path):
    import dataclasses
    import shutil

    import yaml

    from moecxl.memory.kerneltable import kernel_dtype
    from moecxl.runtime.gate import host_compute_on_tier_s

    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    slow = hw.with_host_kernel("bench/results/hostbench-cpu-2core.json")
    assert Hardware.from_dict(slow.to_dict()) == slow and hash(slow) == hash(
        Hardware.from_dict(slow.to_dict())
    )
    # a profile names a hostbench record relative to itself
    d = slow.to_dict()
    shutil.copy("bench/results/hostbench-cpu-2core.json", tmp_path / "hb.json")
    d["host"]["kernel"] = "hb.json"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d))
    assert Hardware.from_yaml(tmp_path / "p.yaml").host.kernel.gbps == slow.host.kernel.gbps
    # Mixtral's expert from the CXL device: the profile's host (186 GB/s, the device's 52) is faster than
    # this 2-core machine's kernel (24 GB/s), whose own time becomes the host's
    tier, params, nbytes = hw.tier_names[1], 3 * 4096 * 14336, 3 * 4096 * 14336 * 2
    assert kernel_dtype(nbytes, params) == "bfloat16" and kernel_dtype(params // 2, params) == "int8"
    fast_s = host_compute_on_tier_s(hw, tier, 1, params, nbytes, 4096)
    slow_s = host_compute_on_tier_s(slow, tier, 1, params, nbytes, 4096)
    own_s = kernel_expert_s("bfloat16", 1, nbytes, slow.host.kernel)
    assert fast_s < own_s < slow_s < own_s + 1e-4  # the kernel's time plus the activations' copies
    with pytest.raises(HardwareError, match="has no host"):
        dataclasses.replace(hw, host=None).with_host_kernel(slow.host.kernel)
    bad = slow.to_dict()
    bad["host"]["kernel"]["rates_gbps"] = {"bfloat16": {1: -3.0}}
    with pytest.raises(HardwareError, match=r"host\.kernel.*positive"):
        Hardware.from_dict(bad)


def test_the_engine_charges_the_host_kernel_it_is_given(tmp_path):
    """`OffloadEngine(host_kernel=...)`: host-computed experts take the kernel's own time when it is
    longer than the profile's (on a virtual clock: deterministic), and the metrics name the kernel."""
    from flax import nnx

    from moecxl.generate import generate
    from moecxl.model import MoEDecoder
    from moecxl.runtime.engine import OffloadEngine
    from tests.conftest import tiny_config

    model = MoEDecoder(tiny_config(num_layers=2, num_experts=8, top_k=2), rngs=nnx.Rngs(1))
    target = model.cfg.replace(hidden_size=4096, intermediate_size=14336, dtype="bfloat16")
    slow = KernelTable({("bfloat16", 1): 2.0}, read_gbps=30.0, source="measurement: a slow test kernel")
    host_s = {}
    for name, kernel in (("profile", None), ("kernel", slow)):
        eng = OffloadEngine(
            model, hardware="configs/hardware/h100-cxl.yaml", policy="moecxl_host", device_budget=0.5,
            target_model=target, time_scale=1.0, clock="virtual", compute_s=1e-4, host_kernel=kernel,
        )  # fmt: skip
        res = generate(model, [[3, 4]], max_new_tokens=3, engine=eng)
        eng.close()
        host_s[name] = res.metrics["host_compute_s"] / res.metrics["host_computed_tokens"]
        assert res.metrics["host_kernel"] == (kernel.source if kernel else None)
    # a Mixtral expert at 2 GB/s takes 176 ms; the profile's host reads it from CXL in ~7 ms
    assert host_s["kernel"] > 10 * host_s["profile"]
