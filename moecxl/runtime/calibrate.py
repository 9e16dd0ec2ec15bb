"""Emulation's calibration to this machine: its measured layer time against the target's roofline
layer time (the time scale), and its host kernel's own time as the floor of the host's."""

from __future__ import annotations

from moecxl.memory import hostbench
from moecxl.memory.tiers import Hardware
from moecxl.model.bank import bank_of


def layer_compute_s(model, batch: int = 1, repeats: int = 10) -> float:
    """Measured seconds of one decode-step MoE layer (core + experts, resident) on this machine (the
    model's `ExpertBank` times it: the runtime knows no transformer)."""
    return bank_of(model).layer_compute_s(batch, repeats)


def target_layer_s(target_cfg, hw: Hardware, batch: int = 1, context: int = 512) -> float:
    """Roofline seconds of one decode MoE layer of the target model on the profile's GPU."""
    K = target_cfg.top_k
    H, Dh = target_cfg.num_heads, target_cfg.dim_head
    bpe = 2  # bf16 weights on the target
    attn_params = target_cfg.attention_params
    experts_touched = min(target_cfg.num_experts, batch * K)
    bytes_ = (
        attn_params + experts_touched * target_cfg.expert_params
    ) * bpe + batch * context * target_cfg.kv_elems_per_token * bpe
    flops = 2 * batch * (attn_params + K * target_cfg.expert_params) + 4 * batch * context * H * Dh
    return max(bytes_ / (hw.gpu.memory_gbps * 1e9), flops / (hw.gpu.bf16_tflops * 1e12))


def calibrate_time_scale(model, hw: Hardware, target_cfg) -> float:
    """Measured layer time here over the target's roofline layer time: emulated copies use this scale."""
    return layer_compute_s(model) / target_layer_s(target_cfg, hw)


def with_host_kernel(hw: Hardware, host_kernel) -> Hardware:
    """`hw` whose host takes no less than the host kernel's own time per expert (`Host.kernel`), so an
    emulated run cannot hide a slow kernel behind a fast profile. `host_kernel`: a `KernelTable`, a
    hostbench record's path, or "measure" (this machine's kernel, measured once per process); None
    leaves `hw` as it is (its profile's `host.kernel`, if any)."""
    if host_kernel is None:
        return hw
    if isinstance(host_kernel, str) and host_kernel == "measure":
        host_kernel = hostbench.kernel_table_here()
    return hw.with_host_kernel(host_kernel)
