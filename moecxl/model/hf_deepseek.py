"""DeepSeek-V2 / V3 checkpoints as transformers 5.25 writes them: config.json <-> ModelConfig and the
key rows of MLA attention, shared experts and V3's score correction bias (`hf.py` dispatches here).

Routed experts use the OLMoE-style per-expert keys (`mlp.experts.{e}.gate_proj/up_proj/down_proj`) or
the fused `mlp.experts.gate_up_proj` / `down_proj`, which `hf.py` reads for every family.
"""

from __future__ import annotations

from typing import Any

from moecxl.config import ConfigError, ModelConfig
from moecxl.model.safetensors_io import CheckpointError, TensorSource

MODEL_TYPES = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}  # HF model_type -> family
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# transformers 5.25 config defaults (configuration_deepseek_v2/v3.py), where config.json omits a key.
_COMMON = dict(
    hidden_act="silu",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    pad_token_id=None,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    moe_layer_freq=1,
)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(
        _COMMON,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        first_k_dense_replace=0,
        q_lora_rank=1536,
        n_group=None,
        topk_group=None,
        n_routed_experts=64,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        num_experts_per_tok=None,
        moe_intermediate_size=1407,
        rope_interleave=True,
        mlp_bias=False,
    ),
    "deepseek_v3": dict(
        _COMMON,
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        first_k_dense_replace=3,
        q_lora_rank=1536,
        n_group=8,
        topk_group=4,
        n_routed_experts=256,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        num_experts_per_tok=8,
        rope_interleave=True,
    ),
}
# The routing each version's transformers code runs, whatever config.json says (the keys are checked).
_ROUTING = {
    "deepseek_v2": ("softmax", ("greedy", "group_limited_greedy")),
    "deepseek_v3": ("sigmoid", ("noaux_tc",)),
}


def _rope(d: dict, g: dict, source: str) -> tuple[float, dict]:
    """(rope_theta, yarn parameters or {}) from `rope_parameters` (transformers 5) or `rope_scaling` (Hub)."""
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params = d.get(field) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: {field} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise CheckpointError(
            f"{source}: {field}: rope type {rope_type!r} is not supported (default, yarn); {field}={params!r}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: {field}.partial_rotary_factor={params['partial_rotary_factor']!r}")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, {}
    if params.get("factor") is None:
        raise CheckpointError(f"{source}: {field}: yarn needs 'factor', got {params!r}")
    yarn = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "rope_type")}
    yarn.setdefault("original_max_position_embeddings", g["max_position_embeddings"])
    return theta, {"rope_type": "yarn", **yarn}


def config_from_hf(d: dict, source: str, dtype: str) -> ModelConfig:
    """A DeepSeek-V2 / V3 `config.json` dict as a ModelConfig (transformers 5.25's semantics)."""
    family = MODEL_TYPES[d["model_type"]]
    g = dict(HF_DEFAULTS[family])
    g.update({k: v for k, v in d.items() if v is not None or k in ("q_lora_rank", "n_group", "topk_group")})
    if g["hidden_act"] != "silu":
        raise CheckpointError(f"{source}: hidden_act={g['hidden_act']!r} is not supported (SwiGLU with silu)")
    if g.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=True is not supported")
    if g["moe_layer_freq"] != 1:  # transformers 5.25 ignores it: every layer past the dense ones is MoE
        raise CheckpointError(f"{source}: moe_layer_freq={g['moe_layer_freq']!r} is not supported (1 only)")
    scoring, methods = _ROUTING[family]
    if g["topk_method"] not in methods:
        raise CheckpointError(
            f"{source}: topk_method={g['topk_method']!r} is not supported for {family}: {methods}"
        )
    if g.get("scoring_func", scoring) != scoring:
        raise CheckpointError(
            f"{source}: scoring_func={g['scoring_func']!r}: {family} scores with {scoring!r}"
        )
    if family == "deepseek_v2" and g["norm_topk_prob"]:
        # DeepSeek's own code renormalises; transformers 5.25's DeepseekV2 router ignores the key.
        raise CheckpointError(
            f"{source}: norm_topk_prob=True is ambiguous for deepseek_v2 (transformers ignores it)"
        )
    if family == "deepseek_v2" and d.get("rope_interleave") is False:
        raise CheckpointError(
            f"{source}: rope_interleave=False: transformers' deepseek_v2 always interleaves"
        )
    n_experts = d.get(
        "n_routed_experts", d.get("num_local_experts", d.get("num_experts", g["n_routed_experts"]))
    )
    theta, yarn = _rope(d, g, source)
    eos = g.get("eos_token_id")
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=g["vocab_size"],
        hidden_size=g["hidden_size"],
        num_layers=g["num_hidden_layers"],
        num_heads=g["num_attention_heads"],
        num_kv_heads=g["num_attention_heads"],  # MLA: every head reads the shared latent
        num_experts=n_experts,
        top_k=g["num_experts_per_tok"],
        intermediate_size=g["moe_intermediate_size"],
        dense_intermediate_size=g["intermediate_size"],
        norm_topk_prob=bool(g["norm_topk_prob"]),
        rope_theta=theta,
        rope_scaling=yarn,
        rms_norm_eps=float(g["rms_norm_eps"]),
        max_position_embeddings=g["max_position_embeddings"],
        attention_bias=bool(g["attention_bias"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        q_lora_rank=g["q_lora_rank"],
        kv_lora_rank=g["kv_lora_rank"],
        qk_nope_head_dim=g["qk_nope_head_dim"],
        qk_rope_head_dim=g["qk_rope_head_dim"],
        v_head_dim=g["v_head_dim"],
        rope_interleave=bool(g["rope_interleave"]),
        n_shared_experts=g["n_shared_experts"],
        first_k_dense_replace=g["first_k_dense_replace"],
        scoring_func=scoring,
        topk_method=g["topk_method"],
        n_group=g["n_group"],
        topk_group=g["topk_group"],
        routed_scaling_factor=float(g["routed_scaling_factor"]),
        pad_token_id=g["pad_token_id"] if g["pad_token_id"] is not None else 0,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        bos_token_id=g.get("bos_token_id"),
        name=str(d.get("_name_or_path", "")),
        dtype=dtype,
    )
    try:
        return ModelConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers 5.25 `config.json` of a DeepSeek ModelConfig; raises if HF cannot express it."""
    fam = cfg.family
    scoring, methods = _ROUTING[fam]
    problems = []
    if cfg.topk_method not in methods:
        problems.append(f"topk_method={cfg.topk_method!r}")
    if cfg.moe_layer_freq != 1 or cfg.mlp_only_layers or cfg.decoder_sparse_step != 1:
        problems.append("MoE layers other than every layer from first_k_dense_replace on")
    if fam == "deepseek_v2" and (cfg.norm_topk_prob or not cfg.rope_interleave):
        problems.append("norm_topk_prob=True or rope_interleave=False")
    if cfg.qk_norm != "none" or cfg.clip_qkv is not None or cfg.sliding_window is not None:
        problems.append("qk_norm, clip_qkv or sliding_window")
    if problems:
        raise CheckpointError(f"config_to_hf: HF {fam} cannot express {', '.join(problems)}")
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
    d: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[fam]],
        model_type=fam,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size,
        moe_intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        n_routed_experts=cfg.num_experts,
        n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.top_k,
        first_k_dense_replace=cfg.first_k_dense_replace,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        topk_method=cfg.topk_method,
        scoring_func=scoring,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=cfg.attention_bias,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos,
        dtype=cfg.dtype,
        use_cache=True,
    )
    if fam == "deepseek_v3":
        d["rope_interleave"] = cfg.rope_interleave
    return d


# ---- key maps: (HF key under model.layers.{i}., our path under layers.{i}., transpose?) --------------


def _linear(hf: str, ours: str, bias: bool) -> list[tuple[str, str, bool]]:
    rows = [(f"self_attn.{hf}.weight", f"core.attn.{ours}.w", True)]
    return rows + ([(f"self_attn.{hf}.bias", f"core.attn.{ours}.b", False)] if bias else [])


def attention_rows(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """MLA's tensors of one layer."""
    b = cfg.attention_bias
    if cfg.q_lora_rank is None:
        rows = _linear("q_proj", "q_proj", False)
    else:
        rows = _linear("q_a_proj", "q_a_proj", b) + _linear("q_b_proj", "q_b_proj", False)
        rows.append(("self_attn.q_a_layernorm.weight", "core.attn.q_a_norm.scale_D", False))
    rows += _linear("kv_a_proj_with_mqa", "kv_a_proj", b) + _linear("kv_b_proj", "kv_b_proj", False)
    rows.append(("self_attn.kv_a_layernorm.weight", "core.attn.kv_a_norm.scale_D", False))
    return rows + _linear("o_proj", "o_proj", b)


def moe_rows(cfg: ModelConfig, prefix: str) -> list[tuple[str, str, bool]]:
    """An MoE layer's shared experts and score correction bias (none for other families)."""
    rows = []
    if cfg.n_shared_experts:
        rows += [
            (f"{prefix}.shared_experts.{p}_proj.weight", f"core.shared.w_{p}_{ax}", True)
            for p, ax in (("gate", "DF"), ("up", "DF"), ("down", "FD"))
        ]
    if cfg.topk_method == "noaux_tc":
        rows.append((f"{prefix}.gate.e_score_correction_bias", "core.router_bias_E", False))
    return rows


def check_shared(cfg: ModelConfig, src: TensorSource, prefixes: dict[int, str]) -> None:
    """Every MoE layer of a model with shared experts has their tensors: name the file and key if not."""
    for i, prefix in prefixes.items():
        for hf_key, _, _ in moe_rows(cfg, prefix):
            key = f"model.layers.{i}.{hf_key}"
            if key not in src:
                router = f"model.layers.{i}.{prefix}.gate.weight"
                where = src.file_of(router) if router in src else src.path
                raise CheckpointError(
                    f"{where}: missing tensor {key!r} (config.json: n_shared_experts={cfg.n_shared_experts}, "
                    f"topk_method={cfg.topk_method!r})"
                )
