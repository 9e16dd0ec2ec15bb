"""GPU memory as the real systems get it: what is left for experts after the dense weights, the KV cache
and the stack's workspace, or what a fixed per-layer cache takes.

    experts_bytes = GPU memory - dense weights (at their precision) - KV cache (batch x context) - workspace

A system that fixes its cache (mixtral-offloading: k experts per layer) takes k x L experts instead, and
the same three must still fit beside them. A GPU that cannot hold them raises `BudgetError` naming the
shortfall. Embeddings and the LM head stay 16-bit in every system modelled here (HQQ, int8 and int4
quantise the linear layers of the blocks only); the KV cache is 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.model.family import family_of
from moecxl.sim.costmodel import ModelShape
from moecxl.sim.precision import Precision

KV_BYTES = 2  # fp16/bf16 KV cache
EMBED_BYTES = 2  # embeddings and LM head kept 16-bit
GB = 1e9


class BudgetError(ValueError):
    """The GPU cannot hold what the system needs; the message says by how much."""


def dense_linear_params(shape: ModelShape) -> int:
    """Parameters of the non-expert linear layers (attention, routers, dense FFN blocks)."""
    nb = shape.blocks_per_moe_layer
    per_moe = nb * shape.attn_params + shape.D * shape.E + (nb - 1) * shape.dense_ffn_params
    return int(shape.L * per_moe)


def embedding_params(shape: ModelShape) -> int:
    """Input embeddings and LM head (tied in Switch, the encoder-decoder family: counted once)."""
    return shape.V * shape.D * (1 if family_of(shape.family).encoder_decoder else 2)


def dense_bytes(shape: ModelShape, dense: Precision) -> int:
    """Resident non-expert weights: linear layers at `dense`, embeddings and head at 16 bits."""
    return dense.nbytes(dense_linear_params(shape)) + embedding_params(shape) * EMBED_BYTES


def expert_bytes(shape: ModelShape, experts: Precision) -> int:
    """One expert as stored and copied at `experts` precision."""
    return experts.nbytes(shape.expert_params)


def kv_cache_bytes(shape: ModelShape, batch: int, context_tokens: int) -> int:
    """K and V of every attention block for `batch` sequences of `context_tokens` (16-bit)."""
    blocks = round(shape.L * shape.blocks_per_moe_layer)
    return int(blocks * 2 * shape.G * shape.Dh * KV_BYTES * batch * context_tokens)


@dataclass(frozen=True)
class Budget:
    """Where a GPU's memory goes, in bytes; `experts_bytes` is what the expert cache may use."""

    gpu_bytes: int
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    experts_bytes: int
    fixed_experts: int | None = None  # a system's own cache size (experts), when it fixes one

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def device_budget(
    shape: ModelShape,
    *,
    gpu_bytes: int,
    experts: Precision,
    dense: Precision,
    batch: int,
    context_tokens: int,
    workspace_bytes: int,
    fixed_experts: int | None = None,
    where: str = "",
) -> Budget:
    """The expert budget a system gets on a GPU of `gpu_bytes` (see the module doc). `fixed_experts`:
    the system's own cache size in experts (k x L); `where` prefixes errors (file and field)."""
    d = dense_bytes(shape, dense)
    kv = kv_cache_bytes(shape, batch, context_tokens)
    left = gpu_bytes - d - kv - workspace_bytes
    pre = f"{where}: " if where else ""
    parts = (
        f"GPU {gpu_bytes / GB:.2f} GB - dense weights {d / GB:.2f} GB ({dense.name}) - KV cache "
        f"{kv / GB:.2f} GB (batch {batch} x {context_tokens} tokens) - workspace {workspace_bytes / GB:.2f} GB"
    )
    if left <= 0:
        raise BudgetError(
            f"{pre}the GPU cannot hold the dense weights, KV cache and workspace: {parts} = "
            f"{left / GB:.2f} GB, short by {-left / GB:.2f} GB"
        )
    eb = expert_bytes(shape, experts)
    if fixed_experts is not None:
        need = fixed_experts * eb
        if need > left:
            raise BudgetError(
                f"{pre}a fixed cache of {fixed_experts} experts x {eb / GB:.3f} GB ({experts.name}) = "
                f"{need / GB:.2f} GB does not fit in {parts} = {left / GB:.2f} GB: short by {(need - left) / GB:.2f} GB"
            )
        left = need
    return Budget(gpu_bytes, d, kv, workspace_bytes, int(left), fixed_experts)
