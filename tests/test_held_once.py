"""A checkpoint's experts are held once: the loader packs them expert by expert, and the store takes each
packed slab as its copy on a tier it cannot (or need not) place elsewhere. Exact policies stay
bit-identical; the int8 copies are those of the whole-expert float32 reference."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import moecxl
from moecxl.generate import generate
from moecxl.memory import numa
from moecxl.memory.store import HostStore, expert_matrices, layout_of, packed_slab, quantize_int8
from moecxl.memory.tiers import Hardware
from moecxl.model import MoEDecoder
from moecxl.model.hf import save
from moecxl.runtime.engine import OffloadEngine
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A bf16 tiny model through an HF checkpoint (what `moecxl.load` builds for a real one)."""
    cfg = tiny_config(num_layers=2, num_experts=8, top_k=2, dtype="bfloat16")
    path = save(MoEDecoder(cfg, rngs=nnx.Rngs(3)), tmp_path_factory.mktemp("ckpt") / "m")
    return moecxl.load(path, experts="host")


def test_the_loader_packs_experts_into_page_aligned_slabs(loaded):
    layout = layout_of(loaded)
    for ins, out in expert_matrices(loaded):
        for e in range(loaded.cfg.num_experts):
            slab = packed_slab([w[e] for w in ins] + [out[e]], layout)
            assert slab is not None and slab.ctypes.data % 4096 == 0 and not slab.flags.writeable
            ref = np.empty(layout.numel, layout.np_dtype)
            layout.pack([w[e] for w in ins] + [out[e]], ref)
            assert np.array_equal(slab.view(np.uint16), ref.view(np.uint16))


def test_the_store_holds_the_slab_not_a_second_copy(loaded, tiny_model):
    hw = Hardware.from_yaml("configs/hardware/cpu-local.yaml")  # dram asks node 0: where the slabs are
    keys = [(m, e) for m in range(2) for e in range(8)]
    store = HostStore(loaded, hw, dict.fromkeys(keys, "dram"))
    for k in keys:
        assert np.asarray(store.source(k)).ctypes.data == store.master(k).ctypes.data
    assert store.node_report["dram"]["aliases_model_arrays"]
    # a model built in code (contiguous [E, D, F] stacks): the store packs its own copies, as before
    plain = HostStore(tiny_model, hw, {(0, 0): "dram"})
    assert "aliases_model_arrays" not in plain.node_report["dram"]
    assert np.asarray(plain.source((0, 0))).ctypes.data != plain.master((0, 0)).ctypes.data


@pytest.mark.skipif(not numa.supported() or len(numa.memory_nodes()) > 1, reason="one NUMA node here")
def test_a_tier_bound_to_another_node_gets_its_own_buffer(loaded):
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")  # CXL nodes this machine lacks: emulated
    store = HostStore(loaded, hw, {(0, 0): hw.tier_names[1]})
    report = store.node_report[hw.tier_names[1]]
    assert report["aliases_model_arrays"] and report["numa_node_used"] is None


@pytest.mark.parametrize("policy", ["lru", "moecxl", "moecxl_host", "oracle"])
def test_exact_policies_stay_bit_identical_on_held_once_experts(loaded, policy):
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
    ref = generate(loaded, prompt, max_new_tokens=4)
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    eng = OffloadEngine(
        loaded, hardware=hw, policy=policy, device_budget=0.7, emulate=False,
        trace=ref if policy == "oracle" else None,
    )  # fmt: skip
    try:
        res = generate(loaded, prompt, max_new_tokens=4, engine=eng)
    finally:
        eng.close()
    assert np.array_equal(res.tokens, ref.tokens)
    if policy != "moecxl_host":  # host-computed experts are the kernel's numbers, not the device's
        assert np.array_equal(res.logits, ref.logits)


def _quantize_whole_expert(packed, layout):
    """The previous quantize_int8: the whole expert in float32 at once (the slow reference)."""
    qs, scales = [], []
    for m in layout.unpack(packed.astype(np.float32)):
        rows = m.reshape(-1, m.shape[-1])
        s = np.maximum(np.abs(rows).max(axis=1), 1e-12) / 127.0
        qs.append(np.clip(np.rint(rows / s[:, None]), -127, 127).astype(np.int8).reshape(-1))
        scales.append(s.astype(np.float32))
    return np.concatenate(qs), np.concatenate(scales)


def test_int8_copies_in_row_blocks_equal_the_whole_expert_ones(loaded, monkeypatch):
    from moecxl.memory import store as store_mod

    monkeypatch.setattr(store_mod, "QUANT_BLOCK_ROWS", 5)  # blocks that split every matrix unevenly
    layout = layout_of(loaded)
    (ins, out) = expert_matrices(loaded)[1]
    packed = packed_slab([w[2] for w in ins] + [out[2]], layout)
    q, s = quantize_int8(packed, layout)
    q_ref, s_ref = _quantize_whole_expert(packed, layout)
    assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)


def test_a_released_tensor_reads_back_the_same(tmp_path):
    from moecxl.model.safetensors_io import TensorSource, write_safetensors

    a = np.arange(3 * 4096, dtype=np.float32).reshape(3, 4096)
    write_safetensors(tmp_path / "t.safetensors", {"a": a, "b": a[:1] + 1})
    src = TensorSource(tmp_path / "t.safetensors")
    view = src.get("a")
    assert np.array_equal(view, a)
    src.release("a")  # the pages leave this process; the file's bytes come back on the next touch
    assert np.array_equal(view, a) and np.array_equal(src.get("b"), a[:1] + 1)
    src.release("b")


def test_host_only_needs_no_slot_for_the_experts_it_never_copies(loaded):
    """A layer whose tokens need more distinct experts than the cache holds: host-only computes the
    misses where they live (no slot taken); a copying policy processes the layer in groups."""
    prompt = np.arange(1, 13, dtype=np.int32)[None] % loaded.cfg.vocab_size  # 12 tokens: ~all 8 experts
    ref = generate(loaded, prompt, max_new_tokens=3)
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    for policy in ("moecxl_host", "lru"):
        eng = OffloadEngine(loaded, hardware=hw, policy=policy, device_budget=0.25, emulate=False)
        try:
            res = generate(loaded, prompt, max_new_tokens=3, engine=eng)
            assert np.array_equal(res.tokens, ref.tokens) and eng.n_slots < 8
            if policy == "lru":  # exact: bit-identical, groups and all
                assert np.array_equal(res.logits, ref.logits)
        finally:
            eng.close()
