"""Parity with transformers on tiny random checkpoints the test builds (Mixtral, OLMoE, Qwen3-MoE).

Each case builds a transformers model from a small config, scales its random weights up (so routing
is decisive and a transposed matrix cannot hide), saves it in the per-expert or the fused layout, loads
it with `moecxl.model.hf.load`, and compares logits and router logits (float32, relative 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moecxl.model import hf  # noqa: E402

RTOL = 1e-4
SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# (family, config overrides, fused layout on disk)
CASES = {
    "mixtral-gqa1-e3-k1": (
        "mixtral",
        dict(num_key_value_heads=4, num_local_experts=3, num_experts_per_tok=1),
        False,
    ),
    "mixtral-gqa2-e5-k2-fused": ("mixtral", dict(num_local_experts=5, num_experts_per_tok=2), True),
    "mixtral-gqa4-e7-k4-window": (
        "mixtral",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=7,
            num_experts_per_tok=4,
            sliding_window=3,
        ),
        False,
    ),
    "mixtral-tied-e4-k3": (
        "mixtral",
        dict(num_local_experts=4, num_experts_per_tok=3, tie_word_embeddings=True),
        False,
    ),
    "olmoe-e5-k2": ("olmoe", dict(num_experts=5, num_experts_per_tok=2, norm_topk_prob=False), False),
    "olmoe-clip-norm-bias-e7-k3-fused": (
        "olmoe",
        dict(num_experts=7, num_experts_per_tok=3, norm_topk_prob=True, clip_qkv=0.6, attention_bias=True),
        True,
    ),
    "qwen3-dense-step2-e5-k2": (
        "qwen3_moe",
        dict(
            num_hidden_layers=4,
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            mlp_only_layers=[2],
            decoder_sparse_step=2,
            norm_topk_prob=True,
            head_dim=16,
        ),
        False,
    ),
    "qwen3-window-bias-tied-e3-k3-fused": (
        "qwen3_moe",
        dict(
            num_experts=3,
            num_experts_per_tok=3,
            moe_intermediate_size=8,
            use_sliding_window=True,
            sliding_window=4,
            attention_bias=True,
            tie_word_embeddings=True,
            norm_topk_prob=False,
            num_attention_heads=8,
            num_key_value_heads=2,
        ),
        True,
    ),
}

CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def build_hf(family: str, overrides: dict, seed: int = 0):
    """A tiny transformers model with O(1) weights (norm scales around 1)."""
    conf_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    kw = {**SMALL, **overrides}
    if family == "olmoe":
        kw.setdefault("eos_token_id", 2)
    torch.manual_seed(seed)
    cfg = conf_cls(**kw)
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    return model


def hf_forward(model, ids, mask=None):
    kw = {}
    if mask is not None:
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    with torch.no_grad():
        out = model(torch.tensor(ids), output_router_logits=True, **kw)
    return out.logits.numpy(), [r.numpy() for r in out.router_logits]


def rel_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def assert_parity(out, ref_logits, ref_router, valid=None):
    logits = np.asarray(out.logits)
    B, T, V = logits.shape
    sel = np.ones((B, T), bool) if valid is None else valid.astype(bool)
    assert rel_err(logits[sel], ref_logits[sel]) < RTOL
    assert len(out.router_logits) == len(ref_router)
    for ours, ref in zip(out.router_logits, ref_router):
        ref = ref.reshape(B, T, -1)
        assert rel_err(np.asarray(ours)[sel], ref[sel]) < RTOL


def jitted_forward(model):
    """One compiled forward per model structure: (state, ids, mask) -> MoEOutput (eager op-by-op
    dispatch would compile every primitive separately, which costs more on a small CPU)."""
    graphdef, _ = nnx.split(model)
    return jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))


def run(fwd, model, ids, mask=None):
    mask = np.ones(ids.shape, np.int32) if mask is None else mask
    return fwd(nnx.state(model), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Lazily build, save and load each case once: name -> (hf_model, dir, our_model, jitted forward)."""
    cache = {}

    def get(name):
        if name not in cache:
            family, overrides, fused = CASES[name]
            model = build_hf(family, overrides)
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d, save_original_format=not fused)
            ours = hf.load(d)
            cache[name] = (model, d, ours, jitted_forward(ours))
        return cache[name]

    return get


def random_ids(seed: int):
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (3, 8))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_router_logits_match(saved, name):
    model, _, ours, fwd = saved(name)
    ids = random_ids(1)
    ref_logits, ref_router = hf_forward(model, ids)
    assert ours.cfg.family == CASES[name][0]
    assert_parity(run(fwd, ours, ids), ref_logits, ref_router)


@pytest.mark.parametrize("name", ["mixtral-gqa2-e5-k2-fused", "olmoe-e5-k2", "qwen3-dense-step2-e5-k2"])
def test_left_padded_batch(saved, name):
    model, _, ours, fwd = saved(name)
    ids = random_ids(2)
    mask = np.ones((3, 8), np.int64)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ref_logits, ref_router = hf_forward(model, ids, mask)
    assert_parity(run(fwd, ours, ids, mask), ref_logits, ref_router, valid=mask)


@pytest.mark.parametrize(
    "name,layout",
    [
        ("mixtral-gqa4-e7-k4-window", "fused"),
        ("qwen3-dense-step2-e5-k2", "per_expert"),
        ("olmoe-clip-norm-bias-e7-k3-fused", "per_expert"),
    ],
)
def test_save_round_trip_loads_in_transformers(saved, tmp_path, name, layout):
    model, _, ours, _ = saved(name)
    ids = random_ids(3)
    ref_logits, _ = hf_forward(model, ids)
    out_dir = hf.save(ours, tmp_path / "rt", expert_layout=layout, max_shard_bytes=64 * 1024)
    assert (out_dir / "model.safetensors.index.json").is_file()  # small shard size forces an index
    again = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    np.testing.assert_array_equal(hf_forward(again, ids)[0], ref_logits)


def test_moecxl_format_and_host_experts(saved, tmp_path):
    _, d, model, fwd = saved("qwen3-dense-step2-e5-k2")
    ids = random_ids(4)
    want = np.asarray(run(fwd, model, ids).logits)
    hf.save(model, tmp_path / "ours", format="moecxl")
    assert (tmp_path / "ours" / "moecxl.json").is_file()
    np.testing.assert_array_equal(np.asarray(run(fwd, hf.load(tmp_path / "ours"), ids).logits), want)
    host = hf.load(d, experts="host")
    w = host.layers[1].experts.w_gate_EDF[...]
    assert isinstance(w, np.ndarray) and w.ctypes.data % 64 == 0
    assert isinstance(host.layers[1].core.router_DE[...], jax.Array)
    np.testing.assert_array_equal(np.asarray(run(fwd, host, ids).logits), want)


def test_bfloat16_load(saved):
    model, d, f32, _ = saved("mixtral-gqa1-e3-k1")
    bf16 = hf.load(d, dtype="bfloat16")
    assert bf16.cfg.dtype == "bfloat16"
    assert bf16.layers[0].experts.w_up_EDF[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(bf16.embed_VD[...], np.float32),
        np.asarray(jnp.asarray(f32.embed_VD[...]).astype(jnp.bfloat16), np.float32),
    )


def test_config_round_trip(saved):
    for name in ("olmoe-clip-norm-bias-e7-k3-fused", "qwen3-window-bias-tied-e3-k3-fused"):
        model = saved(name)[0]
        cfg = hf.config_from_hf(model.config.to_dict())
        assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def test_switch_checkpoints_dispatch_to_hf_switch(tmp_path):
    pytest.importorskip("moecxl.model.hf_switch")
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=50,
        d_model=16,
        d_kv=4,
        d_ff=32,
        expert_capacity=8,
        num_layers=2,
        num_sparse_encoder_layers=1,
        num_decoder_layers=2,
        num_sparse_decoder_layers=1,
        num_heads=4,
        num_experts=3,
    )
    transformers.SwitchTransformersForConditionalGeneration(cfg).save_pretrained(tmp_path / "switch")
    model = hf.load(tmp_path / "switch")
    assert model.cfg.family == "switch"
    assert (hf.save(model, tmp_path / "again") / "config.json").is_file()
