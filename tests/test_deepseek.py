"""DeepSeek-V2 / V3 against transformers on tiny checkpoints the test builds: MLA (compressed KV cache),
shared experts, leading dense layers, V2 greedy / group-limited and V3 noaux_tc routing, yarn rope.

Each case builds a transformers model from a small config, scales its random weights up (so routing is
decisive and a transposed matrix cannot hide), saves it per expert or fused, loads it with moecxl and
compares logits and router logits (float32, relative 1e-4), greedy generation, and offloading.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moecxl.config import ConfigError, ModelConfig  # noqa: E402
from moecxl.generate import generate  # noqa: E402
from moecxl.model import hf  # noqa: E402
from moecxl.model.safetensors_io import CheckpointError  # noqa: E402
from moecxl.runtime.engine import OffloadEngine  # noqa: E402
from moecxl.sim.costmodel import load_shape  # noqa: E402
from tests.test_hf_parity import assert_parity, hf_forward, jitted_forward, rel_err, run  # noqa: E402

SMALL = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=12,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    max_position_embeddings=64,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    mscale=0.707,
    mscale_all_dim=0.9,
    beta_fast=32,
    beta_slow=1,
)
# name -> (class prefix, config overrides, fused layout on disk)
CASES = {
    "v2-greedy-qdirect-dense1-shared2": (
        "DeepseekV2",
        dict(
            q_lora_rank=None,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="greedy",
            num_hidden_layers=3,
        ),
        False,
    ),
    "v2-group-qlora-shared1-fused": (
        "DeepseekV2",
        dict(
            q_lora_rank=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            first_k_dense_replace=0,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
        True,
    ),
    "v3-noaux-bias-qlora-dense1": (
        "DeepseekV3",
        dict(
            q_lora_rank=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            num_hidden_layers=3,
        ),
        False,
    ),
    "v3-yarn-plain-rope-shared2-fused": (
        "DeepseekV3",
        dict(
            q_lora_rank=None,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=0,
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            rope_interleave=False,
            rope_parameters=YARN,
        ),
        True,
    ),
}


def build_hf(prefix: str, overrides: dict, seed: int = 0):
    """A tiny transformers DeepSeek with O(1) weights and, for V3, a non-zero score correction bias."""
    kw = {**SMALL, **overrides}
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}Config")(**kw)
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Lazily build, save and load each case once: name -> (hf_model, dir, our_model, jitted forward)."""
    cache = {}

    def get(name):
        if name not in cache:
            prefix, overrides, fused = CASES[name]
            model = build_hf(prefix, overrides)
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d, save_original_format=not fused)
            ours = hf.load(d)
            cache[name] = (model, d, ours, jitted_forward(ours))
        return cache[name]

    return get


def random_ids(seed: int, T: int = 8):
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (2, T))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_router_logits_match(saved, name):
    model, _, ours, fwd = saved(name)
    ids = random_ids(1)
    ref_logits, ref_router = hf_forward(model, ids)
    assert ours.cfg.family == model.config.model_type
    assert len(ours.cfg.moe_layers) == len(ref_router)
    assert_parity(run(fwd, ours, ids), ref_logits, ref_router)


def test_routing_is_decisive_and_groups_bind(saved):
    """The cases exercise what they claim: V3's bias changes choices; group limits exclude experts."""
    _, _, ours, fwd = saved("v3-noaux-bias-qlora-dense1")
    out = run(fwd, ours, random_ids(5, 16))
    bias = np.asarray(ours.layers[1].core.router_bias_E[...])
    assert np.abs(bias).max() > 0.1
    scores = 1 / (1 + np.exp(-np.asarray(out.router_logits[0], np.float64)))
    unbiased_top = np.argsort(-scores, axis=-1)[..., :2]
    ids = np.sort(np.asarray(out.expert_ids[0]), -1)
    assert (np.sort(unbiased_top, -1) != ids).any()  # the bias (or the group limit) moved some choice


@pytest.mark.parametrize("name", ["v2-greedy-qdirect-dense1-shared2", "v3-yarn-plain-rope-shared2-fused"])
def test_greedy_generation_matches_transformers(saved, name):
    model, _, ours, _ = saved(name)
    prompt = random_ids(2, 6)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None
        ).numpy()[:, 6:]
    res = generate(ours, prompt, max_new_tokens=5)
    np.testing.assert_array_equal(res.tokens, ref)
    # Decode reads the compressed cache: latent [C] + roped shared key [R] per token, not per-head K/V.
    assert ours.cfg.kv_elems_per_token == SMALL["kv_lora_rank"] + SMALL["qk_rope_head_dim"]


@pytest.mark.parametrize("name", ["v2-group-qlora-shared1-fused", "v3-noaux-bias-qlora-dense1"])
def test_offloaded_generation_is_bit_identical(saved, name):
    _, _, ours, _ = saved(name)
    prompt = random_ids(3, 5)
    ref = generate(ours, prompt, max_new_tokens=6)
    eng = OffloadEngine(ours, policy="lru", device_budget=0.5, emulate=False, record_events=True)
    try:
        res = generate(ours, prompt, max_new_tokens=6, engine=eng)
    finally:
        eng.close()
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    np.testing.assert_array_equal(res.logits, ref.logits)
    assert res.metrics["misses"] > 0
    # Shared experts are not the runtime's: its budget counts routed experts only.
    assert all(ev["device_expert_bytes"] <= eng.budget_bytes for ev in eng.events)
    assert eng.budget_bytes < ours.cfg.num_moe_layers * ours.cfg.num_experts * ours.cfg.expert_bytes


def test_save_round_trip_loads_in_transformers(saved, tmp_path):
    for name, layout in (
        ("v3-noaux-bias-qlora-dense1", "fused"),
        ("v2-group-qlora-shared1-fused", "per_expert"),
    ):
        model, _, ours, _ = saved(name)
        ids = random_ids(4)
        out_dir = hf.save(ours, tmp_path / name, expert_layout=layout)
        again = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
        assert rel_err(hf_forward(again, ids)[0], hf_forward(model, ids)[0]) < 1e-6
        assert hf.config_from_hf(hf.config_to_hf(ours.cfg)) == ours.cfg.replace(name="")


def _config_json(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    return cfg


def test_bad_rope_scaling_and_routing_name_the_field(saved):
    _, d, _, _ = saved("v2-greedy-qdirect-dense1-shared2")
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(CheckpointError, match="rope_parameters.*'linear'"):
        hf.config_from_hf(_config_json(d, rope_parameters=linear))
    with pytest.raises(CheckpointError, match="rope_scaling.*'dynamic'"):
        hf.config_from_hf(
            _config_json(d, rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2})
        )
    with pytest.raises(CheckpointError, match="topk_method='noaux_tc'"):
        hf.config_from_hf(_config_json(d, topk_method="noaux_tc"))
    with pytest.raises(ConfigError, match="topk_method"):
        ModelConfig(family="deepseek_v2", topk_method="best")
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig(family="deepseek_v3", scoring_func="tanh")
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig(family="deepseek_v3", rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig(family="deepseek_v2", topk_method="group_limited_greedy", num_experts=8, n_group=3)


def test_missing_shared_expert_keys_name_file_and_key(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, d, _, _ = saved("v2-greedy-qdirect-dense1-shared2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    key = "model.layers.2.mlp.shared_experts.up_proj.weight"
    del tensors[key]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors: missing tensor '{key}'.*n_shared_experts=2"
    ):
        hf.load(bad)


@pytest.mark.parametrize(
    "name,layers,experts,shared_params,expert_mb",
    [
        ("deepseek-v2-lite", 26, 64, 2 * 3 * 2048 * 1408, 3 * 2048 * 1408 * 2 / 2**20),
        ("deepseek-v3", 58, 256, 3 * 7168 * 2048, 3 * 7168 * 2048 * 2 / 2**20),
    ],
)
def test_real_model_configs_load_with_their_shapes(name, layers, experts, shared_params, expert_mb):
    path = f"configs/models/{name}.yaml"
    cfg = ModelConfig.from_yaml(path)
    assert cfg.num_moe_layers == layers and cfg.num_experts == experts
    assert cfg.expert_bytes / 2**20 == pytest.approx(expert_mb)
    assert cfg.shared_expert_params == shared_params
    shape = load_shape(path)
    assert shape.kv_elems_per_token == 512 + 64  # MLA's compressed row, not 2·H·Dh
    assert shape.expert_bytes == cfg.expert_bytes
    assert shape.dense_linear_params > shape.attn_params + shared_params  # shared experts counted, resident


def test_bfloat16_load_routes_in_float32(saved):
    """As transformers does for DeepSeek: gate weight and hidden state upcast, router logits float32."""
    _, d, f32, fwd32 = saved("v2-greedy-qdirect-dense1-shared2")
    bf16 = hf.load(d, dtype="bfloat16")
    ids = random_ids(6)
    out = run(jitted_forward(bf16), bf16, ids)
    assert bf16.layers[1].core.router_DE[...].dtype == np.dtype("bfloat16")
    assert out.router_logits[0].dtype == np.float32
    assert rel_err(out.router_logits[0], np.asarray(run(fwd32, f32, ids).router_logits[0])) < 0.05
