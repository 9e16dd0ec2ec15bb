"""Cost model of the simulator: roofline compute per MoE layer visit and expert bytes, from model shapes.

Compute of one visit is max(FLOPs / bf16 peak, bytes / HBM bandwidth) on the profile's GPU: weights read
once per visit (attention, router, each distinct expert touched), the KV cache read (decode) or written
(prefill), FLOPs for every token (dense matmuls, each token's K experts, attention over its context).
Copies are not here: they go through `moecxl.memory.transfer.LinkClock`, the clock the engine's emulated
links use. Units: bytes, FLOPs, seconds. Weights are bf16 on the target (2 bytes) unless the shape says
otherwise: `expert_bytes_per_param` and `dense_bytes_per_param` carry a stored precision
(`moecxl.sim.precision`, e.g. HQQ 2-bit experts at 0.377 bytes per parameter) into every copy and every
weight read; embeddings, LM head and KV cache stay 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from moecxl.config import ConfigError, ModelConfig, load_yaml
from moecxl.memory.tiers import GPU
from moecxl.model.expert_format import expert_format
from moecxl.model.family import family_of

WEIGHT_BYTES = 2  # bf16 weights and KV cache on the target


class CostModelError(ValueError):
    """A target model or cost input is wrong; the message names the value."""


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a target model (L MoE layers, E experts, K top-k, widths)."""

    name: str
    family: str
    L: int
    E: int
    K: int
    D: int
    F: int
    H: int  # query heads
    G: int  # kv heads
    Dh: int
    V: int
    expert_params: int
    blocks_per_moe_layer: float  # transformer blocks per MoE layer (Switch: 2, every other block sparse)
    dense_ffn_params: int  # params of a dense FFN block between sparse ones (Switch), else 0
    shape_only: bool = False
    expert_bytes_per_param: float = WEIGHT_BYTES  # stored precision of the experts (copies and reads)
    dense_bytes_per_param: float = WEIGHT_BYTES  # of the non-expert linear layers (embeddings stay 16-bit)
    # Share of the GPU's memory bandwidth the kernels reading each part reach at decode (a quantised
    # kernel that dequantises on the fly reads its bytes slower than a bf16 GEMV): visit reads cost
    # bytes / share. 1.0: the datasheet roofline (the default, as before).
    expert_read_efficiency: float = 1.0
    dense_read_efficiency: float = 1.0
    # Attention other than grouped-query (DeepSeek's MLA): its projection parameters and the KV-cache
    # elements one token keeps per block (latent + roped shared key). None: from H, G, Dh.
    mla_attn_params: int | None = None
    mla_kv_elems: int | None = None
    shared_expert_params: int = 0  # DeepSeek's shared experts of one MoE layer: resident, run every token
    # Whether the host expert kernel computes these experts (`ExpertFormat.host_kernel`: SwiGLU / ReLU
    # without biases or clamps); the engine refuses host-computing policies otherwise, and so does the simulator.
    host_kernel: bool = True

    @property
    def kv_elems_per_token(self) -> int:
        """KV-cache elements one token keeps in one block: K and V of G heads, or MLA's compressed row."""
        return self.mla_kv_elems if self.mla_kv_elems is not None else 2 * self.G * self.Dh

    @property
    def expert_bytes(self) -> int:
        return int(-(-self.expert_params * self.expert_bytes_per_param // 1))

    @property
    def dense_linear_params(self) -> float:
        """Non-expert linear parameters of one MoE layer's blocks: attention, router, dense FFNs."""
        nb = self.blocks_per_moe_layer
        dense_ffn = (nb - 1) * self.dense_ffn_params + self.shared_expert_params
        return nb * self.attn_params + self.D * self.E + dense_ffn

    @property
    def attn_params(self) -> int:
        """q, k, v, o projections of one block (MLA: its low-rank projections)."""
        if self.mla_attn_params is not None:
            return self.mla_attn_params
        return 2 * self.D * self.H * self.Dh + 2 * self.D * self.G * self.Dh

    @property
    def total_expert_bytes(self) -> int:
        return self.L * self.E * self.expert_bytes

    @property
    def dense_bytes(self) -> int:
        """Non-expert weights (attention, routers, dense FFNs, embeddings): always resident on the GPU."""
        linear = self.L * self.dense_linear_params * self.dense_bytes_per_param
        return int(linear + 2 * self.V * self.D * WEIGHT_BYTES)


def with_precision(
    shape: ModelShape,
    expert_bytes_per_param: float,
    dense_bytes_per_param: float,
    expert_read_efficiency: float = 1.0,
    dense_read_efficiency: float = 1.0,
) -> ModelShape:
    """The same model with its experts and dense linear layers stored at other precisions, read by
    kernels reaching the given shares of the GPU's memory bandwidth."""
    if expert_bytes_per_param <= 0 or dense_bytes_per_param <= 0:
        raise CostModelError(
            f"bytes per parameter must be > 0, got experts {expert_bytes_per_param}, dense {dense_bytes_per_param}"
        )
    for name, eff in (("expert", expert_read_efficiency), ("dense", dense_read_efficiency)):
        if not 0 < eff <= 1:
            raise CostModelError(f"{name}_read_efficiency must be in (0, 1], got {eff}")
    return replace(
        shape,
        expert_bytes_per_param=expert_bytes_per_param,
        dense_bytes_per_param=dense_bytes_per_param,
        expert_read_efficiency=expert_read_efficiency,
        dense_read_efficiency=dense_read_efficiency,
    )


def shape_of(cfg: ModelConfig, shape_only: bool = False) -> ModelShape:
    """The cost-model view of a ModelConfig (its MoE layers, expert and attention widths)."""
    L = cfg.num_moe_layers
    family = family_of(cfg)
    return ModelShape(
        name=cfg.name or cfg.family,
        family=cfg.family,
        L=L,
        E=cfg.num_experts,
        K=cfg.top_k,
        D=cfg.hidden_size,
        F=cfg.intermediate_size,
        H=cfg.num_heads,
        G=cfg.num_kv_heads,
        Dh=cfg.dim_head,
        V=cfg.vocab_size,
        expert_params=cfg.expert_params,
        blocks_per_moe_layer=family.num_blocks(cfg) / L,
        dense_ffn_params=family.dense_ffn_params(cfg),
        shape_only=shape_only,
        mla_attn_params=cfg.attention_params if cfg.is_mla else None,
        mla_kv_elems=cfg.kv_elems_per_token if cfg.is_mla else None,
        shared_expert_params=cfg.shared_expert_params,
        # MXFP4 experts (GPT-OSS): their stored bytes, 4-bit values with their scales and 16-bit biases
        expert_bytes_per_param=cfg.expert_bytes / cfg.expert_params if cfg.expert_dtype else WEIGHT_BYTES,
        host_kernel=expert_format(cfg).host_kernel,
    )


def load_shape(path: str | Path) -> ModelShape:
    """A target model from configs/models/*.yaml (shape-only files carry `shape_only: true`)."""
    path = Path(path)
    try:
        data = load_yaml(path)
        cfg = ModelConfig.from_dict(data.get("model", data), str(path))
    except ConfigError as e:
        raise CostModelError(str(e)) from e
    return shape_of(cfg, shape_only=bool(data.get("shape_only", False)))


def visit_cost(
    shape: ModelShape, n_tokens: int, n_distinct: int, context: int, batch: int, prefill: bool
) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one MoE layer visit.

    `n_tokens`: tokens through the layer (B*T prefill, B decode); `n_distinct`: distinct experts touched;
    `context`: keys each query attends to (decode: cache length; prefill: prompt length, causal).
    """
    if n_tokens < 1 or batch < 1 or context < 1:
        raise CostModelError(
            f"visit_cost: n_tokens={n_tokens}, batch={batch}, context={context} must be >= 1"
        )
    nb = shape.blocks_per_moe_layer
    dense_params = shape.dense_linear_params
    w_bytes = (
        dense_params * shape.dense_bytes_per_param / shape.dense_read_efficiency
        + n_distinct * shape.expert_params * shape.expert_bytes_per_param / shape.expert_read_efficiency
    )
    kv_row = shape.kv_elems_per_token * WEIGHT_BYTES  # one token's K and V in one block
    if prefill:
        kv_bytes = nb * n_tokens * kv_row  # written once; flash attention keeps scores on chip
        attn_flops = nb * 2 * n_tokens * context * shape.H * shape.Dh  # causal: half of 4*T*T*H*Dh
    else:
        kv_bytes = nb * batch * context * kv_row
        attn_flops = nb * 4 * n_tokens * context * shape.H * shape.Dh
    flops = 2 * n_tokens * (dense_params + shape.K * shape.expert_params) + attn_flops
    return float(flops), float(w_bytes + kv_bytes)


def roofline_s(flops: float, nbytes: float, gpu: GPU) -> float:
    """The larger of compute time at bf16 peak and memory time at HBM bandwidth."""
    return max(flops / (gpu.bf16_tflops * 1e12), nbytes / (gpu.memory_gbps * 1e9))


def visit_s(
    shape: ModelShape,
    gpu: GPU,
    n_tokens: int,
    n_distinct: int,
    context: int,
    batch: int,
    prefill: bool,
) -> float:
    """Roofline seconds of one MoE layer visit on `gpu`."""
    return roofline_s(*visit_cost(shape, n_tokens, n_distinct, context, batch, prefill), gpu)


def group_s(shape: ModelShape, gpu: GPU, v, groups) -> list[float]:
    """Roofline seconds of each group of a visit processed in groups (`DecisionCore.groups`): one pass
    per group over its experts' weights and routed tokens; the first also runs attention and the dense
    part. Their sum is at least the one-pass `visit_s`."""
    expert_flops = 2.0 * shape.expert_params  # per (token, expert) pair
    expert_bytes = shape.expert_params * shape.expert_bytes_per_param / shape.expert_read_efficiency
    out = []
    for i, g in enumerate(groups):
        routed = float(sum(g.tokens_per_expert))
        if i == 0:
            flops, nbytes = visit_cost(
                shape, v.n_tokens, len(g.experts), v.context, v.batch, v.phase == "prefill"
            )
            flops += (routed - v.n_tokens * shape.K) * expert_flops  # its routed pairs, not the layer's
        else:
            flops, nbytes = routed * expert_flops, len(g.experts) * expert_bytes
        out.append(roofline_s(flops, nbytes, gpu))
    return out


def head_s(shape: ModelShape, gpu: GPU, batch: int) -> float:
    """The LM head for one new token per sequence (V x D weights read, 2*B*V*D FLOPs)."""
    return roofline_s(2.0 * batch * shape.V * shape.D, float(shape.V * shape.D * WEIGHT_BYTES), gpu)
