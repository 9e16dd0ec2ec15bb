"""Expert predictor: windows and targets, metrics on hand-made cases, baselines, training (learns a
deterministic chain, stays near chance on random routing), resume, NaN stop, L/E/K refusal, the live hook,
and `train_predictor.py` end to end. Traces are synthetic (written directly) or from a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import moecxl
from moecxl import traces as T
from predictor import metrics as M
from predictor.baselines import fit_baselines
from predictor.checkpoint import PredictorError
from predictor.data import PredictorDataError, SplitSpec, gather, load_arrays, multi_hot, split_rows, windows
from predictor.live import LivePredictor
from predictor.model import loss_sum_count
from predictor.train import TrainConfig, TrainingDiverged, _pad_windows, _raw, load_config, train
from tests.test_traces import _random_model

L, E, K = 4, 8, 2
SMALL = dict(
    d_model=32,
    num_heads=2,
    num_blocks=1,
    batch_size=128,
    max_steps=160,
    eval_every=40,
    warmup_steps=10,
    learning_rate=1e-2,
    val_windows=1500,
    test_windows=1500,
    library_size=32,
    latency_repeats=0,
)


def write_traces(
    out: Path,
    ids_NLK,
    seq_N,
    pos_N,
    *,
    decode_N=None,
    domain_N=None,
    sketch_NLP=None,
    logits_NLE=None,
    model=None,
) -> Path:
    """A trace directory of the schema `read_traces` validates, from numpy columns."""
    out.mkdir(parents=True, exist_ok=True)
    N, L_, K_ = ids_NLK.shape
    E_ = int(logits_NLE.shape[-1]) if logits_NLE is not None else E
    P = 0 if sketch_NLP is None else sketch_NLP.shape[-1]
    feats = T.features(L_, E_, K_, P, logits_NLE is not None)
    decode_N = np.zeros(N, bool) if decode_N is None else decode_N
    rows = {
        "seq_id": seq_N.astype(np.int64),
        "pos": pos_N.astype(np.int32),
        "token_id": np.zeros(N, np.int32),
        "phase": np.where(decode_N, "decode", "prefill").astype(object),
        "domain": (np.full(N, "prose") if domain_N is None else domain_N).astype(object),
        "doc_id": np.asarray([f"d{s}" for s in seq_N], object),
        "expert_ids": ids_NLK.astype(np.int16),
        "expert_weights": np.full((N, L_, K_), 1.0 / K_, np.float32),
    }
    if logits_NLE is not None:
        rows["router_logits"] = logits_NLE
    if sketch_NLP is not None:
        rows["hidden_sketch"] = sketch_NLP
    import pyarrow.parquet as pq

    pq.write_table(T.rows_table(rows, feats), out / "shard-00000.parquet")
    D = 32
    meta = {
        "schema_version": T.SCHEMA_VERSION,
        "model": {"id": "synthetic", "hash": None, "path": None, "family": "mixtral"},
        "corpus": "synthetic",
        "split": "test",
        "L": L_,
        "E": E_,
        "K": K_,
        "P": P,
        "D": D,
        "layers": [f"layer.{i}" for i in range(L_)],
        "tokenizer": {"path": None, "hash": None, "vocab_size": 0},
        "moecxl_version": moecxl.__version__,
        "args": {},
        "columns": list(feats),
        "shards": [{"file": "shard-00000.parquet", "rows": N}],
        "num_sequences": int(len(np.unique(seq_N))),
        "complete": True,
        "num_rows": N,
        "sketch": {"P": P, "seed": 0, "projection_DP": T.sketch_projection(D, P).tolist()} if P else None,
    }
    if model is not None:
        meta["model"] = model
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


def synthetic(kind: str, seqs: int = 60, T_: int = 24, seed: int = 0, decode_every: int = 3):
    """Rows of `seqs` sequences. "chain": layer l+1's set is layer l's shifted by one (mod E), so layer 0
    determines every later layer; "random": every layer's set uniform and independent."""
    rng = np.random.default_rng(seed)
    N = seqs * T_
    first = np.stack([rng.choice(E, K, replace=False) for _ in range(N)])
    if kind == "chain":
        ids = np.stack([(first + l) % E for l in range(L)], axis=1)
    else:
        ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(N)]) for _ in range(L)], 1)
    seq = np.repeat(np.arange(seqs), T_)
    pos = np.tile(np.arange(T_), seqs)
    dec = (pos >= T_ - 4) & (seq % decode_every == 0)
    dom = np.where(seq % 2 == 0, "prose", "code")
    return ids.astype(np.int32), seq, pos, dec, dom


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    ids, seq, pos, dec, dom = synthetic("chain")
    rng = np.random.default_rng(1)
    sketch = rng.normal(size=(len(ids), L, 4)).astype(np.float32)
    return write_traces(
        tmp_path_factory.mktemp("chain"), ids, seq, pos, decode_N=dec, domain_N=dom, sketch_NLP=sketch
    )


@pytest.fixture(scope="module")
def chain_run(chain_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain_run")
    cfg = TrainConfig(
        features=("current", "history", "sketch"), **{**SMALL, "max_steps": 240, "latency_repeats": 3}
    )
    return out, train(chain_dir, out, cfg, progress=False)


# ---------------------------------------------------------------------------------------------- windows


def test_windows_and_targets(chain_dir):
    tr = load_arrays(chain_dir, ("current", "history", "sketch"))
    assert (tr.L, tr.E, tr.K, tr.P) == (L, E, K, 4)
    n, l = windows(tr, np.arange(tr.N))
    assert len(n) == tr.N * (L - 1) and l.max() == L - 2
    b = gather(tr, n, l, 4, 2, ("current", "history", "sketch"))
    for h in range(4):
        fut = l + h + 1
        ok = fut < L
        np.testing.assert_array_equal(b.target_ids_WHK[ok, h], tr.ids_NLK[n[ok], fut[ok]])
        assert (b.target_ids_WHK[~ok, h] == -1).all()
    np.testing.assert_array_equal(b.cur_ids_WCK[:, 0], tr.ids_NLK[n, l])
    assert (b.cur_ids_WCK[l == 0, 1] == -1).all()
    prev = tr.prev_N[n]
    w = np.flatnonzero((prev >= 0) & (l + 1 < L))
    np.testing.assert_array_equal(b.prev_ids_WHK[w, 0], tr.ids_NLK[prev[w], l[w] + 1])
    assert (b.prev_ids_WHK[prev < 0] == -1).all()
    live = gather(tr, n, l, 4, 2, ("current", "history"), history="decode")
    assert (live.prev_ids_WHK[~tr.decode_N[n]] == -1).all()
    np.testing.assert_array_equal(b.sketch_WP, tr.sketch_NLP[n, l])


def test_padded_windows_leave_the_loss_sum_and_count_unchanged(chain_dir):
    # Data-parallel training pads a batch to a multiple of the devices (tests/test_distributed.py runs it).
    tr = load_arrays(chain_dir, ("current",))
    n, l = windows(tr, np.arange(tr.N))
    raw = _raw(gather(tr, n[:5], l[:5], 4, 2, ("current",)))
    padded = _pad_windows(raw, 8)
    assert all(len(x) == 8 for x in padded) and (padded[-1][5:] == -1).all()
    assert _pad_windows(padded, 4) is padded
    logits_WHE = np.random.default_rng(0).normal(size=(8, 4, E)).astype(np.float32)

    def sum_count(ids_WHK, logits):
        return np.asarray(loss_sum_count(logits, multi_hot(ids_WHK, E), (ids_WHK >= 0).all(-1), 0.5))

    np.testing.assert_allclose(
        sum_count(padded[-1], logits_WHE), sum_count(raw[-1], logits_WHE[:5]), rtol=1e-6
    )


def test_splits_by_sequence_and_domain(chain_dir):
    tr = load_arrays(chain_dir, ("current",))
    s = split_rows(tr, SplitSpec((0.6, 0.2, 0.2)))
    seqs = [set(tr.seq_N[s[k]]) for k in ("train", "validation", "test")]
    assert not (seqs[0] & seqs[1]) and not (seqs[0] & seqs[2]) and sum(map(len, seqs)) == 60
    d = split_rows(tr, SplitSpec(test_domain="code"))
    assert set(tr.domain_N[d["test"]]) == {"code"} and set(tr.domain_N[d["train"]]) == {"prose"}
    with pytest.raises(PredictorDataError, match="'bible' not in"):
        split_rows(tr, SplitSpec(test_domain="bible"))
    with pytest.raises(PredictorDataError, match="split 'validation' is empty"):
        split_rows(tr, SplitSpec((1.0, 0.0, 0.0)))


def test_missing_columns_name_the_feature(tmp_path):
    ids, seq, pos, dec, _ = synthetic("random", seqs=4, T_=5)
    d = write_traces(tmp_path / "plain", ids, seq, pos, decode_N=dec)
    with pytest.raises(PredictorDataError, match="'sketch' needs trace column 'hidden_sketch'"):
        load_arrays(d, ("current", "sketch"))
    with pytest.raises(PredictorDataError, match="'pregate' needs the model.*model.path"):
        load_arrays(d, ("current", "pregate"))
    with pytest.raises(PredictorDataError, match="unknown feature"):
        load_arrays(d, ("telepathy",))


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_on_hand_made_cases():
    ids = np.array([[0, 1], [2, 3], [4, 5]])
    p = np.zeros((3, 8))
    p[0, [0, 1]] = 0.9  # exact
    p[1, [2, 6]] = 0.9  # one of two; 3 third best
    p[1, 3] = 0.5
    p[2, [6, 7]] = 0.9  # none in top 2; 4, 5 are next
    p[2, [4, 5]] = 0.4
    r = M.set_metrics(p, ids)
    assert r["exact"] == pytest.approx(1 / 3)
    assert r["recall@k"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["recall@2k"] == pytest.approx((1 + 1 + 1) / 3)
    # Perfectly calibrated bins: ECE 0; always 1 on a 50% event: ECE 0.5.
    assert M.ece(np.array([0.25] * 4), np.array([1, 0, 0, 0])) == pytest.approx(0.0)
    assert M.ece(np.ones(4), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    rel = M.reliability(np.array([0.05, 0.95]), np.array([0, 1]), bins=10)
    assert rel["count"][0] == 1 and rel["count"][9] == 1 and rel["ece"] == pytest.approx(0.05)
    p_NHE = np.stack([p, p], 1)
    ids_NHK = np.stack([ids, np.full_like(ids, -1)], 1)
    ev = M.evaluate(p_NHE, ids_NHK, np.array([False, True, False]))
    h1 = ev["horizons"]["1"]
    assert h1["n"] == 3 and h1["prefill"]["n"] == 2 and h1["decode"]["recall@k"] == 0.5
    assert ev["horizons"]["2"]["n"] == 0 and "4" not in ev["horizons"]


# -------------------------------------------------------------------------------------------- baselines


def test_baselines_interface_and_chain(chain_dir):
    tr = load_arrays(chain_dir, ("current", "history"))
    s = split_rows(tr, SplitSpec())
    bl = fit_baselines(tr, s["train"], 4, library_size=16)
    assert set(bl) == {"global_freq", "layer_freq", "markov", "temporal", "moe_infinity", "oracle"}
    n, l = windows(tr, s["test"])
    b = gather(tr, n, l, 4, 1, ())
    for name, pred in bl.items():
        p = pred.predict(tr, n, l)
        assert p.shape == (len(n), 4, E) and (p >= 0).all() and (p <= 1).all(), name
        ev = M.evaluate(p, b.target_ids_WHK, b.decode_W)
        if name in ("markov", "oracle"):
            assert (
                ev["horizons"]["1"]["recall@k"] == pytest.approx(1.0) and ev["horizons"]["2"]["exact"] == 1.0
            )


# --------------------------------------------------------------------------------------------- training


def test_learns_the_chain_with_falling_validation_loss(chain_run):
    out, rep = chain_run
    hist = rep["training"]["history"]
    assert hist[-1]["val_loss"] < 0.6 * hist[0]["val_loss"]
    assert rep["summary"]["learned"]["1"]["recall@k"] >= 0.95
    assert set(rep["results"]) >= {"learned", "learned_live", "markov", "temporal", "moe_infinity", "oracle"}
    assert (out / "reliability.png").is_file() and (out / "predictor" / "predictor.json").is_file()
    cost = rep["cost"]
    assert cost["flops_per_token_layer"] > 0 and cost["under_budget"] and cost["cpu_latency_us_W1"] > 0


def test_listwise_term_is_the_softmax_cross_entropy_against_the_spread_set():
    rng = np.random.default_rng(0)
    logits_WHE = rng.normal(size=(6, 3, E)).astype(np.float32)
    ids_WHK = rng.integers(0, E, (6, 3, K))
    ids_WHK[0, 0] = -1  # an invalid pair: outside both sums
    t_WHE, valid_WH = multi_hot(ids_WHK, E), (ids_WHK >= 0).all(-1)
    base, n = map(float, loss_sum_count(logits_WHE, t_WHE, valid_WH))
    both, n2 = map(float, loss_sum_count(logits_WHE, t_WHE, valid_WH, 0.5))
    log_p = logits_WHE - np.log(np.exp(logits_WHE).sum(-1, keepdims=True))
    ce_WH = -(t_WHE / t_WHE.sum(-1, keepdims=True).clip(1) * log_p).sum(-1)
    assert n == n2 == valid_WH.sum()
    np.testing.assert_allclose(both - base, 0.5 * ce_WH[valid_WH].sum(), rtol=1e-5)


def test_direct_path_carries_the_sketch_to_every_horizon_and_is_counted():
    """The direct path (an MLP from layer l's sketch, routing and layer to each future layer's token) is
    part of the forward and of the FLOP count; without a sketch, or with direct_mult 0, it is absent."""
    import dataclasses

    import jax
    from flax import nnx

    from predictor.model import ExpertPredictor, PredictorConfig, encode, flops_per_window, init

    cfg = PredictorConfig(
        L=L, E=E, K=K, P=4, H=2, C=2, features=("current", "sketch"), d_model=16, direct_mult=4
    )
    graphdef, params = init(cfg)
    params["head"]["kernel"].value = np.random.default_rng(0).normal(size=(16, E)).astype(np.float32)
    W = 3
    x = encode(
        np.ones(W, np.int32),
        np.zeros((W, cfg.C, K), np.int32),
        np.full((W, cfg.C, K), 0.5),
        np.full((W, cfg.H, K), -1),
        np.zeros((W, cfg.H + 1, E)),
        np.random.default_rng(1).normal(size=(W, cfg.P)),
        E,
        False,
    )
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(x))
    with_path = np.asarray(forward(params))
    for name in ("kernel", "bias"):
        params["direct"]["out"][name].value = np.zeros_like(params["direct"]["out"][name].value)
    without = np.asarray(forward(params))
    assert (np.abs(with_path - without).max(-1) > 1e-4).all()  # every window and horizon
    off = dataclasses.replace(cfg, direct_mult=0)
    assert nnx.eval_shape(lambda: ExpertPredictor(off, rngs=nnx.Rngs(0))).direct is None
    no_sketch = dataclasses.replace(cfg, P=0)
    assert nnx.eval_shape(lambda: ExpertPredictor(no_sketch, rngs=nnx.Rngs(0))).direct is None
    assert flops_per_window(cfg) > flops_per_window(off)


@pytest.mark.slow
def test_direct_path_predictor_learns_a_nonlinear_map_from_the_sketch(tmp_path):
    """Layer l+1's expert is the sign pattern of three projections of layer l's sketch (an XOR of two
    signs among them: not linearly separable), as where the next router sees a hidden state two blocks
    on; the current routing says nothing (Markov stays low). The predictor with the direct path and the
    listwise term learns it."""
    rng = np.random.default_rng(5)
    seqs, T_, P = 80, 24, 6
    N = seqs * T_
    sketch = rng.normal(size=(N, L, P)).astype(np.float32)
    proj = rng.normal(size=(L, P, 3))
    bits = np.einsum("NLP,LPB->NLB", sketch, proj) > 0
    nxt = bits[..., 0] * 4 + (bits[..., 1] ^ bits[..., 2]) * 2 + bits[..., 1]  # expert at l + 1
    ids = np.full((N, L, 1), 0, np.int32)
    ids[:, 0, 0] = rng.integers(0, E, N)
    ids[:, 1:, 0] = nxt[:, :-1]
    seq = np.repeat(np.arange(seqs), T_)
    pos = np.tile(np.arange(T_), seqs)
    d = write_traces(tmp_path / "xor", ids, seq, pos, sketch_NLP=sketch)
    small = {
        **SMALL,
        "horizon": 1,
        "direct_mult": 4,
        "listwise_weight": 1.0,
        "max_steps": 300,
        "eval_every": 100,
    }
    rep = train(d, tmp_path / "out", TrainConfig(features=("current", "sketch"), **small), progress=False)
    assert rep["summary"]["learned"]["1"]["recall@k"] >= 0.85
    assert rep["summary"]["markov"]["1"]["recall@k"] < 0.5


@pytest.mark.slow
def test_random_routing_stays_near_chance(tmp_path):
    ids, seq, pos, dec, _ = synthetic("random", seqs=40, T_=20, seed=3)
    d = write_traces(tmp_path / "rand", ids, seq, pos, decode_N=dec)
    cfg = TrainConfig(features=("current",), **{**SMALL, "max_steps": 40, "eval_every": 20})
    rep = train(d, tmp_path / "out", cfg, progress=False)
    for h in ("1", "2"):  # L = 4: no layer l has an l + 4
        assert abs(rep["summary"]["learned"][h]["recall@k"] - K / E) < 0.08


@pytest.mark.slow
def test_resume_then_nan_stops_with_an_error_keeping_the_last_good_checkpoint(
    chain_dir, tmp_path, monkeypatch
):
    import dataclasses

    import predictor.train as pt

    out = tmp_path / "nan"
    kw = {**SMALL, "max_steps": 40, "eval_every": 20}
    first = train(
        chain_dir, out, TrainConfig(features=("current",), **kw), progress=False
    )  # compiled already
    assert (out / "checkpoints" / "40").is_dir() and first["training"]["step"] == 40
    with pytest.raises(PredictorError, match="other \\['config'"):
        train(chain_dir, out, TrainConfig(features=("current", "history"), **kw), progress=False)
    monkeypatch.setattr(
        pt,
        "gather",
        lambda *a, **k: (lambda b: dataclasses.replace(b, cur_w_WCK=b.cur_w_WCK * np.nan))(gather(*a, **k)),
    )
    before = (out / "predictor" / "predictor.json").read_text()
    longer = TrainConfig(features=("current",), **{**kw, "max_steps": 80})
    with pytest.raises(TrainingDiverged, match="step 41.*checkpoints/40"):  # resumed at 40, not from 0
        train(chain_dir, out, longer, progress=False)
    assert (out / "checkpoints" / "40").is_dir() and not (out / "checkpoints" / "60").exists()
    assert (out / "predictor" / "predictor.json").read_text() == before


def test_config_errors_name_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("horizon: 2\nlearning_rat: 0.1\n")
    with pytest.raises(PredictorError, match="c.yaml.*learning_rat"):
        load_config(f)
    for cfg in Path(__file__).parents[1].glob("configs/predictor/*.yaml"):
        load_config(cfg)


# ------------------------------------------------------------------------------------------------- live


def test_live_predictor_refuses_other_shapes_and_does_not_retrace(chain_run, tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(num_experts=E, top_k=K, num_layers=L)
    model = _random_model(cfg)
    lp = LivePredictor.load(chain_run[0] / "predictor")
    assert lp.sketch_DP.shape == (32, 4)
    lp.check(cfg)
    with pytest.raises(PredictorError, match="E: predictor 8, model .* 5"):
        lp.check(tiny_config(num_layers=L))
    with pytest.raises(PredictorError, match="not a predictor checkpoint"):
        LivePredictor.load(tmp_path)
    from predictor.live import _live_probs

    lp.bind(model)
    engine = SimpleNamespace(phase="prefill", step=0)
    rng = np.random.default_rng(0)

    def visit(m):
        return SimpleNamespace(phase=engine.phase, step=engine.step, layer=m)

    def co(T_):
        ids_BTK = np.stack([rng.choice(E, K, replace=False) for _ in range(T_)])[None]
        return SimpleNamespace(
            xn_BTD=rng.normal(size=(1, T_, 32)).astype(np.float32),
            ids_BTK=ids_BTK,
            weights_BTK=np.full((1, T_, K), 0.5),
        )

    for m in range(L):
        cands = lp.candidates(visit(m), [m + 1, m + 2], co(6))
        assert all(m < layer <= m + 2 for (layer, _), _ in cands)
        assert [p for _, p in cands] == sorted((p for _, p in cands), reverse=True)
    size = _live_probs._cache_size()
    for step in range(1, 4):
        engine.phase, engine.step = "decode", step
        for m in range(L):
            lp.candidates(visit(m), [m + 1], co(1))
            if m == 0 and step > 1:
                assert lp._prev[1] is not None  # the previous token's routing is history now
    assert _live_probs._cache_size() <= size + 1  # one trace for decode, none per token or layer


# --------------------------------------------------------------------------------- pre-gate, end to end


@pytest.mark.slow
def test_pregate_from_a_model_and_train_predictor_cli(tmp_path, capsys):
    """Traces written from a tiny model's own forward: pre-gate g=0 equals the router logits; another
    model is refused; `train_predictor.py` writes metrics.json with every baseline, pre-gating included."""
    import jax

    import train_predictor
    from tests.conftest import tiny_config

    cfg = tiny_config(num_experts=E, top_k=K, num_layers=L, vocab_size=64)
    model = _random_model(cfg)
    ckpt = tmp_path / "model"
    moecxl.save(model, ckpt)
    seqs, T_ = 24, 12
    tok = np.random.default_rng(0).integers(3, 64, (seqs, T_)).astype(np.int32)
    out = jax.jit(lambda ids: model(ids))(tok)
    ids = np.stack(out.expert_ids, 2).reshape(-1, L, K)
    logits = np.stack(out.router_logits, 2).reshape(-1, L, E).astype(np.float32)
    seq, pos = np.repeat(np.arange(seqs), T_), np.tile(np.arange(T_), seqs)
    meta = {"id": "tiny", "hash": T.model_hash(model), "path": str(ckpt), "family": "mixtral"}
    d = write_traces(tmp_path / "tr", ids, seq, pos, logits_NLE=logits, model=meta)
    import pyarrow.parquet as pq

    t = pq.read_table(d / "shard-00000.parquet")
    pq.write_table(t.set_column(2, "token_id", [tok.reshape(-1)]), d / "shard-00000.parquet")
    tr = load_arrays(d, ("current", "pregate"), horizon=2)
    np.testing.assert_allclose(tr.pregate_NLGE[:, :, 0], logits, atol=2e-2)
    other = _random_model(tiny_config(num_experts=E, top_k=K, num_layers=L, vocab_size=64, hidden_size=48))
    with pytest.raises(PredictorDataError, match="another model"):
        load_arrays(d, ("current", "pregate"), model=other)
    conf = tmp_path / "c.yaml"
    conf.write_text(
        json.dumps(
            {**SMALL, "features": ["current", "history", "pregate"], "max_steps": 10, "eval_every": 10}
        )
    )
    train_predictor.main(
        ["--traces", str(d), "--out", str(tmp_path / "run"), "--config", str(conf), "--no-progress"]
    )
    rep = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {
        "learned",
        "pregate",
        "markov",
        "temporal",
        "moe_infinity",
        "layer_freq",
        "global_freq",
        "oracle",
    } <= set(rep["results"])
    for r in rep["results"].values():
        assert {"exact", "recall@k", "recall@2k", "prefill", "decode", "ece"} <= set(r["horizons"]["1"])
    assert "summary" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*no such trace directory"):
        train_predictor.main(["--traces", str(tmp_path / "nothing")])
