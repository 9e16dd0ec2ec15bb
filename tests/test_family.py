"""The family descriptor answers as the model code behaves: the sparse blocks the models build, the layers
a prefill or decode forward routes through, K, block counts, router placement; unknown names raise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moecxl.config import FAMILIES, ModelConfig
from moecxl.model.decoder import MoEDecoder
from moecxl.model.family import FamilyError, family_of
from moecxl.model.switch import SwitchModel

MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"
TINY_SWITCH = ModelConfig.from_yaml(MODELS / "tiny-switch.yaml")
TINY_MIXTRAL = ModelConfig.from_yaml(MODELS / "tiny-mixtral.yaml")

SWITCH_CASES = {
    "tiny-switch": TINY_SWITCH,
    # every encoder block sparse, 2 of 5 decoder blocks; a config top_k of 2 still routes top-1
    "enc-step1-dec5": TINY_SWITCH.replace(
        num_layers=3, num_decoder_layers=5, encoder_sparse_step=1, top_k=2, expert_capacity=64
    ),
}
DECODER_CASES = {
    "tiny-mixtral": TINY_MIXTRAL,
    # Qwen3-MoE: MoE every 2nd layer, layer 3 dense by mlp_only_layers -> only layer 1 sparse
    "qwen3-interleaved": TINY_MIXTRAL.replace(
        family="qwen3_moe", num_layers=4, decoder_sparse_step=2, mlp_only_layers=(3,)
    ),
}


def _old_layer_names(cfg):
    """`traces.layer_names` before the descriptor: the reference the descriptor must reproduce."""
    if cfg.family != "switch":
        return [f"layer.{i}" for i in cfg.moe_layers]
    return [f"encoder.{i}" if i < cfg.num_layers else f"decoder.{i - cfg.num_layers}" for i in cfg.moe_layers]


@pytest.mark.parametrize("name", SWITCH_CASES)
def test_switch_descriptor_matches_the_model(name):
    cfg = SWITCH_CASES[name]
    fam = family_of(cfg)
    model = SwitchModel(cfg, rngs=nnx.Rngs(0))
    assert fam.encoder_decoder and not fam.bounded_positions and not fam.gated_experts
    built = tuple(tuple(i for i, b in enumerate(stack) if b.core.is_sparse) for stack in fam.stacks(model))
    assert fam.sparse_blocks(cfg) == built
    assert fam.stack_sizes(cfg) == (len(model.encoder.layers), len(model.decoder.layers))
    assert fam.num_blocks(cfg) == len(model.encoder.layers) + len(model.decoder.layers)
    assert fam.layer_names(cfg) == _old_layer_names(cfg)
    L = cfg.num_moe_layers
    assert sum(map(len, built)) == L

    # router placement: one router per trace layer, at block.core.router_DE, encoder's first
    blocks = fam.moe_blocks(model)
    want = [
        b.core.router_DE for stack in (model.encoder, model.decoder) for b in stack.layers if b.core.is_sparse
    ]
    assert [fam.router(b) for b in blocks] == want and all(b.experts is not None for b in blocks)
    assert all(b.experts.gated == fam.gated_experts for b in blocks)
    dense = next(b for stack in fam.stacks(model) for b in stack if not b.core.is_sparse)
    assert fam.dense_ffn_params(cfg) == dense.core.mlp.wi.w[...].size + dense.core.mlp.wo.w[...].size

    # prefill runs the encoder: its routing lists are the first layers of the trace, in order
    B, S = 2, 5
    ids_BS = jnp.ones((B, S), jnp.int32)
    enc = model.encode(ids_BS)
    prefill = fam.phase_layers(cfg, "prefill")
    assert prefill == tuple(range(len(enc.routing.expert_ids)))
    assert all(x.shape == (B, S, fam.routed_k(cfg)) for x in enc.routing.expert_ids)

    # a cached decode step visits only the decoder's sparse blocks: the last layers of the trace
    cache = model.init_cache(enc.hidden_BSD, None, 4)
    _, _, routing = model.decode_step(jnp.zeros((B, 1), jnp.int32), cache, jnp.int32(0))
    decode = fam.phase_layers(cfg, "decode")
    assert decode == tuple(range(L - len(routing.expert_ids), L)) and len(decode) == len(built[1])
    assert prefill + decode == tuple(range(L))
    assert fam.routed_k(cfg) == 1 and all(x.shape[-1] == 1 for x in routing.expert_ids)
    assert [fam.layer_names(cfg)[l].split(".")[0] for l in decode] == ["decoder"] * len(decode)


@pytest.mark.parametrize("name", DECODER_CASES)
def test_decoder_descriptor_matches_the_model(name):
    cfg = DECODER_CASES[name]
    fam = family_of(cfg)
    model = MoEDecoder(cfg, rngs=nnx.Rngs(0))
    assert not fam.encoder_decoder and fam.bounded_positions and fam.gated_experts
    built = tuple(i for i, layer in enumerate(model.layers) if layer.core.is_moe)
    assert fam.sparse_blocks(cfg) == (built,)
    assert fam.num_blocks(cfg) == len(model.layers) and fam.dense_ffn_params(cfg) == 0
    assert fam.layer_names(cfg) == _old_layer_names(cfg)
    blocks = fam.moe_blocks(model)
    assert [fam.router(b) for b in blocks] == [model.layers[i].core.router_DE for i in built]
    assert all(b.experts.gated for b in blocks)

    # both phases walk the one stack: every MoE layer, in order
    out = model(jnp.ones((2, 3), jnp.int32))
    L = len(out.expert_ids)
    assert L == cfg.num_moe_layers == len(built)
    for phase in ("prefill", "decode"):
        assert fam.phase_layers(cfg, phase) == tuple(range(L))
    assert fam.routed_k(cfg) == cfg.top_k == out.expert_ids[0].shape[-1]
    # routers in trace order reproduce the model's router logits
    xn = out.moe_inputs[0]
    np.testing.assert_allclose(
        np.asarray(jnp.einsum("BTD,DE->BTE", xn, fam.router(blocks[0])[...])),
        np.asarray(out.router_logits[0]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_every_family_has_a_descriptor():
    for name in FAMILIES:
        fam = family_of(name)
        assert fam.name == name and family_of(ModelConfig(family=name, num_kv_heads=4)) is fam
        assert fam.encoder_decoder == (name == "switch") == (not ModelConfig(family=name).is_decoder_only)


@pytest.mark.parametrize("bad", ["gpt-oss", SimpleNamespace(family="jamba")])
def test_unknown_family_names_it(bad):
    name = bad if isinstance(bad, str) else bad.family
    with pytest.raises(FamilyError, match=name) as e:
        family_of(bad)
    assert "mixtral" in str(e.value)  # and lists the known ones


def test_unknown_phase_names_it():
    with pytest.raises(FamilyError, match="'warmup'"):
        family_of(TINY_MIXTRAL).phase_layers(TINY_MIXTRAL, "warmup")
