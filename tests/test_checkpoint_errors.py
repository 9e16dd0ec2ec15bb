"""Every bad checkpoint raises `CheckpointError` (a ValueError) naming the file, the key and the shapes.

Checkpoints come from `hf.save` of a tiny random moecxl model (no torch needed), then get broken.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from flax import nnx

from moecxl.config import ModelConfig
from moecxl.model import hf
from moecxl.model.decoder import MoEDecoder
from moecxl.model.safetensors_io import CheckpointError, TensorSource, write_checkpoint, write_safetensors

CFG = ModelConfig(
    family="mixtral",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=8,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    num_experts=3,
    top_k=2,
)
ROUTER = "model.layers.0.block_sparse_moe.gate.weight"
EXPERT = "model.layers.0.block_sparse_moe.experts.1.w2.weight"


@pytest.fixture(scope="module")
def model():
    return MoEDecoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture
def ckpt(model, tmp_path):
    return hf.save(model, tmp_path / "ckpt")


def rewrite(d, edit):
    """Rewrite model.safetensors of `d` with `edit(dict of arrays)` applied."""
    src = TensorSource(d)
    tensors = {k: np.array(src.get(k)) for k in src}
    src.close()
    edit(tensors)
    write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def raises(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        hf.load(path)
    msg = str(info.value)
    for f in fragments:
        assert str(f) in msg, msg
    return msg


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_good_checkpoint_loads(ckpt):
    assert hf.load(ckpt).cfg.num_experts == 3


def test_missing_directory(tmp_path):
    raises(tmp_path / "nope", "nope")


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    raises(ckpt, "config.json", "moecxl.json")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    raises(ckpt, "config.json", "not valid JSON")


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    raises(ckpt, "config.json", "'llama'")


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
        dict(rope_scaling={"type": "linear", "factor": 2.0}),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
    ],
)
def test_unsupported_rope(ckpt, rope):
    edit_config(ckpt, **rope)
    raises(ckpt, "config.json", "not supported")


def test_unsupported_activation(ckpt):
    edit_config(ckpt, hidden_act="gelu")
    raises(ckpt, "hidden_act", "gelu")


def test_bad_config_value(ckpt):
    edit_config(ckpt, num_experts_per_tok=5)
    raises(ckpt, "config.json", "top_k")


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop(EXPERT))
    raises(ckpt, EXPERT, "(16, 8)")


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    raises(ckpt, "model.safetensors")


def test_extra_tensor(ckpt):
    rewrite(
        ckpt, lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": np.zeros((2, 2), np.float32)})
    )
    raises(ckpt, "model.safetensors", "model.layers.0.mlp.shared_expert.weight", "unexpected")


def test_misshaped_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({ROUTER: np.zeros((4, 16), np.float32)}))
    raises(ckpt, "model.safetensors", ROUTER, "(3, 16)", "(4, 16)")


def test_misshaped_fused_experts(model, tmp_path):
    d = hf.save(model, tmp_path / "fused", expert_layout="fused")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    rewrite(d, lambda t: t.update({key: np.zeros((3, 8, 16), np.float32)}))
    raises(d, key, "(3, 16, 16)", "(3, 8, 16)")


def test_untied_checkpoint_without_lm_head(ckpt):
    rewrite(ckpt, lambda t: t.pop("lm_head.weight"))
    raises(ckpt, "lm_head.weight")


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    msg = raises(ckpt, "model.safetensors", "truncated")
    assert "'" in msg  # names the key whose data runs past the end


def test_truncated_inside_header(ckpt):
    f = ckpt / "model.safetensors"
    os.truncate(f, 20)
    raises(ckpt, "model.safetensors", "header length")


def test_empty_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"")
    raises(ckpt, "model.safetensors", "truncated")


def test_header_not_json(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 8) + b"{garbage" + b"\0" * 16)
    raises(ckpt, "model.safetensors", "not valid JSON")


def test_header_entry_malformed(ckpt):
    header = json.dumps({ROUTER: {"dtype": "F32", "shape": [3, 16], "data_offsets": [0, 10]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 192)
    raises(ckpt, "model.safetensors", ROUTER, "needs 192")


def test_header_unknown_dtype(ckpt):
    header = json.dumps({ROUTER: {"dtype": "Q4", "shape": [3, 16], "data_offsets": [0, 10]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    raises(ckpt, "model.safetensors", ROUTER, "Q4")


@pytest.fixture
def sharded(model, tmp_path):
    return hf.save(model, tmp_path / "sharded", max_shard_bytes=4096)


def test_sharded_loads(sharded):
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert hf.load(sharded).cfg.num_layers == 1


def test_index_names_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    raises(sharded, "model.safetensors.index.json", shard.name)


def test_index_key_not_in_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(sharded.glob("model-*-of-*.safetensors"))[0].name
    index["weight_map"]["model.layers.0.ghost.weight"] = first
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    raises(sharded, first, "model.layers.0.ghost.weight")


def test_index_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("[1, 2")
    raises(sharded, "model.safetensors.index.json")


def test_duplicate_key_across_shards(tmp_path):
    a = np.zeros(2, np.float32)
    write_checkpoint(tmp_path, {"x": a, "y": a}, max_shard_bytes=8)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    write_safetensors(tmp_path / index["weight_map"]["y"], {"y": a, "x": a})
    with pytest.raises(CheckpointError, match="'x'"):
        TensorSource(tmp_path)


def test_moecxl_format_errors(model, tmp_path):
    d = hf.save(model, tmp_path / "ours", format="moecxl")
    assert hf.load(d).cfg == CFG.replace(name=CFG.name)
    rewrite(d, lambda t: t.pop("layers.0.experts.w_down_EFD"))
    raises(d, "layers.0.experts.w_down_EFD", "(3, 8, 16)")
    cfg = json.loads((d / "moecxl.json").read_text())
    cfg["bogus"] = 1
    (d / "moecxl.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bogus"):
        hf.load(d)


def test_tensor_source_reads_lazily(ckpt):
    src = TensorSource(ckpt)
    a = src.get(EXPERT)
    assert isinstance(a, np.memmap) and a.shape == (16, 8) and src.shape(EXPERT) == (16, 8)
    with pytest.raises(CheckpointError, match="nothing.here"):
        src.get("nothing.here")
    src.close()


def test_save_cannot_express(model, tmp_path):
    bad = MoEDecoder(CFG.replace(qk_norm="head"), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="qk_norm"):
        hf.save(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))  # nothing half-written
