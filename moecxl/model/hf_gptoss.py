"""GPT-OSS Hugging Face checkpoints <-> moecxl models (`hf.load` / `hf.save` dispatch here).

Two expert layouts load: transformers 5.25's float one (`experts.gate_up_proj` [E, D, 2F] with gate and
up interleaved in columns, `gate_up_proj_bias` [E, 2F], `down_proj` [E, F, D], `down_proj_bias` [E, D])
and the released checkpoints' MXFP4 one (`gate_up_proj_blocks` [E, 2F, D/32, 16] uint8, `_scales`
[E, 2F, D/32] uint8 E8M0; `down_proj_blocks` [E, D, F/32, 16], `_scales` [E, D, F/32]; see transformers'
integrations/mxfp4.py), kept as those bytes (`expert_format` gptoss_mxfp4) unless `dequantize=True`.
`save` writes the float layout (MXFP4 experts dequantised), which transformers loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from moecxl.config import ConfigError, ModelConfig
from moecxl.model import hf
from moecxl.model.expert_format import MXFP4_BLOCK, bytes_of, expert_format, mxfp4_dequantize_np
from moecxl.model.safetensors_io import CheckpointError, TensorSource, write_checkpoint, write_text_atomic

ARCHITECTURE = "GptOssForCausalLM"
# transformers 5.25 GptOssConfig defaults, used where config.json omits a key
DEFAULTS: dict[str, Any] = dict(
    num_hidden_layers=36,
    num_local_experts=128,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    num_experts_per_tok=4,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
    attention_bias=True,
    rope_theta=150000.0,
)
DEFAULT_ROPE = dict(
    rope_type="yarn",
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "beta_fast", "beta_slow", "truncate"}
ROPE_KEYS |= {"original_max_position_embeddings", "attention_factor"}


def _rope(d: dict, source: str) -> tuple[float, dict]:
    """(rope_theta, rope scaling) of config.json: default or YaRN; anything else names the field."""
    field = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = d.get(field)
    params = dict(DEFAULT_ROPE) if params is None else params
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: {field} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise CheckpointError(
            f"{source}: {field}.rope_type={rope_type!r} is not supported for gpt_oss (default, yarn)"
        )
    unknown = sorted(set(params) - ROPE_KEYS)
    if unknown or params.get("mscale") or params.get("mscale_all_dim"):
        raise CheckpointError(f"{source}: {field} keys {unknown} are not supported for gpt_oss")
    theta = float(params.get("rope_theta", d.get("rope_theta", DEFAULTS["rope_theta"])))
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")} | {"rope_type": rope_type}
    return theta, scaling if rope_type == "yarn" else {}


def config_from_hf(d: dict, source: str = hf.HF_CONFIG, dtype: str | None = None) -> ModelConfig:
    """A gpt_oss `config.json` as a ModelConfig (transformers 5.25 semantics)."""
    g = dict(DEFAULTS)
    g.update({k: v for k, v in d.items() if v is not None})
    L = g["num_hidden_layers"]
    layer_types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)
    ]
    theta, scaling = _rope(d, source)
    quant = d.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "mxfp4":
        raise CheckpointError(
            f"{source}: quantization_config.quant_method={quant.get('quant_method')!r} is not supported "
            "(mxfp4 only)"
        )
    kw: dict[str, Any] = dict(
        family="gpt_oss",
        vocab_size=g["vocab_size"],
        hidden_size=g["hidden_size"],
        intermediate_size=g["intermediate_size"],
        num_layers=L,
        num_heads=g["num_attention_heads"],
        num_kv_heads=g["num_key_value_heads"],
        head_dim=g["head_dim"],
        num_experts=g["num_local_experts"],
        top_k=g["num_experts_per_tok"],
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(g["rms_norm_eps"]),
        max_position_embeddings=g["max_position_embeddings"],
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        attention_bias=bool(g["attention_bias"]),
        layer_types=tuple(layer_types),
        layer_window=g["sliding_window"],
        attention_sinks=True,
        router_bias=True,
        swiglu_alpha=float(g["swiglu_alpha"]),
        swiglu_limit=float(g["swiglu_limit"]),
        pad_token_id=g.get("pad_token_id", 0),
        eos_token_id=hf._token_id(g.get("eos_token_id")),
        bos_token_id=g.get("bos_token_id"),
        dtype=dtype or hf._checkpoint_dtype(d),
        expert_dtype="mxfp4" if quant else None,
        name=str(d.get("_name_or_path", "")),
    )
    try:
        return ModelConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers 5.25 gpt_oss `config.json` (float experts: what `save` writes)."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    rope = {"rope_type": "default"} | dict(cfg.rope_scaling) | {"rope_theta": cfg.rope_theta}
    return dict(
        architectures=[ARCHITECTURE],
        model_type="gpt_oss",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.dim_head,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        layer_types=list(cfg.layer_types) or ["full_attention"] * cfg.num_layers,
        sliding_window=cfg.layer_window,
        rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=cfg.attention_bias,
        swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos,
        dtype=cfg.dtype,
        use_cache=True,
    )


def dense_key_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(HF key, our param path, transpose) of every tensor but the experts."""
    rows = [("model.embed_tokens.weight", "embed_VD", False), ("model.norm.weight", "norm.scale_D", False)]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", "lm_head_DV", True))
    per = [
        ("input_layernorm.weight", "core.input_norm.scale_D", False),
        ("post_attention_layernorm.weight", "core.post_norm.scale_D", False),
        ("self_attn.sinks", "core.attn.sinks_H", False),
        ("mlp.router.weight", "core.router_DE", True),
        ("mlp.router.bias", "core.router_logit_bias_E", False),
    ]
    per += [(f"self_attn.{p}_proj.weight", f"core.attn.{p}_proj.w", True) for p in "qkvo"]
    if cfg.attention_bias:
        per += [(f"self_attn.{p}_proj.bias", f"core.attn.{p}_proj.b", False) for p in "qkvo"]
    for i in range(cfg.num_layers):
        rows += [(f"model.layers.{i}.{h}", f"layers.{i}.{o}", t) for h, o, t in per]
    return rows


def _need(src: TensorSource, key: str, want: tuple[int, ...], what: str = "tensor") -> np.ndarray:
    """`key` of shape `want`, or an error naming the file (or directory), the key and both shapes."""
    if key not in src:
        raise CheckpointError(f"{src.path}: missing {what} {key!r} (expected shape {tuple(want)})")
    got = src.shape(key)
    if got != tuple(want):
        raise CheckpointError(f"{src.file_of(key)}: {what} {key!r}: expected shape {tuple(want)}, got {got}")
    return src.get(key)


def _expert_arrays(cfg: ModelConfig, src: TensorSource, base: str, mxfp4: bool) -> tuple[list, list[str]]:
    """One layer's experts in the format's order (packed expert by expert) and the HF keys read."""
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    fmt = expert_format(cfg)
    target = hf.NP_DTYPES[cfg.dtype]
    out = hf.packed_expert_arrays(E, fmt.shapes, fmt.arrays[0].dtype if mxfp4 else target)
    bias_gu = _need(src, f"{base}.gate_up_proj_bias", (E, 2 * F)).astype(target)
    bias_d = _need(src, f"{base}.down_proj_bias", (E, D)).astype(target)
    if not mxfp4:
        keys = [f"{base}.{k}" for k in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")]
        out[0][...] = _need(src, keys[0], (E, D, 2 * F))
        out[1][...], out[2][...] = bias_gu, bias_d
        out[3][...] = _need(src, keys[2], (E, F, D))
        return out, keys
    keys = []
    for proj, rows, cols, (i_b, i_s) in (("gate_up_proj", 2 * F, D, (0, 1)), ("down_proj", D, F, (4, 5))):
        blocks, scales = f"{base}.{proj}_blocks", f"{base}.{proj}_scales"
        out[i_b][...] = _need(src, blocks, (E, rows, cols // MXFP4_BLOCK, 16), "MXFP4 blocks")
        out[i_s][...] = _need(src, scales, (E, rows, cols // MXFP4_BLOCK), "MXFP4 scales")
        keys += [blocks, scales]
    out[2][...], out[3][...] = bytes_of(bias_gu), bytes_of(bias_d)
    return out, keys + [f"{base}.gate_up_proj_bias", f"{base}.down_proj_bias"]


def hf_arrays(cfg: ModelConfig, src: TensorSource) -> dict[str, np.ndarray]:
    """Every parameter of `cfg` from a gpt_oss checkpoint, in our layout (MXFP4 kept as bytes when
    `cfg.expert_dtype` says so, else dequantised to `cfg.dtype`)."""
    target = hf.NP_DTYPES[cfg.dtype]
    shapes = hf.param_shapes(cfg)
    arrays, used = {}, set()
    for key, ours, transpose in dense_key_map(cfg):
        want = shapes[ours]
        a = _need(src, key, want[::-1] if transpose else want)
        arrays[ours] = (a.T if transpose else a).astype(target)
        used.add(key)
    fmt = expert_format(cfg)
    for i in range(cfg.num_layers):
        base = f"model.layers.{i}.mlp.experts"
        in_file = f"{base}.gate_up_proj_blocks" in src or f"{base}.down_proj_blocks" in src
        if cfg.expert_dtype == "mxfp4":
            mats, keys = _expert_arrays(cfg, src, base, mxfp4=True)
        elif in_file:  # MXFP4 in the file, float wanted: dequantise (exact) into the float layout
            mats, keys = _dequantized(cfg, src, base)
        else:
            mats, keys = _expert_arrays(cfg, src, base, mxfp4=False)
        for a, m in zip(fmt.arrays, mats):
            arrays[f"layers.{i}.experts.{a.name}"] = m
        used |= set(keys)
        for k in keys:
            src.release(k)
    extra = sorted(set(src.keys()) - used)
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{src.file_of(extra[0])}: unexpected tensor {extra[0]!r} for gpt_oss ({len(extra)} in all: {extra[:4]})"
        )
    return arrays


def _dequantized(cfg: ModelConfig, src: TensorSource, base: str) -> tuple[list, list[str]]:
    q = cfg.replace(expert_dtype="mxfp4")
    mats, keys = _expert_arrays(q, src, base, mxfp4=True)
    return float_experts(cfg, mats), keys


def float_experts(cfg: ModelConfig, mats) -> list[np.ndarray]:
    """MXFP4 expert arrays (gptoss_mxfp4 order, [E, ...] each) as the float format's, in `cfg.dtype`."""
    target = hf.NP_DTYPES[cfg.dtype]
    gu_b, gu_s, b_gu, b_d, d_b, d_s = (np.asarray(m) for m in mats)
    gate_up = mxfp4_dequantize_np(gu_b, gu_s, target).transpose(0, 2, 1)  # [E, D, 2F]
    down = mxfp4_dequantize_np(d_b, d_s, target).transpose(0, 2, 1)  # [E, F, D]
    return [gate_up, b_gu.view(target)[..., 0], b_d.view(target)[..., 0], down]


def load_gptoss(path: Path, d: dict, dtype: str | None, experts: str, dequantize: bool = False):
    """Build a gpt_oss MoEDecoder from an HF directory (float or MXFP4 experts)."""
    cfg = config_from_hf(d, str(path / hf.HF_CONFIG), dtype)
    cfg = cfg.replace(name=cfg.name or path.name)
    with TensorSource(path) as src:
        if cfg.expert_dtype == "mxfp4" and not any(k.endswith("_blocks") for k in src.keys()):  # noqa: SIM118
            cfg = cfg.replace(expert_dtype=None)  # a quantization_config over float experts
        if dequantize:
            cfg = cfg.replace(expert_dtype=None)
        return hf.build_model(cfg, hf_arrays(cfg, src), experts, str(path))


def to_hf_tensors(model) -> dict[str, np.ndarray]:
    """HF tensors of a gpt_oss model, float experts (MXFP4 ones dequantised exactly to `cfg.dtype`)."""
    cfg: ModelConfig = model.cfg
    ours = hf.model_arrays(model)
    out = {}
    for key, name, transpose in dense_key_map(cfg):
        a = ours[name]
        out[key] = np.ascontiguousarray(a.T if transpose else a)
    fmt = expert_format(cfg)
    for i in range(cfg.num_layers):
        mats = [ours[f"layers.{i}.experts.{a.name}"] for a in fmt.arrays]
        if cfg.expert_dtype == "mxfp4":
            mats = float_experts(cfg, mats)
        base = f"model.layers.{i}.mlp.experts"
        for name, m in zip(("gate_up_proj", "gate_up_proj_bias", "down_proj_bias", "down_proj"), mats):
            out[f"{base}.{name}"] = np.ascontiguousarray(m)
    return out


def save_gptoss(model, path: Path, max_shard_bytes: int | None = hf.DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` as an HF gpt_oss directory (float experts), atomically."""
    cfg: ModelConfig = model.cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config = config_to_hf(cfg)
        write_text_atomic(tmp / hf.HF_CONFIG, json.dumps(config, indent=2, sort_keys=True))
        write_text_atomic(tmp / hf.GENERATION_CONFIG, json.dumps(hf._generation_config(cfg), indent=2))
        write_checkpoint(tmp, to_hf_tensors(model), {"format": "pt"}, max_shard_bytes)
        hf._commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


hf.register_family("gpt_oss", "gpt_oss", load_gptoss, save_gptoss)
