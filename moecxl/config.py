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

DECODER_FAMILIES = ("mixtral", "olmoe", "qwen3_moe")
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

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def dim_head(self) -> int:
        if self.family == "switch":
            return self.d_kv or self.hidden_size // self.num_heads
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_decoder_only(self) -> bool:
        return self.family in DECODER_FAMILIES

    def is_moe_layer(self, layer: int) -> bool:
        """Decoder families: whether decoder layer `layer` has an MoE block (Qwen3 may interleave dense)."""
        if layer in self.mlp_only_layers:
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
        return n_mats * self.hidden_size * self.intermediate_size

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
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
