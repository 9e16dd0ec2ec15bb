"""Emulation's time scale: this machine's measured layer time against the target's roofline layer time."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from moecxl.memory.tiers import Hardware
from moecxl.model.steps import _core_jit, _experts_jit, split_flat


def layer_compute_s(model, batch: int = 1, repeats: int = 10) -> float:
    """Measured seconds of one decode-step MoE layer (core + experts, resident) on this machine."""

    cfg = model.cfg
    li = next(i for i, layer in enumerate(model.layers) if getattr(layer, "experts", None) is not None)
    key, leaves = split_flat(model.layers[li].core)
    core = _core_jit(*key)
    S = 64
    dt = model.embed_VD[...].dtype
    x = jnp.zeros((batch, 1, cfg.hidden_size), dt) + 0.1
    pos = np.zeros((batch, 1), np.int32)
    mask = np.ones((batch, 1, S), bool)
    ins, out = model.layers[li].experts.arrays()
    slot_E = np.arange(cfg.num_experts, dtype=np.int32)
    times = []
    for _ in range(repeats + 2):
        kv = tuple(jnp.zeros((batch, S, cfg.num_kv_heads, cfg.dim_head), dt) for _ in range(2))
        t0 = time.perf_counter()
        co, kv = core(leaves, x, pos, mask, kv, np.int32(0))
        y = _experts_jit(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E)
        y.block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def target_layer_s(target_cfg, hw: Hardware, batch: int = 1, context: int = 512) -> float:
    """Roofline seconds of one decode MoE layer of the target model on the profile's GPU."""
    D, K = target_cfg.hidden_size, target_cfg.top_k
    H, G, Dh = target_cfg.num_heads, target_cfg.num_kv_heads, target_cfg.dim_head
    bpe = 2  # bf16 weights on the target
    attn_params = D * (H * Dh) * 2 + D * (G * Dh) * 2
    experts_touched = min(target_cfg.num_experts, batch * K)
    bytes_ = (
        attn_params + experts_touched * target_cfg.expert_params
    ) * bpe + 2 * batch * context * G * Dh * bpe
    flops = 2 * batch * (attn_params + K * target_cfg.expert_params) + 4 * batch * context * H * Dh
    return max(bytes_ / (hw.gpu.memory_gbps * 1e9), flops / (hw.gpu.bf16_tflops * 1e12))


def calibrate_time_scale(model, hw: Hardware, target_cfg) -> float:
    """Measured layer time here over the target's roofline layer time: emulated copies use this scale."""
    return layer_compute_s(model) / target_layer_s(target_cfg, hw)
