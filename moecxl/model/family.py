"""What differs between model families, as one frozen descriptor each: the layer order a forward visits,
which transformer blocks are sparse, where the routers sit, the experts' shape.

Code outside `moecxl.model` asks `family_of(cfg)` these questions instead of testing `family == "switch"`.
A decoder-only family (Mixtral, OLMoE, Qwen3-MoE) is one stack of blocks that prefill and decode both walk;
Switch is an encoder (prefill) and a decoder (decode) stack, every other block sparse. The trace's layer
axis (L) lists the sparse blocks in stack order: a decoder's, or Switch's encoder's then decoder's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from moecxl.config import FAMILIES, ModelConfig

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")


class FamilyError(ValueError):
    """An unknown model family or phase; the message names it and the known ones."""


def sparse_layers(num_layers: int, step: int) -> tuple[int, ...]:
    """Indices of the sparse (MoE) blocks of a Switch stack: transformers' `i % step == 1 or step == 1`."""
    if step <= 0:
        return ()
    return tuple(i for i in range(num_layers) if i % step == 1 or step == 1)


@dataclass(frozen=True)
class FamilyDescriptor:
    """The structure of one model family; methods answer for a given `ModelConfig` of that family."""

    name: str
    # An encoder stack that prefill runs and a decoder stack that decode runs (T5 conventions: the
    # decoder starts from `decoder_start_token_id` = pad; training splits a row into a prefix and targets).
    encoder_decoder: bool
    # Experts a token is routed to when the family fixes it (Switch: top-1, whatever `top_k` says);
    # None: the config's `top_k`.
    fixed_top_k: int | None
    # Rotary positions bounded by `max_position_embeddings` (decoders); T5's relative buckets have no bound.
    bounded_positions: bool
    # A sparse block's experts: SwiGLU (w1, w3 in; w2 out: 3 matrices) or T5's ReLU MLP (wi, wo: 2).
    gated_experts: bool
    # Where each sparse block keeps its router [D, E]: `block.core.<router_attr>`, applied to the block's
    # MLP input (post-attention RMSNorm of a decoder layer; T5 `ff_norm` of a Switch block).
    router_attr: str = "router_DE"
    # Router logits computed in float32 whatever the model's dtype (DeepSeek: transformers keeps the gate
    # weight in float32 and upcasts the hidden state).
    float32_router: bool = False

    # ---- per config -----------------------------------------------------------------------------------
    def routed_k(self, cfg: ModelConfig) -> int:
        """K of the traces and the predictor: experts each token is routed to."""
        return self.fixed_top_k if self.fixed_top_k is not None else cfg.top_k

    def stack_sizes(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Transformer blocks per stack, in trace order (Switch: encoder, decoder)."""
        if self.encoder_decoder:
            return (cfg.num_layers, cfg.num_decoder_layers or cfg.num_layers)
        return (cfg.num_layers,)

    def num_blocks(self, cfg: ModelConfig) -> int:
        """Transformer blocks of the whole model, sparse and dense."""
        return sum(self.stack_sizes(cfg))

    def sparse_blocks(self, cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
        """Per stack, the indices of its sparse (MoE) blocks: every block for Mixtral, every other for
        Switch (step 2), every `decoder_sparse_step`-th outside `mlp_only_layers` for Qwen3-MoE."""
        if self.encoder_decoder:
            n_enc, n_dec = self.stack_sizes(cfg)
            return (
                sparse_layers(n_enc, cfg.encoder_sparse_step),
                sparse_layers(n_dec, cfg.decoder_sparse_step_switch),
            )
        return (tuple(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)),)

    def phase_layers(self, cfg: ModelConfig, phase: Phase) -> tuple[int, ...]:
        """Positions on the trace's layer axis (0..L-1) that a forward of `phase` visits, in visiting order:
        every layer for a decoder; Switch's prefill the encoder's sparse blocks, its decode the decoder's."""
        if phase not in PHASES:
            raise FamilyError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
        per_stack = [len(s) for s in self.sparse_blocks(cfg)]
        L = sum(per_stack)
        if not self.encoder_decoder:
            return tuple(range(L))
        n_enc = per_stack[0]
        return tuple(range(n_enc)) if phase == "prefill" else tuple(range(n_enc, L))

    def stack_ranges(self, cfg: ModelConfig) -> tuple[range, ...]:
        """Per stack, its sparse blocks' positions on the trace's layer axis: (range(L),) for a decoder;
        Switch's encoder layers, then its decoder's."""
        ends = list(accumulate(len(s) for s in self.sparse_blocks(cfg)))
        return tuple(range(a, b) for a, b in zip([0, *ends[:-1]], ends))

    def layer_names(self, cfg: ModelConfig) -> list[str]:
        """Names of the trace's layers in order: decoder 'layer.i'; Switch 'encoder.i' then 'decoder.i'
        (i the block index in its stack)."""
        if not self.encoder_decoder:
            return [f"layer.{i}" for i in self.sparse_blocks(cfg)[0]]
        enc, dec = self.sparse_blocks(cfg)
        return [f"encoder.{i}" for i in enc] + [f"decoder.{i}" for i in dec]

    def dense_ffn_params(self, cfg: ModelConfig) -> int:
        """Parameters of the dense FFN in a non-sparse block between sparse ones, as the cost model counts
        them: Switch's ReLU MLP (2·D·F); 0 for decoder families (Qwen3-MoE's dense layers not counted)."""
        return 2 * cfg.hidden_size * cfg.intermediate_size if self.encoder_decoder else 0

    # ---- per model object -----------------------------------------------------------------------------
    def stacks(self, model) -> tuple[Sequence, ...]:
        """The model's block lists in trace order: (model.layers,) or Switch's (encoder, decoder) blocks."""
        if self.encoder_decoder:
            return (model.encoder.layers, model.decoder.layers)
        return (model.layers,)

    def moe_blocks(self, model) -> list:
        """The model's sparse blocks in trace order (one per trace layer), each with its router at
        `block.core.router_DE` and its experts at `block.experts`."""
        return [b for stack in self.stacks(model) for b in stack if self.router(b) is not None]

    def router(self, block):
        """A block's router parameter [D, E], or None for a dense block."""
        return getattr(block.core, self.router_attr, None)


_DECODER = dict(encoder_decoder=False, fixed_top_k=None, bounded_positions=True, gated_experts=True)
DESCRIPTORS: dict[str, FamilyDescriptor] = {
    "mixtral": FamilyDescriptor("mixtral", **_DECODER),
    "olmoe": FamilyDescriptor("olmoe", **_DECODER),
    "qwen3_moe": FamilyDescriptor("qwen3_moe", **_DECODER),
    # DeepSeek: MLA attention, shared experts in the layer core (resident, outside `block.experts`)
    "deepseek_v2": FamilyDescriptor("deepseek_v2", **_DECODER, float32_router=True),
    "deepseek_v3": FamilyDescriptor("deepseek_v3", **_DECODER, float32_router=True),
    # GPT-OSS: attention sinks, per-layer sliding windows, biased router and experts (model.expert_format)
    "gpt_oss": FamilyDescriptor("gpt_oss", **_DECODER),
    "switch": FamilyDescriptor(
        "switch", encoder_decoder=True, fixed_top_k=1, bounded_positions=False, gated_experts=False
    ),
}
assert set(DESCRIPTORS) == set(FAMILIES), "moecxl.config.FAMILIES and the descriptors disagree"


def family_of(cfg_or_name: ModelConfig | str) -> FamilyDescriptor:
    """The descriptor of a `ModelConfig`'s family, or of a family name; unknown names raise `FamilyError`."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else getattr(cfg_or_name, "family", cfg_or_name)
    try:
        return DESCRIPTORS[name]
    except (KeyError, TypeError):
        raise FamilyError(f"unknown model family {name!r}; known: {', '.join(DESCRIPTORS)}") from None
