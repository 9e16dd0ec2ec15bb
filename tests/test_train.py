"""moecxl.train: losses, a few steps lowering the loss, resume, NaN stop, export, shipped checkpoints.

Tiny models on a small synthetic file corpus (prose + code files), so the whole module runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moecxl
from moecxl import data
from moecxl.config import ModelConfig, TrainConfig
from moecxl.model import hf
from moecxl.train import (
    TrainingError,
    build_model,
    dense_config,
    load_balance_loss,
    load_config,
    param_counts,
    restore,
    router_z_loss,
    train,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = tuple(
    [
        "the",
        "king",
        "queen",
        "sword",
        "night",
        "love",
        "death",
        "crown",
        "river",
        "storm",
        "ghost",
        "speak",
        "heart",
        "wise",
        "fool",
    ]
)


def _prose(rng: np.random.Generator) -> str:
    lines = [" ".join(rng.choice(WORDS, size=8)).capitalize() + "." for _ in range(30)]
    return "\n".join(lines) + "\n"


def _code(rng: np.random.Generator, i: int) -> str:
    funcs = []
    for j in range(12):
        a, b = rng.integers(0, 9, size=2)
        funcs.append(f"def f_{i}_{j}(x, y={a}):\n    if x > {b}:\n        return x + y\n    return [y] * x\n")
    return "\n\n".join(funcs)


def _file_names(prefix: str, suffix: str) -> list[str]:
    """24 train files plus 2 validation and 2 test files of one domain (splits hash the file name)."""
    want = {"train": 24, "validation": 2, "test": 2}
    names = []
    for i in range(1000):
        name = f"{prefix}{i:03d}{suffix}"
        split = data.split_of(f"file:{name}")
        if want[split]:
            want[split] -= 1
            names.append(name)
    return names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Prose and code files with documents of both domains in every split."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name in _file_names("p", ".txt"):
        (root / name).write_text(_prose(rng))
    for i, name in enumerate(_file_names("c", ".py")):
        (root / name).write_text(_code(rng, i))
    return f"file:{root}"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOECXL_CACHE", str(tmp_path_factory.getbasetemp() / "moecxl-cache"))


TINY_MODEL = ModelConfig(
    family="mixtral",
    name="tiny",
    vocab_size=320,
    hidden_size=32,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=4,
    top_k=2,
    max_position_embeddings=256,
)


def tiny_train(corpus: str, **changes) -> TrainConfig:
    base = dict(
        corpus=corpus,
        vocab_size=320,
        seq_len=32,
        batch_size=4,
        steps=6,
        warmup_steps=1,
        learning_rate=1e-2,
        eval_every=3,
        eval_batches=1,
        test_batches=1,
        log_every=1,
        checkpoint_every=2,
    )
    return TrainConfig(**{**base, **changes})


def _arrays(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in hf.model_arrays(model).items()}


# ---- losses ---------------------------------------------------------------------------------------


def test_load_balance_is_one_for_uniform_routing():
    E, N = 8, 64
    logits_NE = jnp.zeros((N, E))  # P_e = 1/E
    ids_NK = jnp.stack([jnp.arange(N) % E, (jnp.arange(N) + 1) % E], axis=1)  # f_e = 1/E
    assert float(load_balance_loss(logits_NE, ids_NK)) == pytest.approx(1.0, abs=1e-6)
    # All tokens on one expert with a confident router: E times worse.
    peaked = jnp.zeros((N, E)).at[:, 0].set(30.0)
    ids = jnp.zeros((N, 1), jnp.int32)
    assert float(load_balance_loss(peaked, ids)) == pytest.approx(E, rel=1e-4)


def test_z_loss_nonnegative_and_grows_with_logit_scale():
    logits = jax.random.normal(jax.random.key(0), (16, 8))
    z1, z10 = float(router_z_loss(logits)), float(router_z_loss(10 * logits))
    assert z1 >= 0 and z10 > z1
    assert float(router_z_loss(jnp.full((4, 8), -math.log(8)))) == pytest.approx(0.0, abs=1e-10)


def test_dense_baseline_has_the_same_active_parameters():
    dense = dense_config(TINY_MODEL)
    assert (dense.num_experts, dense.top_k, dense.intermediate_size) == (1, 1, 2 * 32)
    moe = param_counts(TINY_MODEL, build_model(TINY_MODEL))
    den = param_counts(dense, build_model(dense))
    router = TINY_MODEL.num_moe_layers * TINY_MODEL.hidden_size * (TINY_MODEL.num_experts - 1)
    assert moe["active"] == den["active"] + router
    assert moe["total"] > den["total"]


# ---- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    metrics = train(TINY_MODEL, tiny_train(corpus), out, progress=False, command="test")
    return out, metrics


def test_steps_lower_the_loss_and_write_logs(full_run):
    out, metrics = full_run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["lm_loss"] < log[0]["lm_loss"]
    assert {"loss", "lm_loss", "aux", "z", "lr", "tokens_per_s"} <= set(log[0])
    assert "val_ppl" in log[2] and "val_ppl" in log[5]
    assert all(r["z"] >= 0 and r["aux"] >= 0.99 for r in log)  # E·Σ f·P >= 1 up to sampling noise
    assert metrics["steps"] == 6 and metrics["tokens"] == 6 * 4 * 32
    assert math.isfinite(metrics["final_val_ppl"]) and math.isfinite(metrics["test_ppl"])
    assert set(metrics["test_ppl_by_domain"]) == {"code", "prose"}
    assert metrics["params"]["active"] < metrics["params"]["total"]
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_export_loads_with_the_same_logits(full_run):
    out, _ = full_run
    trained = restore(out)
    loaded = moecxl.load(out / "final")
    assert loaded.cfg.num_experts == 4 and loaded.cfg.top_k == 2
    ids = jnp.asarray(np.arange(24).reshape(2, 12) % 300, jnp.int32)
    np.testing.assert_array_equal(np.asarray(trained(ids).logits), np.asarray(loaded(ids).logits))
    tok = data.load_tokenizer(out / "final" / "tokenizer.json")
    assert tok.decode(tok.encode("def f(x):\n    return x\n").ids) == "def f(x):\n    return x\n"
    assert (out / "final" / "metrics.json").is_file() and "test" in (out / "final" / "README.md").read_text()


def test_resume_equals_uninterrupted_run(full_run, corpus, tmp_path):
    out, _ = full_run
    tc = tiny_train(corpus)
    assert train(TINY_MODEL, tc, tmp_path, stop_after=3, progress=False) == {}  # "interrupted" at step 3
    resumed = train(TINY_MODEL, tc, tmp_path, resume=True, progress=False)
    assert resumed["steps"] == 6
    a, b = _arrays(moecxl.load(out / "final")), _arrays(moecxl.load(tmp_path / "final"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_config_is_an_error(full_run, corpus):
    out, _ = full_run
    with pytest.raises(TrainingError, match="train.learning_rate"):
        train(TINY_MODEL, tiny_train(corpus, learning_rate=0.5), out, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    # An absurd learning rate without warm-up blows the weights up within a few steps.
    tc = tiny_train(corpus, learning_rate=1e30, warmup_steps=0, checkpoint_every=1, grad_clip=1e30, steps=8)
    with pytest.raises(TrainingError, match="non-finite loss") as err:
        train(TINY_MODEL, tc, tmp_path, progress=False)
    msg = str(err.value)
    bad_step = int(msg.split(" at step ")[1].split()[0])
    good_step = int(msg.split("last good checkpoint: step ")[1].split()[0])
    assert good_step == bad_step - 1  # the state before the failing one, whose loss was finite
    model = restore(tmp_path)
    assert all(np.isfinite(v).all() for v in _arrays(model).values())
    assert not (tmp_path / "final").exists()


@pytest.mark.slow
def test_switch_prefix_lm_trains_and_exports(corpus, tmp_path):
    cfg = ModelConfig(
        family="switch",
        name="tiny-switch",
        vocab_size=320,
        hidden_size=32,
        intermediate_size=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_kv_heads=4,
        d_kv=8,
        num_experts=4,
        top_k=1,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    # T5 / Switch's recipe, as configs/models/switch-topology.yaml trains it.
    tc = dataclasses.replace(
        tiny_train(corpus), export_dtype="bfloat16", optimizer="adafactor", learning_rate=0.1
    )
    metrics = train(cfg, tc, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lm_loss"] < log[0]["lm_loss"]
    loaded = moecxl.load(tmp_path / "final")
    assert loaded.cfg.family == "switch" and loaded.cfg.dtype == "bfloat16"
    assert math.isfinite(metrics["test_ppl"])


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ValueError, match="train.optimizer: unknown 'sgd'"):
        TrainConfig(optimizer="sgd")


# ---- configs and shipped checkpoints --------------------------------------------------------------

TOPOLOGIES = {  # name: (family, decoder layers or encoder+decoder blocks, MoE layers, E, K)
    "mixtral-topology": ("mixtral", 32, 32, 8, 2),
    "custom-32e-top4": ("mixtral", 16, 16, 32, 4),
    "switch-topology": ("switch", 12 + 12, 12, 128, 1),
    "deepseek-topology": ("deepseek_v2", 12, 11, 64, 6),
    "deepseek-v3-topology": ("deepseek_v3", 8, 7, 256, 8),
}


def _topology(cfg: ModelConfig):
    layers = cfg.num_layers + (cfg.num_decoder_layers or 0 if cfg.family == "switch" else 0)
    return cfg.family, layers, cfg.num_moe_layers, cfg.num_experts, cfg.top_k


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_configs_keep_the_seed_topologies(name):
    cfg, tc = load_config(REPO / "configs" / "models" / f"{name}.yaml")
    assert _topology(cfg) == TOPOLOGIES[name]
    assert tc.corpus == "mixed" and tc.vocab_size == 4096 and tc.export_dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_shipped_checkpoints_load_with_their_topology(name):
    path = REPO / "models" / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not shipped")
    model = moecxl.load(path)
    assert _topology(model.cfg) == TOPOLOGIES[name]
    assert model.cfg.dtype == "bfloat16"
    assert data.load_tokenizer(path / "tokenizer.json").get_vocab_size() <= model.cfg.vocab_size
    metrics = json.loads((path / "metrics.json").read_text())
    assert math.isfinite(metrics["final_val_ppl"]) and "python -m moecxl.train" in metrics["command"]


def test_shipped_checkpoints_fit_the_size_budget():
    """Each shipped topology stays a small bf16 model (at most 15 MB) and all of them under 50 MB,
    so a clone stays light as families are added (five topologies: 7-13 MB each)."""
    root = REPO / "models"
    sizes = {
        d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        for d in (root.iterdir() if root.is_dir() else ())
        if d.is_dir()
    }
    assert all(n < 15_000_000 for n in sizes.values()), sizes
    assert sum(sizes.values()) < 50_000_000, sizes


@pytest.mark.parametrize(
    "path",
    [
        "configs/models/deepseek-topology.yaml",
        pytest.param("configs/models/deepseek-v3-topology.yaml", marks=pytest.mark.slow),
    ],
)
def test_a_shared_expert_model_s_dense_baseline_folds_the_shared_experts_in(path):
    """DeepSeek: the dense baseline's one FFN is (K + shared) x F wide, routed by a plain softmax (its
    one expert weighs 1, whatever the MoE's sigmoid scores, group limits and scaling), with the same
    active parameters as the MoE bar its routers."""
    from moecxl.config import ModelConfig

    cfg = ModelConfig.from_yaml(path).replace(num_layers=3, vocab_size=97)
    dense = dense_config(cfg)
    assert dense.n_shared_experts == 0 and dense.scoring_func == "softmax" and dense.topk_method == "greedy"
    assert dense.intermediate_size == (cfg.top_k + cfg.n_shared_experts) * cfg.intermediate_size
    moe = param_counts(cfg, build_model(cfg))
    den = param_counts(dense, build_model(dense))
    router = cfg.num_moe_layers * cfg.hidden_size * (cfg.num_experts - 1)
    bias = cfg.num_moe_layers * cfg.num_experts if cfg.topk_method == "noaux_tc" else 0  # V3 correction bias
    assert moe["active"] == den["active"] + router + bias
