"""The simulator replays the learned predictor from stored predictions (moecxl.sim.stored).

A tiny model generates; its routing becomes a trace; a small predictor (random, perturbed weights, so
every input path matters) is stored for every trace row by `train_predictor.py predict`. The engine runs
the same predictor live on a virtual clock, the simulator replays the file: at every visit the two give
the same candidates with the same probabilities, and take the same actions. Bad inputs (no file, another
trace set, another model shape, a longer horizon) are errors naming the file and the value.
"""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

import moecxl
import train_predictor
from moecxl import traces as T
from moecxl.generate import generate
from moecxl.memory import Hardware
from moecxl.model import MoEDecoder
from moecxl.runtime.engine import OffloadEngine
from moecxl.runtime.policies import get_policy
from moecxl.sim.costmodel import shape_of
from moecxl.sim.experiments import ExperimentError, _Ctx, run_experiment
from moecxl.sim.simulate import SimConfig, SimError, simulate
from moecxl.sim.stored import (
    StoredPredictions,
    StoredPredictionsError,
    learned_policy,
    predictions_path,
    save_predictions,
    trace_fingerprint,
)
from moecxl.sim.workload import requests_from_generate
from predictor.checkpoint import save_predictor
from predictor.live import LivePredictor
from predictor.model import PredictorConfig, init
from tests.conftest import tiny_config

L, E, K, H = 4, 6, 2, 2
COMPUTE_S, HEAD_S, SCALE = 2e-3, 1e-4, 0.05
NEW_TOKENS = 5
ACTIONS = ("hit", "fetch", "prefetch", "evict", "host_compute")


def _actions(events):
    return [
        (e["kind"], e.get("layer"), e.get("expert"), round(e["t_s"], 9))
        for e in events
        if e["kind"] in ACTIONS
    ]


def _write_trace(out, ref, prompt, model_meta: dict) -> None:
    """A trace directory (the schema `read_traces` checks) of a resident run: rows sequence-major, as
    `requests_from_generate` counts them."""
    B, T_p = prompt.shape
    ids_BSLK = np.stack([np.asarray(x) for x in ref.expert_ids], 2)
    w_BSLK = np.stack([np.asarray(x) for x in ref.expert_weights], 2)
    S = ids_BSLK.shape[1]
    tok_BS = np.concatenate([prompt, np.asarray(ref.tokens)[:, :-1]], 1)
    N = B * S
    feats = T.features(L, E, K, 0, False)
    rows = {
        "seq_id": np.repeat(np.arange(B), S).astype(np.int64),
        "pos": np.tile(np.arange(S), B).astype(np.int32),
        "token_id": tok_BS.reshape(N).astype(np.int32),
        "phase": np.where(np.tile(np.arange(S) >= T_p, B), "decode", "prefill").astype(object),
        "domain": np.full(N, "prose").astype(object),
        "doc_id": np.asarray([f"d{b}" for b in np.repeat(np.arange(B), S)], object),
        "expert_ids": ids_BSLK.reshape(N, L, K).astype(np.int16),
        "expert_weights": w_BSLK.reshape(N, L, K).astype(np.float32),
    }
    out.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(T.rows_table(rows, feats), out / "shard-00000.parquet")
    meta = {
        "schema_version": T.SCHEMA_VERSION,
        "model": model_meta,
        "corpus": "random",
        "split": "test",
        "L": L,
        "E": E,
        "K": K,
        "P": 0,
        "D": 32,
        "layers": [f"layers.{i}" for i in range(L)],
        "tokenizer": {"path": None, "hash": None, "vocab_size": 0},
        "moecxl_version": moecxl.__version__,
        "args": {},
        "columns": list(feats),
        "shards": [{"file": "shard-00000.parquet", "rows": N}],
        "num_sequences": B,
        "complete": True,
        "num_rows": N,
        "sketch": None,
    }
    (out / "metadata.json").write_text(json.dumps(meta))


def _predictor(path) -> None:
    """A small predictor with every parameter perturbed (a fresh one reads only the pre-gate)."""
    cfg = PredictorConfig(L, E, K, 0, H, 2, ("current", "history", "pregate"), 16, 2, 1, 2, 0)
    graphdef, params = init(cfg, seed=0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    net = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
    save_predictor(
        path, net, {"model": {"id": "tiny"}, "tokenizer": None, "sketch_DP": None, "traces": "tiny"}
    )


class _Recorder:
    """Forwards to a predictor and records its candidates per (phase, step, layer)."""

    def __init__(self, inner):
        self.inner, self.log = inner, {}
        self.path = getattr(inner, "path", None)

    def bind(self, model):
        self.inner.bind(model)

    def reset(self):
        self.inner.reset()

    def observe_visit(self, visit, features):
        if hasattr(self.inner, "observe_visit"):
            self.inner.observe_visit(visit, features)

    def candidates(self, visit, layers, features):
        out = self.inner.candidates(visit, layers, features)
        self.log[(visit.phase, visit.step, visit.layer)] = out
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("learned")
    cfg = tiny_config(num_layers=L, num_experts=E, top_k=K, vocab_size=64)
    model = MoEDecoder(cfg, rngs=nnx.Rngs(5))
    target = cfg.replace(hidden_size=4096, intermediate_size=14336, dtype="bfloat16", name="mixtral-width")
    _predictor(d / "predictor")
    moecxl.save(model, d / "model")
    model_meta = {"id": "tiny", "hash": T.model_hash(model), "path": str(d / "model"), "family": "mixtral"}
    runs = {}
    # batch 1 with a 2-token prompt (prefill consults the predictor: 2 tokens x top-2 < 6 experts), and a
    # batch of 2 (decode visits of two tokens each)
    for B, T_p in ((1, 2), (2, 5)):
        prompt = np.random.default_rng(B).integers(3, cfg.vocab_size, (B, T_p))
        ref = generate(model, prompt, max_new_tokens=NEW_TOKENS)
        _write_trace(d / f"trace-b{B}", ref, prompt, model_meta)
        train_predictor.main(
            ["predict", "--predictor", str(d / "predictor"), "--traces", str(d / f"trace-b{B}")]
        )
        runs[B] = (prompt, ref, d / f"trace-b{B}")
    return model, target, runs, d


def _both(setup, B, hw_name="configs/hardware/h100-cxl.yaml", budget=0.5):
    model, target, runs, d = setup
    prompt, ref, trace_dir = runs[B]
    hw = Hardware.from_yaml(hw_name)
    live = _Recorder(LivePredictor.load(d / "predictor"))
    eng = OffloadEngine(
        model,
        hardware=hw,
        policy="moecxl",
        device_budget=budget,
        time_scale=SCALE,
        target_model=target,
        record_events=True,
        predictor=live,
        clock="virtual",
        compute_s=COMPUTE_S,
        head_s=HEAD_S,
    )
    try:
        res = generate(model, prompt, max_new_tokens=NEW_TOKENS, engine=eng)
    finally:
        eng.close()
    shape = shape_of(target)
    stored = StoredPredictions.load(predictions_path(trace_dir), T.read_traces(trace_dir), shape)
    replay = _Recorder(stored)
    cfg = SimConfig(
        policy=learned_policy(get_policy("moecxl")),
        device_budget=budget,
        time_scale=SCALE,
        compute_s=COMPUTE_S,
        head_s=HEAD_S,
        record_events=True,
        placement="uniform",
    )
    sim = simulate(requests_from_generate(ref), shape, hw, cfg, predictor=replay)
    return live, replay, eng, res, sim


@pytest.mark.parametrize("B", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_replayed_candidates_equal_the_live_predictors(setup, B):
    live, replay, eng, res, sim = _both(setup, B)
    assert set(live.log) == set(replay.log) and len(live.log) >= (L - 1) * (NEW_TOKENS - 1)
    if B == 1:
        assert any(phase == "prefill" for phase, _, _ in live.log)  # the prefill visit consulted it too
    for at, want in live.log.items():
        got = replay.log[at]
        assert [k for k, _ in got] == [k for k, _ in want], at
        np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5, err_msg=str(at))
    assert _actions(eng.events) == _actions(sim.events)
    assert res.metrics["prefetch_issued"] == sim.metrics["prefetch_issued"] > 0
    assert (
        sim.metrics["predictor"].startswith("learned (") and "learned.safetensors" in sim.metrics["predictor"]
    )


def test_replay_rows_must_route_like_the_visit(setup):
    """A stored predictor handed the wrong rows (an off-by-one in the request cut) refuses them."""
    _, target, runs, _ = setup
    _, ref, trace_dir = runs[2]
    stored = StoredPredictions.load(predictions_path(trace_dir), T.read_traces(trace_dir), shape_of(target))
    req = requests_from_generate(ref)[0]
    j = next(i for i, v in enumerate(req.visits) if v.phase == "decode" and v.layer == 1)
    v = req.visits[j]
    assert stored.candidates(v, [2, 3], req.rows[j])
    wrong = next(r for r in req.rows if not np.array_equal(r, req.rows[j]) and r.size == req.rows[j].size)
    wrong_ids = np.unique(T.read_traces(trace_dir).expert_ids[wrong, 1])
    if tuple(wrong_ids) != v.experts:
        with pytest.raises(StoredPredictionsError, match="rows and visits disagree"):
            stored.candidates(v, [2, 3], wrong)
    with pytest.raises(StoredPredictionsError, match="without its trace rows"):
        stored.candidates(v, [2, 3], None)


# ------------------------------------------------------------------------------------------ bad input


def test_learned_policy_without_predictions_is_an_error(setup, tmp_path):
    _, target, runs, d = setup
    _, ref, trace_dir = runs[1]
    shape = shape_of(target)
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    cfg = SimConfig(policy=learned_policy(get_policy("moecxl")), device_budget=0.5)
    with pytest.raises(
        SimError, match="'moecxl_learned' prefetches from a learned predictor but none was given"
    ):
        simulate(requests_from_generate(ref), shape, hw, cfg)
    missing = tmp_path / "nothing" / "predictions" / "learned.safetensors"
    with pytest.raises(StoredPredictionsError, match=f"{missing}: no stored predictions"):
        StoredPredictions.load(missing)


def test_predictions_of_another_trace_set_or_shape_are_refused(setup, tmp_path):
    _, target, runs, _ = setup
    ts1, ts2 = T.read_traces(runs[1][2]), T.read_traces(runs[2][2])
    shape = shape_of(target)
    file1 = predictions_path(runs[1][2])
    with pytest.raises(StoredPredictionsError, match=f"{file1}: made for a trace set with rows="):
        StoredPredictions.load(file1, ts2)
    # same row count, other routing: the fingerprint tells them apart
    stored = StoredPredictions.load(file1)
    meta = json.loads(json.dumps(stored.meta))
    other = tmp_path / "other.safetensors"
    meta["traces"]["rows"] = len(ts2)
    p2 = np.zeros((len(ts2), L, H, E), np.float32)
    save_predictions(other, p2, {k: meta[k] for k in ("predictor", "traces")})
    with pytest.raises(
        StoredPredictionsError,
        match=f"{other}: made for trace set .* fingerprint {meta['traces']['fingerprint'][:16]}",
    ):
        StoredPredictions.load(other, ts2)
    assert trace_fingerprint(ts1) != trace_fingerprint(ts2)
    # another model shape, a policy looking further ahead than stored
    wide = shape_of(target.replace(num_experts=8))
    with pytest.raises(StoredPredictionsError, match=r"\(E: predictions 6, model 8\)"):
        StoredPredictions.load(file1, ts1, wide)
    s = StoredPredictions.load(file1, ts1, shape)
    with pytest.raises(
        StoredPredictionsError, match="stored horizon H=2, but the policy looks 3 layers ahead"
    ):
        s.check_shape(shape, horizon=3)
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    far = replace(learned_policy(get_policy("moecxl")), horizon=3)
    with pytest.raises(StoredPredictionsError, match="stored horizon H=2"):
        simulate(
            requests_from_generate(runs[1][1]),
            shape,
            hw,
            SimConfig(policy=far, device_budget=0.5),
            predictor=s,
        )
    # a file that is not stored predictions
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(StoredPredictionsError, match=f"{junk}: unreadable stored predictions"):
        StoredPredictions.load(junk)


# ------------------------------------------------------------------------------------------ experiments


def _experiment(setup, tmp_path, trace_dir, **kw) -> dict:
    _, target, _, d = setup
    tfile = tmp_path / "target.yaml"
    tfile.write_text(yaml.safe_dump({"model": target.to_dict()}))
    return {
        "trace": str(trace_dir),
        "predictor_model": str(d / "model"),
        "target": str(tfile),
        "device_budget": 0.5,
        "requests": 1,
        "warmup_requests": 0,
        "library_sequences": 1,
        "policies": ["on_demand", "moecxl"],
        "control": "idealised",
        **kw,
    }


def test_experiments_gain_a_learned_row_naming_predictor_and_file(setup, tmp_path):
    """Where the trace has stored predictions, moecxl_learned joins moecxl; the results name the file,
    the predictor checkpoint and its hash, and the control-plane source."""
    _, _, runs, d = setup
    trace_dir = runs[2][2]
    exp = _experiment(
        setup,
        tmp_path,
        trace_dir,
        headline={"hardware": ["h100-cxl"], "baseline": {"hardware": "h100-cxl", "policy": "on_demand"}},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    res = run_experiment(tmp_path / "exp.yaml", tmp_path / "out")
    rows = res["sections"]["headline"]["rows"]
    assert list(rows) == ["h100-cxl/on_demand", "h100-cxl/moecxl", "h100-cxl/moecxl_learned"]
    lp = res["learned_predictor"]
    assert lp["row"] == "moecxl_learned" and lp["file"] == str(predictions_path(trace_dir))
    assert lp["predictor"] == str((d / "predictor").absolute()) and len(lp["predictor_hash"]) == 64
    assert rows["h100-cxl/moecxl_learned"]["predictor"] == f"learned ({predictions_path(trace_dir)})"
    assert rows["h100-cxl/moecxl"]["predictor"] == "pregate"
    assert res["control"]["idealised"] and rows["h100-cxl/moecxl"]["control_s"] == 0.0


def test_an_experiment_asking_for_the_learned_row_needs_stored_predictions(setup, tmp_path):
    _, _, runs, _ = setup
    bare = tmp_path / "bare"  # the trace set without its predictions/
    bare.mkdir()
    for f in ("metadata.json", "shard-00000.parquet"):
        (bare / f).write_bytes((runs[2][2] / f).read_bytes())
    exp = _experiment(setup, tmp_path, bare, policies=["moecxl", "moecxl_learned"])
    with pytest.raises(ExperimentError, match=f"{bare / 'predictions' / 'learned.safetensors'}: no stored"):
        _Ctx(exp, tmp_path / "exp.yaml")
    named = tmp_path / "elsewhere.safetensors"
    with pytest.raises(ExperimentError, match=f"{named}: no stored predictions"):
        _Ctx({**exp, "policies": ["moecxl"], "learned_predictions": str(named)}, tmp_path / "exp.yaml")
    # predictions of another trace set named explicitly
    other = predictions_path(runs[1][2])
    with pytest.raises(ExperimentError, match=f"{other}: made for a trace set with rows="):
        _Ctx({**exp, "policies": ["moecxl"], "learned_predictions": str(other)}, tmp_path / "exp.yaml")
    # neither named nor listed: the learned row is left out, and the results say why
    ctx = _Ctx({**exp, "policies": ["moecxl"]}, tmp_path / "exp.yaml")
    assert ctx.learned is None and "no stored predictions at" in ctx.learned_note
    assert "moecxl_learned" not in ctx.policies
    with pytest.raises(ExperimentError, match="key 'control': .*no such config file"):
        _Ctx(
            {**exp, "policies": ["moecxl"], "control": "configs/control/nothing.yaml"}, tmp_path / "exp.yaml"
        )


def test_an_experiment_may_store_its_target_at_another_precision(setup, tmp_path):
    """`precision: {experts: int4}` quarters the bytes the simulator copies per expert, as the
    published cases store theirs; an unknown format names the key."""
    _, _, runs, _ = setup
    exp = _experiment(setup, tmp_path, runs[2][2], policies=["moecxl"])
    bf16 = _Ctx(exp, tmp_path / "exp.yaml").shape
    int4 = _Ctx({**exp, "precision": {"experts": "int4"}}, tmp_path / "exp.yaml").shape
    assert int4.expert_bytes < 0.3 * bf16.expert_bytes and int4.dense_bytes == bf16.dense_bytes
    tiled = _Ctx({**exp, "layer_map": "tile"}, tmp_path / "exp.yaml")  # a tiled trace: no per-layer replay
    assert tiled.learned is None and "layer_map 'tile'" in tiled.learned_note
    with pytest.raises(ExperimentError, match="key 'precision'.*int3"):
        _Ctx({**exp, "precision": {"experts": "int3"}}, tmp_path / "exp.yaml")
