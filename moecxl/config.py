"""Frozen configuration dataclasses and strict YAML loading.

One `ModelConfig` describes every family we run (Mixtral, OLMoE, Qwen3-MoE decoders and the Switch
encoder-decoder): families differ by a handful of switches, not by copied classes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DECODER_FAMILIES = ("mixtral", "olmoe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
FAMILIES = DECODER_FAMILIES + ("switch",)


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the file, key and value."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and routing semantics of one MoE model.

    Shape key: D hidden, F expert hidden, E experts, K top-k, L layers, V vocab, H heads.
    """

    family: str = "mixtral"
    vocab_size: int = 512
    hidden_size: int = 64  # D
    intermediate_size: int = 128  # F of each expert
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_heads
    num_experts: int = 8  # E
    top_k: int = 2  # K
    norm_topk_prob: bool = True  # Mixtral always renormalises; OLMoE/Qwen3 per config
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    qk_norm: str = "none"  # "none" | "head" (Qwen3: RMSNorm per head) | "full" (OLMoE: over all heads)
    clip_qkv: float | None = None  # OLMoE option
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    dense_intermediate_size: int | None = None  # Qwen3-MoE dense MLP layers
    mlp_only_layers: tuple[int, ...] = ()  # Qwen3-MoE: layers with a dense MLP instead of MoE
    decoder_sparse_step: int = 1  # Qwen3-MoE: MoE every n-th layer
    sliding_window: int | None = None
    # DeepSeek-V2 / V3: multi-head latent attention (MLA) when kv_lora_rank is set; the KV cache holds the
    # normalised latent [kv_lora_rank] and the roped shared key [qk_rope_head_dim] per token.
    q_lora_rank: int | None = None  # None: q_proj direct (V2-Lite)
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # DeepSeek's rope dims in interleaved pairs (x0, x1), (x2, x3), ...
    rope_scaling: tuple = ()  # HF rope_parameters as sorted (key, value) pairs: () default, or yarn
    # DeepSeek routing, shared experts and leading dense layers
    n_shared_experts: int = 0  # SwiGLU of n_shared_experts * intermediate_size, every token, in the core
    first_k_dense_replace: int = 0  # the first k layers are dense (dense_intermediate_size)
    moe_layer_freq: int = 1  # after those, MoE where layer % moe_layer_freq == 0
    scoring_func: str = "softmax"  # softmax | sigmoid (V3)
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    # GPT-OSS: per-layer attention kinds, attention sinks, router bias, clamped SwiGLU experts
    layer_types: tuple[str, ...] = ()  # per layer sliding_attention | full_attention; (): `sliding_window`
    layer_window: int | None = None  # window of the layers `layer_types` marks sliding_attention
    attention_sinks: bool = False  # a learned per-head logit in each softmax's denominator
    router_bias: bool = False  # router logits = x W + b
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_dtype: str | None = None  # None: `dtype`; "mxfp4": GPT-OSS experts kept as MXFP4 bytes
    # Switch (T5) encoder-decoder
    num_decoder_layers: int | None = None
    encoder_sparse_step: int = 2
    decoder_sparse_step_switch: int = 2
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    expert_capacity: int = 64
    d_kv: int | None = None
    layer_norm_epsilon: float = 1e-6
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    dtype: str = "float32"  # parameter and compute dtype: float32 | bfloat16
    name: str = ""  # free text: which checkpoint or topology this is

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_experts",
            "top_k",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{key} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"ModelConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.family != "switch" and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"ModelConfig.qk_norm must be none|head|full, got {self.qk_norm!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"ModelConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if isinstance(self.rope_scaling, dict):  # YAML / JSON give a mapping; keep it hashable
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        self._check_deepseek()
        self._check_gptoss()

    def _check_gptoss(self):
        """Per-layer attention kinds and the expert storage: each bad value names its field."""
        kinds = ("sliding_attention", "full_attention")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or any(t not in kinds for t in self.layer_types):
                raise ConfigError(
                    f"ModelConfig.layer_types must list {self.num_layers} of {', '.join(kinds)}, "
                    f"got {list(self.layer_types)!r}"
                )
            w = self.layer_window
            if "sliding_attention" in self.layer_types and (not isinstance(w, int) or w <= 0):
                raise ConfigError(f"ModelConfig.layer_window must be a positive integer, got {w!r}")
        if self.expert_dtype not in (None, "mxfp4"):
            raise ConfigError(f"ModelConfig.expert_dtype must be None or 'mxfp4', got {self.expert_dtype!r}")
        if self.expert_dtype == "mxfp4":
            if self.family != "gpt_oss":
                raise ConfigError(f"ModelConfig.expert_dtype='mxfp4' is for gpt_oss, not {self.family!r}")
            if self.hidden_size % 32 or self.intermediate_size % 32:
                raise ConfigError(
                    f"ModelConfig.expert_dtype='mxfp4' needs hidden_size ({self.hidden_size}) and "
                    f"intermediate_size ({self.intermediate_size}) multiples of 32 (the MXFP4 block)"
                )

    def layer_window_of(self, layer: int) -> int | None:
        """The attention window of `layer` when `layer_types` sets one per layer (else None)."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.layer_window
        return None

    def _check_deepseek(self):
        """MLA shapes, routing variant and rope scaling: each bad value names its field."""
        rope_type = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(
                f"ModelConfig.rope_scaling: rope type {rope_type!r} is not supported (default, yarn)"
            )
        if rope_type == "yarn" and "factor" not in dict(self.rope_scaling):
            raise ConfigError("ModelConfig.rope_scaling: yarn needs 'factor'")
        if self.kv_lora_rank is not None:
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, key)
                if not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"ModelConfig.{key} must be a positive integer for MLA, got {value!r}")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"ModelConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(
                f"ModelConfig.q_lora_rank must be None or a positive integer, got {self.q_lora_rank!r}"
            )
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"ModelConfig.scoring_func must be softmax|sigmoid, got {self.scoring_func!r}")
        methods = {"greedy": "softmax", "group_limited_greedy": "softmax", "noaux_tc": "sigmoid"}
        if self.topk_method not in methods:
            raise ConfigError(
                f"ModelConfig.topk_method must be one of {', '.join(methods)}, got {self.topk_method!r}"
            )
        if methods[self.topk_method] != self.scoring_func:
            raise ConfigError(
                f"ModelConfig.topk_method={self.topk_method!r} needs scoring_func="
                f"{methods[self.topk_method]!r}, got {self.scoring_func!r}"
            )
        if self.topk_method != "greedy":
            g, tg = self.n_groups, self.topk_group or 1
            per = self.num_experts // g if g > 0 else 0
            if g <= 0 or self.num_experts % g:
                raise ConfigError(
                    f"ModelConfig.n_group={self.n_group} must divide num_experts={self.num_experts}"
                )
            if not 0 < tg <= g or self.top_k > tg * per:
                raise ConfigError(
                    f"ModelConfig.topk_group={self.topk_group} must be in [1, n_group={g}] with "
                    f"top_k={self.top_k} <= topk_group * experts per group ({per})"
                )
            if self.topk_method == "noaux_tc" and per < 2:
                raise ConfigError(
                    f"ModelConfig.n_group={g}: noaux_tc needs >= 2 experts per group, got {per}"
                )
        for key in ("n_shared_experts", "first_k_dense_replace"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(
                    f"ModelConfig.{key} must be a non-negative integer, got {getattr(self, key)!r}"
                )
        if not isinstance(self.moe_layer_freq, int) or self.moe_layer_freq <= 0:
            raise ConfigError(
                f"ModelConfig.moe_layer_freq must be a positive integer, got {self.moe_layer_freq!r}"
            )

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2 / V3) instead of grouped-query attention."""
        return self.kv_lora_rank is not None

    @property
    def n_groups(self) -> int:
        """Expert groups of group-limited routing (1 when ungrouped)."""
        return self.n_group or 1

    @property
    def kv_elems_per_token(self) -> int:
        """KV-cache elements one token keeps per layer: K and V of every kv head, or MLA's latent and
        shared roped key."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.dim_head

    @property
    def attention_params(self) -> int:
        """Projection parameters of one attention block (biases and norms left out)."""
        D, H = self.hidden_size, self.num_heads
        if not self.is_mla:
            return 2 * D * H * self.dim_head + 2 * D * self.num_kv_heads * self.dim_head
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = D * H * qk if self.q_lora_rank is None else self.q_lora_rank * (D + H * qk)
        kv = D * self.kv_elems_per_token + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + H * self.v_head_dim * D

    @property
    def dim_head(self) -> int:
        if self.is_mla:  # query-key width of a head
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.family == "switch":
            return self.d_kv or self.hidden_size // self.num_heads
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_decoder_only(self) -> bool:
        return self.family in DECODER_FAMILIES

    def is_moe_layer(self, layer: int) -> bool:
        """Decoder families: whether decoder layer `layer` has an MoE block (Qwen3 may interleave dense)."""
        if layer in self.mlp_only_layers or layer < self.first_k_dense_replace:
            return False
        if layer % self.moe_layer_freq:
            return False
        return self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers of a decoder-only model (Switch: see model.switch)."""
        if self.family == "switch":
            # transformers: block i is sparse when i % step == 1, or every block when step == 1.
            def sparse(n, step):
                return [i for i in range(n) if step > 0 and (i % step == 1 or step == 1)]

            enc = sparse(self.num_layers, self.encoder_sparse_step)
            n_dec = self.num_decoder_layers or self.num_layers
            dec = sparse(n_dec, self.decoder_sparse_step_switch)
            return tuple(enc) + tuple(self.num_layers + i for i in dec)
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (SwiGLU: 3·D·F; Switch's ReLU MLP: 2·D·F)."""
        n_mats = 2 if self.family == "switch" else 3
        biases = 2 * self.intermediate_size + self.hidden_size if self.family == "gpt_oss" else 0
        return n_mats * self.hidden_size * self.intermediate_size + biases

    @property
    def shared_expert_params(self) -> int:
        """Parameters of one MoE layer's shared experts (DeepSeek; 0 elsewhere): resident, not routed."""
        return 3 * self.hidden_size * self.n_shared_experts * self.intermediate_size

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert as stored; MXFP4: 4-bit values and a byte of scale per 32, biases as is."""
        if self.expert_dtype == "mxfp4":
            DF = self.hidden_size * self.intermediate_size
            biases = 2 * self.intermediate_size + self.hidden_size
            return 3 * DF // 2 + 3 * DF // 32 + biases * self.dtype_bytes
        return self.expert_params * self.dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        return from_dict(cls, d, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        data = load_yaml(path)
        model = data.get("model", data)
        return from_dict(cls, model, str(path))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or non-mapping is an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type, d: dict[str, Any], source: str = "<dict>"):
    """Build a frozen dataclass strictly: unknown keys are errors that name the key and the source."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from e


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `moecxl.train` (small MoE LM training)."""

    corpus: str = "mixed"
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    eval_every: int = 200
    eval_batches: int = 8
    seed: int = 0
    vocab_size: int = 4096
    max_minutes: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # moecxl.train: schedule, clipping, logging, checkpoints, export
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    grad_clip: float = 1.0  # global-norm clipping
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    test_batches: int = 32  # per domain, at the end
    tokenizer: str | None = None  # an existing tokenizer.json; None trains one on the train split
    export_dtype: str = "float32"  # dtype of the exported HF checkpoint: float32 | bfloat16
    dense: bool = False  # train the dense baseline (E=1, K=1, F=K·F) instead of the MoE
    # "adamw", or "adafactor": T5 / Switch's recipe (updates scaled by each parameter's RMS; Shazeer &
    # Stern 2018, Raffel et al. 2020, Fedus et al. 2022). T5's tied embedding starts at std 1.0, which
    # AdamW at lr 3e-3 barely moves in a few hundred steps.
    optimizer: str = "adamw"

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"train.optimizer: unknown {self.optimizer!r}; known: adamw, adafactor")


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
