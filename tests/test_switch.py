"""Switch Transformers parity with transformers on tiny random checkpoints the test builds.

Each case builds `SwitchTransformersForConditionalGeneration` from a small config, gives it O(1) random
weights (so routing is decisive and a transposed matrix cannot hide), saves it with `save_pretrained`,
loads it with `load_switch` and compares logits, encoder/decoder router logits (float32, relative 1e-4),
greedy generation and a save -> transformers round trip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax.numpy as jnp  # noqa: E402

from moecxl.model import hf  # noqa: E402
from moecxl.model.hf_switch import config_from_hf, config_to_hf, load_switch, save_switch  # noqa: E402
from moecxl.model.safetensors_io import CheckpointError  # noqa: E402
from moecxl.model.switch import (  # noqa: E402
    SwitchModel,
    _greedy_step,
    relative_position_bucket,
    sparse_layers,
    switch_forward,
    switch_generate,
)

RTOL = 1e-4
SMALL = dict(
    vocab_size=131,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    decoder_start_token_id=0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
)

CASES = {
    # every block sparse (step 1); capacity 2 drops tokens in both stacks
    "e4-l2-step1-drop": dict(
        num_experts=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        expert_capacity=2,
    ),
    # encoder step 2, decoder step 1; capacity never reached
    "e7-l4-step2-nodrop": dict(
        num_experts=7,
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=4,
        expert_capacity=64,
    ),
    # 4 encoder / 2 decoder blocks, step 2 each, untied LM head, a few drops
    "e8-l4-dec2-untied": dict(
        num_experts=8,
        num_layers=4,
        num_decoder_layers=2,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=1,
        expert_capacity=3,
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
}


class DictSource:
    """The three-method tensor source `load_switch` reads, over a dict of numpy arrays."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get(self, key):
        return self.tensors[key]

    def shape(self, key):
        return tuple(self.tensors[key].shape)


def build_hf(overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.SwitchTransformersConfig(**{**SMALL, **overrides})
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "shared" in name:  # small, so a tied head does not just copy its input token
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Lazily build, save and load each case once: name -> (hf_model, dir, our_model)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = build_hf(CASES[name])
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d)
            ours = load_switch(d, DictSource(safetensors_numpy.load_file(str(d / "model.safetensors"))))
            cache[name] = (model, d, ours)
        return cache[name]

    return get


def inputs(seed: int = 1, B: int = 2, S: int = 11, T: int = 7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, SMALL["vocab_size"], (B, S))
    dec = rng.integers(2, SMALL["vocab_size"], (B, T))
    dec[:, 0] = SMALL["decoder_start_token_id"]
    mask = np.ones((B, S), np.int64)
    mask[1, S - 3 :] = 0  # right padding, as T5 tokenizers pad
    return ids, dec, mask


def hf_forward(model, ids, dec, mask, dec_mask=None):
    kw = {} if dec_mask is None else dict(decoder_attention_mask=torch.tensor(dec_mask))
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            output_router_logits=True,
            **kw,
        )


def rel_err(got, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def test_sparse_blocks_match_reference(saved):
    for name in CASES:
        model, _, ours = saved(name)
        cfg = ours.cfg
        for stack, n, step in (
            (model.encoder, cfg.num_layers, cfg.encoder_sparse_step),
            (model.decoder, cfg.num_decoder_layers, cfg.decoder_sparse_step_switch),
        ):
            want = tuple(i for i, block in enumerate(stack.block) if block.is_sparse)
            assert sparse_layers(n, step) == want, name
        n_enc_sparse = sum(b.is_sparse for b in model.encoder.block)
        assert cfg.num_moe_layers == n_enc_sparse + sum(b.is_sparse for b in model.decoder.block), name


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 40)])
def test_relative_position_bucket_matches_reference(buckets, max_distance):
    attn_cls = (
        transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersAttention
    )
    rel = np.arange(-400, 401)
    for bidirectional in (True, False):
        ref = attn_cls._relative_position_bucket(torch.tensor(rel), bidirectional, buckets, max_distance)
        ours = relative_position_bucket(jnp.asarray(rel), bidirectional, buckets, max_distance)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_router_logits_match(saved, name):
    model, _, ours = saved(name)
    ids, dec, mask = inputs()
    dec_mask = None
    if name == "e8-l4-dec2-untied":  # a right-padded decoder batch too
        dec_mask = np.ones_like(dec)
        dec_mask[0, -2:] = 0
    ref = hf_forward(model, ids, dec, mask, dec_mask)
    out = switch_forward(ours, ids, dec, mask, dec_mask)
    assert out.logits.dtype == jnp.float32 and out.logits.shape == tuple(ref.logits.shape)
    assert rel_err(out.logits, ref.logits.numpy()) < RTOL
    for got_list, ref_list, ids_list in (
        (out.encoder_router_logits, ref.encoder_router_logits, out.encoder_expert_ids),
        (out.decoder_router_logits, ref.decoder_router_logits, out.decoder_expert_ids),
    ):
        assert len(got_list) == len(ref_list) > 0
        for got, want, ids_BT1 in zip(got_list, ref_list, ids_list):
            assert got.shape == tuple(want.shape)
            assert rel_err(got, want.numpy()) < RTOL
            np.testing.assert_array_equal(np.asarray(ids_BT1)[..., 0], want.numpy().argmax(-1))
    dropped = sum(
        int((np.asarray(w) == 0).sum()) for w in out.encoder_expert_weights + out.decoder_expert_weights
    )
    if CASES[name]["expert_capacity"] >= 64:
        assert dropped == 0
    else:
        assert dropped > 0, "capacity should drop tokens in this case"


@pytest.mark.parametrize("name", ["e4-l2-step1-drop", "e8-l4-dec2-untied"])
def test_greedy_generation_matches(saved, name):
    model, _, ours = saved(name)
    ids, _, mask = inputs(seed=3)
    n_new = 8
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ref_tokens = ref.sequences.numpy()[:, 1:]  # drop the decoder start token
    traces = _greedy_step._cache_size()
    res = switch_generate(ours, ids, n_new, mask)
    assert _greedy_step._cache_size() - traces <= 1, "the decode step must not retrace per token"
    tokens = np.asarray(res.tokens)
    assert len(set(tokens.ravel().tolist())) > 2, "degenerate generation tests little; change the seed"
    np.testing.assert_array_equal(tokens, ref_tokens)
    ref_logits = torch.stack(ref.logits, 1).numpy()
    assert res.logits.shape == ref_logits.shape
    assert rel_err(res.logits, ref_logits) < RTOL
    assert len(res.decoder_expert_ids) == len(ours.cfg.moe_layers) - len(res.encoder_expert_ids)


def test_save_round_trip_loads_in_transformers(saved, tmp_path):
    name = "e8-l4-dec2-untied"
    model, _, ours = saved(name)
    ids, dec, mask = inputs(seed=5)
    out = tmp_path / "switch"
    save_switch(ours, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
    ref = hf_forward(model, ids, dec, mask).logits.numpy()
    assert rel_err(hf_forward(reloaded, ids, dec, mask).logits.numpy(), ref) < 1e-6
    # and back through the default reader (TensorSource) into our model
    again = hf.load(out)  # the package entry point dispatches Switch here
    assert isinstance(again, SwitchModel) and again.cfg == ours.cfg
    assert rel_err(switch_forward(again, ids, dec, mask).logits, ref) < RTOL
    save_switch(again, out)  # overwriting an existing directory is atomic too
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_config_round_trip():
    for overrides in CASES.values():
        hf_cfg = transformers.SwitchTransformersConfig(**{**SMALL, **overrides})
        cfg = config_from_hf(hf_cfg.to_dict())
        back = transformers.SwitchTransformersConfig(
            **{k: v for k, v in config_to_hf(cfg).items() if k not in ("model_type", "architectures")}
        )
        assert (back.encoder_sparse_step, back.decoder_sparse_step) == (
            hf_cfg.encoder_sparse_step,
            hf_cfg.decoder_sparse_step,
        )
        assert config_from_hf(back.to_dict()) == cfg


def test_checkpoint_errors_name_the_culprit(saved):
    _, d, _ = saved("e4-l2-step1-drop")
    tensors = safetensors_numpy.load_file(str(d / "model.safetensors"))
    key = "decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight"

    missing = dict(tensors)
    del missing[key]
    with pytest.raises(CheckpointError, match="missing.*expert_3.wi"):
        load_switch(d, DictSource(missing))

    extra = {**tensors, "encoder.block.9.layer.0.layer_norm.weight": np.ones(32, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected.*block\.9"):
        load_switch(d, DictSource(extra))

    bad = {**tensors, key: tensors[key].T.copy()}
    with pytest.raises(CheckpointError, match=r"expert_3\.wi\.weight.*\(32, 48\).*expected \(48, 32\)"):
        load_switch(d, DictSource(bad))

    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ValueError, match="dense_act_fn"):
        config_from_hf({**cfg, "dense_act_fn": "gated-gelu"}, "config.json")
