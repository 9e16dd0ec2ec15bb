"""Switch Transformers checkpoints in Hugging Face format <-> `SwitchModel`.

The key map lists every HF tensor with where it lives in our state and whether it is transposed
(torch Linear stores [out, in], our `Dense` stores [in, out]). transformers 5.24 keeps Switch experts as
separate `mlp.experts.expert_{e}.wi/wo` modules (no fused layout in memory or on disk); we stack them on
a leading E axis. With tied embeddings the file holds `shared.weight` only (the encoder/decoder
`embed_tokens` and `lm_head` aliases are accepted on load and not written). Untied, transformers 5.24
unties the stacks' `embed_tokens` from `shared` as well, so each is a tensor of its own; a checkpoint
without them (transformers 4 always tied them) falls back to `shared.weight`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.config import ConfigError, ModelConfig
from moecxl.model.family import sparse_layers
from moecxl.model.layers import DTYPES
from moecxl.model.safetensors_io import CheckpointError, TensorSource, write_checkpoint
from moecxl.model.switch import SwitchModel

MODEL_TYPE = "switch_transformers"
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# a tensor absent from a checkpoint may be read from these instead (the same table under tying)
FALLBACKS = {
    "shared.weight": TIED_ALIASES,
    "encoder.embed_tokens.weight": ("shared.weight",),
    "decoder.embed_tokens.weight": ("shared.weight",),
}


# ---- config --------------------------------------------------------------------------------------


def _sparse_step(num_layers: int, num_sparse: int) -> int:
    """transformers' rule: step = layers // sparse layers; 0 sparse layers gives step = layers."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def _num_sparse(num_layers: int, step: int, which: str) -> int:
    """The `num_sparse_*_layers` that transformers turns back into `step`."""
    for n in range(1, num_layers + 1):
        if _sparse_step(num_layers, n) == step:
            return n
    raise ConfigError(
        f"{which}_sparse_step={step} with {num_layers} layers has no HF num_sparse_{which}_layers equivalent"
    )


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """HF `config.json` (model_type switch_transformers) -> ModelConfig(family="switch")."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type {hf.get('model_type')!r}, expected {MODEL_TYPE!r}")
    for key, want in (("dense_act_fn", "relu"), ("router_bias", False), ("is_encoder_decoder", True)):
        if hf.get(key, want) != want:
            raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (only {want!r})")
    missing = [
        k for k in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "num_experts") if k not in hf
    ]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {missing}")
    n_enc = hf["num_layers"]
    n_dec = hf.get("num_decoder_layers") or n_enc
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return ModelConfig(
        family="switch",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["d_model"],
        intermediate_size=hf["d_ff"],
        num_layers=n_enc,
        num_decoder_layers=n_dec,
        num_heads=hf["num_heads"],
        num_kv_heads=hf["num_heads"],
        d_kv=hf.get("d_kv", 64),
        num_experts=hf["num_experts"],
        top_k=1,
        encoder_sparse_step=_sparse_step(n_enc, hf.get("num_sparse_encoder_layers", 3)),
        decoder_sparse_step_switch=_sparse_step(n_dec, hf.get("num_sparse_decoder_layers", 3)),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        expert_capacity=hf.get("expert_capacity", 64),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        pad_token_id=pad if pad is not None else 0,
        eos_token_id=eos,
        bos_token_id=hf.get("bos_token_id"),
        decoder_start_token_id=start if start is not None else (pad if pad is not None else 0),
        dtype="bfloat16" if dtype == "bfloat16" else "float32",
        name=hf.get("_name_or_path", ""),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig(family="switch") -> a `config.json` dict that transformers loads back to the same model."""
    n_dec = cfg.num_decoder_layers or cfg.num_layers
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "d_kv": cfg.dim_head,
        "d_ff": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": n_dec,
        "num_heads": cfg.num_heads,
        "num_experts": cfg.num_experts,
        "num_sparse_encoder_layers": _num_sparse(cfg.num_layers, cfg.encoder_sparse_step, "encoder"),
        "num_sparse_decoder_layers": _num_sparse(n_dec, cfg.decoder_sparse_step_switch, "decoder"),
        "expert_capacity": cfg.expert_capacity,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "dense_act_fn": "relu",
        "router_bias": False,
        "router_dtype": "float32",
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "dtype": cfg.dtype,
        "use_cache": True,
    }


# ---- key map -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One HF tensor: our state path, the expert index within a stacked [E, ...] param, transposed?"""

    path: tuple
    expert: int | None = None
    transpose: bool = False


def _attn(entries: dict, hf: str, ours: tuple) -> None:
    for name in ("q", "k", "v", "o"):
        entries[f"{hf}.{name}.weight"] = Entry((*ours, name, "w"), transpose=True)


def key_map(cfg: ModelConfig) -> dict[str, Entry]:
    """Every tensor of an HF Switch checkpoint -> where it goes in `nnx.state(SwitchModel)`."""
    m: dict[str, Entry] = {"shared.weight": Entry(("embed_VD",))}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = Entry(("lm_head_DV",), transpose=True)
    n_dec = cfg.num_decoder_layers or cfg.num_layers
    for stack, n, step in (
        ("encoder", cfg.num_layers, cfg.encoder_sparse_step),
        ("decoder", n_dec, cfg.decoder_sparse_step_switch),
    ):
        m[f"{stack}.final_layer_norm.weight"] = Entry((stack, "final_norm", "scale_D"))
        if not cfg.tie_word_embeddings:
            m[f"{stack}.embed_tokens.weight"] = Entry((stack, "embed_VD"))
        sparse = set(sparse_layers(n, step))
        for i in range(n):
            hf, core = f"{stack}.block.{i}.layer", (stack, "layers", i, "core")
            _attn(m, f"{hf}.0.SelfAttention", (*core, "self_attn"))
            m[f"{hf}.0.layer_norm.weight"] = Entry((*core, "self_norm", "scale_D"))
            if i == 0:
                m[f"{hf}.0.SelfAttention.relative_attention_bias.weight"] = Entry(
                    (*core, "rel_bias", "table_NH")
                )
            ff = 1
            if stack == "decoder":
                _attn(m, f"{hf}.1.EncDecAttention", (*core, "cross_attn"))
                m[f"{hf}.1.layer_norm.weight"] = Entry((*core, "cross_norm", "scale_D"))
                ff = 2
            m[f"{hf}.{ff}.layer_norm.weight"] = Entry((*core, "ff_norm", "scale_D"))
            mlp = f"{hf}.{ff}.mlp"
            if i in sparse:
                m[f"{mlp}.router.classifier.weight"] = Entry((*core, "router_DE"), transpose=True)
                experts = (stack, "layers", i, "experts")
                for e in range(cfg.num_experts):
                    m[f"{mlp}.experts.expert_{e}.wi.weight"] = Entry((*experts, "w_in_EDF"), e, True)
                    m[f"{mlp}.experts.expert_{e}.wo.weight"] = Entry((*experts, "w_down_EFD"), e, True)
            else:
                m[f"{mlp}.wi.weight"] = Entry((*core, "mlp", "wi", "w"), transpose=True)
                m[f"{mlp}.wo.weight"] = Entry((*core, "mlp", "wo", "w"), transpose=True)
    return m


def _hf_shape(param_shape: tuple, entry: Entry) -> tuple:
    shape = param_shape[1:] if entry.expert is not None else param_shape
    return tuple(reversed(shape)) if entry.transpose else tuple(shape)


# ---- load / save ---------------------------------------------------------------------------------


def _where(source, key: str) -> str:
    file_of = getattr(source, "file_of", None)
    return str(file_of(key)) if file_of is not None else str(getattr(source, "path", "<source>"))


def load_switch(path: str | os.PathLike, source=None, dtype: str | None = None) -> SwitchModel:
    """Build a `SwitchModel` from an HF directory (config.json + safetensors).

    `source` reads tensors (`.keys()`, `.get(key)`, `.shape(key)`); default `TensorSource(path)`.
    Missing, unexpected or mis-shaped tensors raise `CheckpointError` naming file, key and shapes.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: no such file")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON: {e}") from e
    cfg = config_from_hf(hf, str(cfg_file))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    if source is None:
        source = TensorSource(path)
    kmap = key_map(cfg)
    keys = set(source.keys())
    allowed = (set(TIED_ALIASES) | {"lm_head.weight"}) if cfg.tie_word_embeddings else set()
    read_from = {}  # our key -> the checkpoint key that holds it
    for key in kmap:
        alts = [a for a in FALLBACKS.get(key, ()) if a in keys]
        read_from[key] = key if key in keys or not alts else alts[0]
    missing = sorted(k for k, src in read_from.items() if src not in keys)
    extra = sorted(keys - set(kmap) - allowed)
    if missing or extra:
        raise CheckpointError(
            f"{path}: Switch checkpoint does not match config.json: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''} ({len(extra)})"
        )
    abstract = nnx.eval_shape(lambda: SwitchModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    shapes = {p: v.get_value().shape for p, v in flat}
    np_dt = np.dtype(DTYPES[cfg.dtype])
    buffers = {p: np.empty(s, np_dt) for p, s in shapes.items()}
    filled: dict[tuple, int] = {}
    for key, entry in kmap.items():
        if entry.path not in shapes:
            raise CheckpointError(f"internal: key map path {entry.path} for {key!r} not in SwitchModel")
        want = _hf_shape(shapes[entry.path], entry)
        src = read_from[key]
        got = tuple(source.shape(src))
        if got != want:
            raise CheckpointError(f"{_where(source, src)}: tensor {src!r} has shape {got}, expected {want}")
        a = np.asarray(source.get(src))
        a = a.T if entry.transpose else a
        if entry.expert is None:
            buffers[entry.path][...] = a.astype(np_dt)
        else:
            buffers[entry.path][entry.expert] = a.astype(np_dt)
        filled[entry.path] = filled.get(entry.path, 0) + 1
    unfilled = sorted(str(p) for p in shapes if p not in filled)
    if unfilled:
        raise CheckpointError(f"internal: SwitchModel params with no checkpoint key: {unfilled}")
    for p, v in flat:
        v.set_value(jnp.asarray(buffers[p]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_tensors(model: SwitchModel) -> dict[str, np.ndarray]:
    """Our parameters as the HF tensors (torch layout), in key-map order."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for key, entry in key_map(model.cfg).items():
        a = np.asarray(flat[entry.path].get_value())
        if entry.expert is not None:
            a = a[entry.expert]
        out[key] = np.ascontiguousarray(a.T if entry.transpose else a)
    return out


def save_switch(model: SwitchModel, path: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write config.json + model.safetensors (or shards) that transformers loads; atomic per directory:
    everything goes to a temporary sibling directory first, then replaces `path` by rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2, sort_keys=True))
        write_checkpoint(tmp, hf_tensors(model), metadata={"format": "pt"}, max_shard_bytes=max_shard_bytes)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
