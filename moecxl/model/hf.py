"""Hugging Face checkpoints <-> moecxl models (Mixtral, OLMoE, Qwen3-MoE, DeepSeek-V2/V3 with their
config and attention keys in `hf_deepseek`; Switch is dispatched).

`load(path)` reads a directory holding either an HF checkpoint (`config.json` + safetensors, single
file or sharded with an index) or our own (`moecxl.json` + safetensors of our parameter names). Tensors
come lazily from memmaps (`safetensors_io.TensorSource`): experts stay host-side numpy until the NNX
module is built, or for good with `experts="host"`. `save(model, path)` writes what
`transformers.AutoModelForCausalLM.from_pretrained` loads, atomically (temp dir, then rename).

Torch `Linear` weights are [out, in]; ours are [in, out]. Experts are ours [E, D, F] / [E, F, D]; HF
has two layouts: per-expert keys (what `save_pretrained` writes by default and what the Hub holds) and
the fused layout of transformers 5 (`experts.gate_up_proj` [E, 2F, D], gate = first F rows;
`experts.down_proj` [E, D, F]). Both load; `save(..., expert_layout=)` writes either.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from moecxl.config import DECODER_FAMILIES, ConfigError, ModelConfig
from moecxl.model import hf_deepseek
from moecxl.model.safetensors_io import (
    CheckpointError,
    TensorSource,
    write_checkpoint,
    write_text_atomic,
)

HF_CONFIG = "config.json"
OUR_CONFIG = "moecxl.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_TYPES = {"mixtral": "mixtral", "olmoe": "olmoe", "qwen3_moe": "qwen3_moe", **hf_deepseek.MODEL_TYPES}
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # HF's default shard size (5 GB)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints carry

# transformers 5.24 config defaults per family (configuration_*.py), used where config.json omits a key.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        sliding_window=None,
        num_experts_per_tok=2,
        num_local_experts=8,
        rope_theta=1e6,
    ),
    "olmoe": dict(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=None,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=50279,
        tie_word_embeddings=False,
        attention_bias=False,
        clip_qkv=None,
        num_experts_per_tok=8,
        num_experts=64,
        norm_topk_prob=False,
        rope_theta=10000.0,
    ),
    "qwen3_moe": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=4096,
        decoder_sparse_step=1,
        moe_intermediate_size=768,
        num_experts_per_tok=8,
        num_experts=128,
        norm_topk_prob=False,
        mlp_only_layers=None,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        rope_theta=10000.0,
    ),
}


# ---- config.json <-> ModelConfig ------------------------------------------------------------------


def _rope_theta(d: dict, family: str, source: str) -> float:
    """The default-RoPE base from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x).

    Scaled RoPE variants (linear, dynamic, yarn, llama3, longrope, ...) are not implemented: reject them.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type rope_parameters {params!r} are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported (only 'default' RoPE); "
            f"rope_parameters={params!r}"
        )
    for key in ("partial_rotary_factor",):
        value = params.get(key, d.get(key))
        if value not in (None, 1, 1.0):
            raise CheckpointError(f"{source}: {key}={value!r} is not supported")
    theta = params.get("rope_theta", d.get("rope_theta", HF_DEFAULTS[family]["rope_theta"]))
    return float(theta)


def _token_id(value):
    return tuple(value) if isinstance(value, list) else value


def config_from_hf(d: dict, source: str = HF_CONFIG, dtype: str | None = None) -> ModelConfig:
    """Map an HF `config.json` dict to a ModelConfig, following transformers 5.24's semantics."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: unknown model_type {model_type!r}; "
            f"supported: {sorted(MODEL_TYPES) + ['switch_transformers']}"
        )
    family = MODEL_TYPES[model_type]
    if family in hf_deepseek.MODEL_TYPES.values():
        return hf_deepseek.config_from_hf(d, source, dtype or _checkpoint_dtype(d))
    g = dict(HF_DEFAULTS[family])
    g.update({k: v for k, v in d.items() if not (v is None and k in ("num_key_value_heads",))})
    # transformers' attribute_map: num_experts <-> num_local_experts
    if family == "mixtral":
        n_experts = d.get("num_local_experts", d.get("num_experts", g["num_local_experts"]))
    else:
        n_experts = d.get("num_experts", d.get("num_local_experts", g["num_experts"]))
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    heads = g["num_attention_heads"]
    kv_heads = g["num_key_value_heads"] or heads
    head_dim = d.get("head_dim") or None
    if head_dim == g["hidden_size"] // heads:
        head_dim = None
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=g["vocab_size"],
        hidden_size=g["hidden_size"],
        num_layers=g["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_experts=n_experts,
        top_k=g["num_experts_per_tok"],
        rope_theta=_rope_theta(d, family, source),
        rms_norm_eps=float(g["rms_norm_eps"]),
        max_position_embeddings=g["max_position_embeddings"],
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
        pad_token_id=g.get("pad_token_id"),
        eos_token_id=_token_id(g.get("eos_token_id")),
        bos_token_id=g.get("bos_token_id"),
        name=str(d.get("_name_or_path", "")),
    )
    if family == "mixtral":
        kw.update(
            intermediate_size=g["intermediate_size"],
            norm_topk_prob=True,
            qk_norm="none",
            sliding_window=g.get("sliding_window"),
        )
    elif family == "olmoe":
        kw.update(
            intermediate_size=g["intermediate_size"],
            norm_topk_prob=bool(g["norm_topk_prob"]),
            qk_norm="full",
            clip_qkv=g.get("clip_qkv"),
            attention_bias=bool(g["attention_bias"]),
        )
    else:
        kw.update(
            intermediate_size=g["moe_intermediate_size"],
            dense_intermediate_size=g["intermediate_size"],
            norm_topk_prob=bool(g["norm_topk_prob"]),
            qk_norm="head",
            attention_bias=bool(g["attention_bias"]),
            mlp_only_layers=tuple(g["mlp_only_layers"] or ()),
            decoder_sparse_step=int(g["decoder_sparse_step"]),
            sliding_window=g["sliding_window"] if g["use_sliding_window"] else None,
        )
    kw["dtype"] = dtype or _checkpoint_dtype(d)
    if kw["pad_token_id"] is None:
        kw["pad_token_id"] = 0
    try:
        return ModelConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def _checkpoint_dtype(d: dict) -> str:
    """bfloat16 checkpoints load as bfloat16; everything else (float32, float16) as float32."""
    name = str(d.get("dtype") or d.get("torch_dtype") or "float32")
    return "bfloat16" if name.replace("torch.", "") == "bfloat16" else "float32"


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers 5.24 `config.json` of a decoder ModelConfig; raises if HF cannot express it."""
    fam = cfg.family
    if fam not in DECODER_FAMILIES:
        raise CheckpointError(f"config_to_hf: family {fam!r} is not a decoder family")
    if fam in hf_deepseek.ARCHITECTURES:
        return hf_deepseek.config_to_hf(cfg)
    want_qk = {"mixtral": "none", "olmoe": "full", "qwen3_moe": "head"}[fam]
    problems = []
    if cfg.qk_norm != want_qk:
        problems.append(f"qk_norm={cfg.qk_norm!r} (HF {fam} has {want_qk!r})")
    if fam != "olmoe" and cfg.clip_qkv is not None:
        problems.append(f"clip_qkv={cfg.clip_qkv}")
    if fam == "mixtral" and (cfg.attention_bias or not cfg.norm_topk_prob):
        problems.append("attention_bias or norm_topk_prob=False")
    if fam == "olmoe" and cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window}")
    if fam != "qwen3_moe" and cfg.moe_layers != tuple(range(cfg.num_layers)):
        problems.append(f"dense layers {sorted(set(range(cfg.num_layers)) - set(cfg.moe_layers))}")
    if problems:
        raise CheckpointError(f"config_to_hf: HF {fam} cannot express {', '.join(problems)}")
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    d: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[fam]],
        model_type=fam,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.dim_head,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta,  # transformers 4.x reads this one
        num_experts_per_tok=cfg.top_k,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos,
        dtype=cfg.dtype,
        use_cache=True,
    )
    if fam == "mixtral":
        d.update(
            intermediate_size=cfg.intermediate_size,
            num_local_experts=cfg.num_experts,
            sliding_window=cfg.sliding_window,
        )
    elif fam == "olmoe":
        d.update(
            intermediate_size=cfg.intermediate_size,
            num_experts=cfg.num_experts,
            clip_qkv=cfg.clip_qkv,
            attention_bias=cfg.attention_bias,
            norm_topk_prob=cfg.norm_topk_prob,
        )
    else:
        d.update(
            intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size,
            moe_intermediate_size=cfg.intermediate_size,
            num_experts=cfg.num_experts,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
            norm_topk_prob=cfg.norm_topk_prob,
            attention_bias=cfg.attention_bias,
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
        )
    return d


# ---- key maps -------------------------------------------------------------------------------------

# (name in HF, name in moecxl, transpose?) for the non-expert tensors of layer i; `{m}` is the MoE prefix.
_ATTN = [(f"self_attn.{p}_proj.weight", f"core.attn.{p}_proj.w", True) for p in "qkvo"]
_ATTN_BIAS = [(f"self_attn.{p}_proj.bias", f"core.attn.{p}_proj.b", False) for p in "qkvo"]
_QK_NORM = [
    ("self_attn.q_norm.weight", "core.attn.q_norm.scale_D", False),
    ("self_attn.k_norm.weight", "core.attn.k_norm.scale_D", False),
]
_NORMS = [
    ("input_layernorm.weight", "core.input_norm.scale_D", False),
    ("post_attention_layernorm.weight", "core.post_norm.scale_D", False),
]
_DENSE = [
    ("mlp.gate_proj.weight", "core.mlp.w_gate_DF", True),
    ("mlp.up_proj.weight", "core.mlp.w_up_DF", True),
    ("mlp.down_proj.weight", "core.mlp.w_down_FD", True),
]
# per-expert matrix names: (gate, up, down)
_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v2": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
}
_MOE_PREFIXES = {
    "mixtral": ("block_sparse_moe", "mlp"),
    "olmoe": ("mlp",),
    "qwen3_moe": ("mlp",),
    "deepseek_v2": ("mlp",),
    "deepseek_v3": ("mlp",),
}


def dense_key_map(cfg: ModelConfig, moe_prefix: Callable[[int], str]) -> list[tuple[str, str, bool]]:
    """(HF key, our param path, transpose) for every tensor except the experts."""
    rows = [("model.embed_tokens.weight", "embed_VD", False), ("model.norm.weight", "norm.scale_D", False)]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", "lm_head_DV", True))
    for i in range(cfg.num_layers):
        if cfg.is_mla:
            attn = hf_deepseek.attention_rows(cfg)
        else:
            attn = (
                _ATTN
                + (_ATTN_BIAS if cfg.attention_bias else [])
                + (_QK_NORM if cfg.qk_norm != "none" else [])
            )
        per = _NORMS + attn
        if cfg.is_moe_layer(i):
            per = per + [(f"{moe_prefix(i)}.gate.weight", "core.router_DE", True)]
            per = per + hf_deepseek.moe_rows(cfg, moe_prefix(i))
        else:
            per = per + _DENSE
        rows += [(f"model.layers.{i}.{h}", f"layers.{i}.{o}", t) for h, o, t in per]
    return rows


# ---- building the NNX module ----------------------------------------------------------------------


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array, `align`-byte aligned (so it enters pinned_host without a copy)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + n].view(dtype).reshape(shape)


PAGE_BYTES = 4096


def packed_expert_arrays(E: int, shapes, dtype) -> list[np.ndarray]:
    """One MoE layer's expert matrices ([E, *shape] each, in `shapes`' order), laid out expert by
    expert: expert e's matrices sit one after the other in one page-aligned slab. Each array is a
    strided view; the offload store (memory.store) takes a slab as an expert's packed copy without
    copying it, so the checkpoint's experts are held once."""
    dtype = np.dtype(dtype)
    sizes = [int(np.prod(s)) * dtype.itemsize for s in shapes]
    slab = -(-sum(sizes) // PAGE_BYTES) * PAGE_BYTES
    buf = _aligned_empty((E * slab,), np.uint8, align=PAGE_BYTES)
    out, o = [], 0
    for s, n in zip(shapes, sizes):
        strides = [dtype.itemsize]
        for d in reversed(s[1:]):
            strides.insert(0, strides[0] * d)
        out.append(np.ndarray((E, *s), dtype, buffer=buf, offset=o, strides=(slab, *strides)))
        o += n
    return out


def _abstract(cfg: ModelConfig):
    from moecxl.model.decoder import MoEDecoder

    return nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0)))


def _param_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter paths and shapes for `cfg`, without allocating anything."""
    _, st = nnx.split(_abstract(cfg))
    return {_param_path(p): tuple(v.shape) for p, v in nnx.to_flat_state(st)}


def build_model(cfg: ModelConfig, arrays: dict[str, np.ndarray], experts: str = "device", source: str = ""):
    """An NNX MoEDecoder whose parameters are `arrays` (our paths). Expert Params stay numpy with
    `experts="host"`; everything else becomes jax arrays."""
    from moecxl.model.moe import ExpertParam

    if experts not in ("device", "host"):
        raise ValueError(f"experts must be 'device' or 'host', got {experts!r}")
    gd, st = nnx.split(_abstract(cfg))
    flat = nnx.to_flat_state(st)
    want = {_param_path(p) for p, _ in flat}
    extra = sorted(set(arrays) - want)
    missing = sorted(want - set(arrays))
    if missing or extra:
        raise CheckpointError(f"{source}: missing parameters {missing[:5]}, unexpected {extra[:5]}")
    for path, var in flat:
        name = _param_path(path)
        a = arrays[name]
        if tuple(a.shape) != tuple(var.shape):
            raise CheckpointError(
                f"{source}: parameter {name!r}: expected shape {tuple(var.shape)}, got {a.shape}"
            )
        if a.dtype != var.dtype:
            a = a.astype(var.dtype)
        host = experts == "host" and isinstance(var, ExpertParam)
        var.set_value(np.asarray(a) if host else jnp.asarray(a))
    return nnx.merge(gd, st)


def model_arrays(model) -> dict[str, np.ndarray]:
    """Our parameter paths -> host numpy arrays."""
    _, st = nnx.split(model)
    return {_param_path(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(st)}


# ---- loading --------------------------------------------------------------------------------------


def _resolve_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in NP_DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return name


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# Families whose checkpoint layout lives in its own module, which builds on this one's helpers and
# registers itself here on import (moecxl.model imports it), so the dependency runs one way.
_FAMILY_LOADERS: dict[str, Any] = {}  # HF model_type -> load(path, hf_cfg, dtype, experts, dequantize)
_FAMILY_SAVERS: dict[str, Any] = {}  # our family -> save(model, path, max_shard_bytes)


def register_family(model_type: str, family: str, load_fn, save_fn) -> None:
    """Route `load` of an HF `model_type` and `save` (format "hf") of our `family` to their module."""
    _FAMILY_LOADERS[model_type] = load_fn
    _FAMILY_SAVERS[family] = save_fn


def load(path: str | os.PathLike, dtype=None, experts: str = "device", dequantize: bool = False):
    """Load an HF (Mixtral / OLMoE / Qwen3-MoE / DeepSeek / Switch) or moecxl checkpoint directory as an NNX model.

    `dtype`: None keeps the checkpoint's (bfloat16 stays bfloat16, others load as float32).
    `experts="host"`: expert weights stay numpy host arrays (64-byte aligned) for the offload runtime.
    `dequantize`: GPT-OSS MXFP4 experts load as `dtype` floats instead of their stored bytes.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    dtype = _resolve_dtype(dtype)
    if (path / OUR_CONFIG).is_file():
        return _load_ours(path, dtype, experts)
    if not (path / HF_CONFIG).is_file():
        raise CheckpointError(f"{path}: neither {HF_CONFIG} (Hugging Face) nor {OUR_CONFIG} (moecxl) found")
    hf_cfg = _read_json(path / HF_CONFIG)
    if hf_cfg.get("model_type") == "switch_transformers":
        from moecxl.model import hf_switch

        return hf_switch.load_switch(path, TensorSource(path), dtype=dtype)
    if hf_cfg.get("model_type") in _FAMILY_LOADERS:
        return _FAMILY_LOADERS[hf_cfg["model_type"]](path, hf_cfg, dtype, experts, dequantize)
    cfg = config_from_hf(hf_cfg, str(path / HF_CONFIG), dtype)
    cfg = cfg.replace(name=cfg.name or path.name)
    with TensorSource(path) as src:
        arrays = hf_arrays(cfg, src)
        return build_model(cfg, arrays, experts, str(path))


def _load_ours(path: Path, dtype: str | None, experts: str):
    d = _read_json(path / OUR_CONFIG)
    cfg = ModelConfig.from_dict(d.get("model", d), str(path / OUR_CONFIG))
    if not cfg.is_decoder_only:
        raise CheckpointError(f"{path / OUR_CONFIG}: family {cfg.family!r} is not stored in moecxl format")
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    shapes = param_shapes(cfg)
    target = NP_DTYPES[cfg.dtype]
    with TensorSource(path) as src:
        extra = sorted(set(src.keys()) - set(shapes))
        if extra:
            raise CheckpointError(
                f"{src.file_of(extra[0])}: unexpected tensor {extra[0]!r} ({len(extra)} in all)"
            )
        arrays = {}
        for name, shape in shapes.items():
            _check_shape(src, name, shape)
            arrays[name] = src.get(name).astype(target, copy=False)
        return build_model(cfg, arrays, experts, str(path))


def _check_shape(src: TensorSource, key: str, want: tuple[int, ...]) -> None:
    if key not in src:
        raise CheckpointError(f"{src.path}: missing tensor {key!r} (expected shape {tuple(want)})")
    got = src.shape(key)
    if got != tuple(want):
        raise CheckpointError(f"{src.file_of(key)}: tensor {key!r}: expected shape {tuple(want)}, got {got}")


def _moe_prefix(cfg: ModelConfig, src: TensorSource, layer: int) -> str:
    """The MoE module name of `layer` in this file (Mixtral: `block_sparse_moe` classic, `mlp` fused)."""
    for p in _MOE_PREFIXES[cfg.family]:
        if f"model.layers.{layer}.{p}.gate.weight" in src:
            return p
    return _MOE_PREFIXES[cfg.family][0]


def hf_arrays(cfg: ModelConfig, src: TensorSource) -> dict[str, np.ndarray]:
    """Every parameter of `cfg` read from an HF checkpoint, as host numpy in our layout and dtype."""
    target = NP_DTYPES[cfg.dtype]
    shapes = param_shapes(cfg)
    prefixes = {i: _moe_prefix(cfg, src, i) for i in cfg.moe_layers}
    hf_deepseek.check_shared(cfg, src, prefixes)
    used: set[str] = set()
    arrays: dict[str, np.ndarray] = {}
    for hf_key, ours, transpose in dense_key_map(cfg, prefixes.__getitem__):
        want = shapes[ours]
        _check_shape(src, hf_key, want[::-1] if transpose else want)
        a = src.get(hf_key)
        arrays[ours] = (a.T if transpose else a).astype(target)
        used.add(hf_key)
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    for i in cfg.moe_layers:
        base = f"model.layers.{i}.{prefixes[i]}.experts"
        # Packed expert by expert (what the offload store keeps); each tensor's file pages are let go
        # once copied (`release`), so loading peaks near the experts' size, not twice it.
        gate_EDF, up_EDF, down_EFD = packed_expert_arrays(E, ((D, F), (D, F), (F, D)), target)
        if f"{base}.gate_up_proj" in src:  # fused: [E, 2F, D] (gate rows first), [E, D, F]
            _check_shape(src, f"{base}.gate_up_proj", (E, 2 * F, D))
            _check_shape(src, f"{base}.down_proj", (E, D, F))
            gu = src.get(f"{base}.gate_up_proj")
            for e in range(E):
                gate_EDF[e] = gu[e, :F, :].T
                up_EDF[e] = gu[e, F:, :].T
            down_EFD[...] = src.get(f"{base}.down_proj").transpose(0, 2, 1)
            used |= {f"{base}.gate_up_proj", f"{base}.down_proj"}
            src.release(f"{base}.gate_up_proj")
            src.release(f"{base}.down_proj")
        else:  # per expert, torch Linear [out, in]
            g_name, u_name, d_name = _EXPERT_NAMES[cfg.family]
            for e in range(E):
                for name, out, shape in (
                    (g_name, gate_EDF, (F, D)),
                    (u_name, up_EDF, (F, D)),
                    (d_name, down_EFD, (D, F)),
                ):
                    key = f"{base}.{e}.{name}.weight"
                    _check_shape(src, key, shape)
                    out[e] = src.get(key).T
                    src.release(key)
                    used.add(key)
        arrays[f"layers.{i}.experts.w_gate_EDF"] = gate_EDF
        arrays[f"layers.{i}.experts.w_up_EDF"] = up_EDF
        arrays[f"layers.{i}.experts.w_down_EFD"] = down_EFD
    extra = sorted(k for k in set(src.keys()) - used if not k.endswith(IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings:  # HF ignores a saved lm_head of a tied model, and so do we
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{src.file_of(extra[0])}: unexpected tensor {extra[0]!r} for {cfg.family} "
            f"({len(extra)} unexpected in all: {extra[:4]})"
        )
    return arrays


# ---- saving ---------------------------------------------------------------------------------------


def to_hf_tensors(model, expert_layout: str = "per_expert") -> dict[str, np.ndarray]:
    """HF tensor dict (torch [out, in] layout) of a decoder model."""
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    cfg: ModelConfig = model.cfg
    ours = model_arrays(model)
    fused = expert_layout == "fused"
    prefix = "mlp" if fused or cfg.family != "mixtral" else "block_sparse_moe"
    out: dict[str, np.ndarray] = {}
    for hf_key, name, transpose in dense_key_map(cfg, lambda i: prefix):
        a = ours[name]
        out[hf_key] = np.ascontiguousarray(a.T if transpose else a)
    g_name, u_name, d_name = _EXPERT_NAMES[cfg.family]
    for i in cfg.moe_layers:
        base = f"model.layers.{i}.{prefix}.experts"
        gate, up, down = (ours[f"layers.{i}.experts.{n}"] for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"))
        if fused:
            out[f"{base}.gate_up_proj"] = np.ascontiguousarray(
                np.concatenate([gate, up], axis=2).transpose(0, 2, 1)
            )
            out[f"{base}.down_proj"] = np.ascontiguousarray(down.transpose(0, 2, 1))
        else:
            for e in range(cfg.num_experts):
                out[f"{base}.{e}.{g_name}.weight"] = np.ascontiguousarray(gate[e].T)
                out[f"{base}.{e}.{u_name}.weight"] = np.ascontiguousarray(up[e].T)
                out[f"{base}.{e}.{d_name}.weight"] = np.ascontiguousarray(down[e].T)
    return out


def _generation_config(cfg: ModelConfig) -> dict[str, Any]:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id)
    return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}


def _commit_dir(tmp: Path, path: Path) -> None:
    """Move a finished temp dir onto `path`; an existing `path` is swapped out, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save(
    model,
    path: str | os.PathLike,
    format: str = "hf",
    expert_layout: str = "per_expert",
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` to directory `path` atomically.

    format="hf": config.json + generation_config.json + safetensors that transformers loads;
    format="moecxl": moecxl.json + safetensors of our parameter names. Shards + index above
    `max_shard_bytes`.
    """
    path = Path(path)
    cfg: ModelConfig = model.cfg
    if cfg.family == "switch":
        from moecxl.model import hf_switch

        return hf_switch.save_switch(model, path, max_shard_bytes=max_shard_bytes)
    if cfg.family in _FAMILY_SAVERS and format == "hf":
        return _FAMILY_SAVERS[cfg.family](model, path, max_shard_bytes)
    if format not in ("hf", "moecxl"):
        raise ValueError(f"format must be 'hf' or 'moecxl', got {format!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if format == "hf":
            tensors = to_hf_tensors(model, expert_layout)
            write_text_atomic(tmp / HF_CONFIG, json.dumps(config_to_hf(cfg), indent=2, sort_keys=True))
            write_text_atomic(tmp / GENERATION_CONFIG, json.dumps(_generation_config(cfg), indent=2))
            metadata = {"format": "pt"}
        else:
            tensors = model_arrays(model)
            write_text_atomic(tmp / OUR_CONFIG, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            metadata = {"format": "moecxl"}
        write_checkpoint(tmp, tensors, metadata, max_shard_bytes)
        _commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
