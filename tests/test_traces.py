"""Router traces: schema round trip, prefill/decode provenance, resume, bad input, statistics."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import moecxl
from moecxl import traces
from moecxl.data import SplitSpec, save_tokenizer, train_tokenizer
from moecxl.generate import generate
from moecxl.model.hf import build_model, param_shapes
from moecxl.traces import TraceError, collect, read_traces
from tests.conftest import tiny_config

ALL_TRAIN = (1.0, 0.0, 0.0)
WORDS = [
    "the",
    "king",
    "spoke",
    "softly",
    "unto",
    "his",
    "loyal",
    "friend",
    "and",
    "the",
    "queen",
    "wept",
    "for",
    "her",
    "lost",
    "crown",
]
KW = dict(
    split="train",
    tokens=150,
    prompt_len=16,
    decode_tokens=3,
    decode_every=2,
    batch=2,
    shard_seqs=3,
    fractions=ALL_TRAIN,
    progress=lambda msg: None,
)


def _random_model(cfg):
    """A MoEDecoder with seeded random weights, built from numpy (eager NNX init compiles op by op)."""
    rng = np.random.default_rng(0)
    arrays = {
        name: np.ones(shape, np.float32) if "norm" in name else rng.normal(0, 0.2, shape).astype(np.float32)
        for name, shape in param_shapes(cfg).items()
    }
    return build_model(cfg, arrays)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prose + code corpus, a tokenizer trained on it, a tiny model saved with it."""
    root = tmp_path_factory.mktemp("traces")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (corpus_dir / f"prose{i}.txt").write_text(" ".join(rng.choice(WORDS, 120)) + "\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, name in enumerate(("textwrap.py", "bisect.py", "colorsys.py", "keyword.py")):
        (corpus_dir / f"code{i}.py").write_text((stdlib / name).read_text()[:1500])
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECXL_CACHE", str(root / "cache"))
    corpus = f"file:{corpus_dir}"
    tok = train_tokenizer(corpus, vocab_size=300, splits=SplitSpec(ALL_TRAIN))
    model = _random_model(tiny_config(vocab_size=300, num_experts=6, top_k=2))
    ckpt = root / "model"
    moecxl.save(model, ckpt)
    save_tokenizer(tok, ckpt / "tokenizer.json")
    out = collect(model, root / "full", corpus, tokenizer=tok, router_logits=True, sketch=4, **KW)
    yield dict(root=root, corpus=corpus, tok=tok, model=model, ckpt=ckpt, out=out)
    mp.undo()


def test_schema_round_trip(setup):
    ts = read_traces(setup["out"], require_complete=True)
    meta = ts.metadata
    assert (meta["L"], meta["E"], meta["K"], meta["P"]) == (2, 6, 2, 4)
    assert meta["schema_version"] == traces.SCHEMA_VERSION and meta["model"]["hash"] == traces.model_hash(
        setup["model"]
    )
    assert meta["tokenizer"]["hash"] and meta["moecxl_version"] == moecxl.__version__
    assert meta["num_rows"] == len(ts) >= KW["tokens"]
    N = len(ts)
    assert ts.expert_ids.shape == (N, 2, 2) and ts.expert_weights.shape == (N, 2, 2)
    assert ts.router_logits.shape == (N, 2, 6) and ts.hidden_sketch.shape == (N, 2, 4)
    assert ts.sketch_projection.shape == (32, 4)
    assert set(ts.domain) == {"prose", "code"}
    assert ((ts.expert_ids >= 0) & (ts.expert_ids < 6)).all()
    bounds = ts.seq_bounds()
    assert bounds[-1] == N and len(bounds) - 1 == meta["num_sequences"]
    ds = ts.dataset  # HF datasets view of the same rows
    assert ds.num_rows == N and ds.features["expert_ids"].length == 2
    assert ds[0]["phase"] == "prefill" and len(ds[0]["expert_ids"][0]) == 2


def test_prefill_routing_equals_model_forward(setup):
    ts = read_traces(setup["out"])
    model, proj = setup["model"], ts.sketch_projection
    sid, dec = ts.seq_id, ts.is_decode
    forward = nnx.jit(lambda m, ids: m(ids))  # model(ids), compiled once rather than op by op
    for s in (0, 1):
        rows = np.flatnonzero((sid == s) & ~dec)
        ids = ts.column("token_id")[rows]
        assert (ts.pos[rows] == np.arange(len(rows))).all()
        out = forward(model, ids[None].astype(np.int32))
        np.testing.assert_array_equal(ts.expert_ids[rows], np.stack(out.expert_ids, 2)[0])
        np.testing.assert_allclose(ts.expert_weights[rows], np.stack(out.expert_weights, 2)[0], atol=1e-5)
        np.testing.assert_allclose(ts.router_logits[rows], np.stack(out.router_logits, 2)[0], atol=1e-4)
        sketch = np.einsum("LTD,DP->TLP", np.stack(out.moe_inputs)[:, 0], proj)
        np.testing.assert_allclose(ts.hidden_sketch[rows], sketch, atol=1e-4)


def test_decode_rows_come_from_generate(setup):
    ts = read_traces(setup["out"])
    sid, dec, tok = ts.seq_id, ts.is_decode, ts.column("token_id")
    assert set(np.unique(sid[dec])) == set(range(0, ts.metadata["num_sequences"], 2))
    prompt = tok[(sid == 0) & ~dec]
    rows = np.flatnonzero((sid == 0) & dec)
    assert len(rows) == 3 and (ts.pos[rows] == len(prompt) + np.arange(3)).all()
    res = generate(setup["model"], prompt[None], max_new_tokens=4)
    np.testing.assert_array_equal(tok[rows], res.tokens[0, :3])
    T = len(prompt)
    np.testing.assert_array_equal(ts.expert_ids[rows], np.stack([a[0, T : T + 3] for a in res.expert_ids], 1))


def _rows(ts):
    t = ts.table
    return {c: t.column(c).to_pylist() for c in t.column_names}


def test_resume_after_interruption_gives_the_same_rows(setup):
    out = setup["root"] / "resumed"
    kw = dict(KW, tokenizer=setup["tok"])
    collect(setup["model"], out, setup["corpus"], router_logits=True, sketch=4, max_shards=1, **kw)
    part = read_traces(out)
    assert not part.metadata["complete"] and len(part.metadata["shards"]) == 1
    (out / ".shard-00001.parquet.tmp").write_bytes(b"half a shard")  # a crash mid-write
    collect(setup["model"], out, setup["corpus"], router_logits=True, sketch=4, **kw)
    collect(setup["model"], out, setup["corpus"], router_logits=True, sketch=4, **kw)  # complete: no-op
    full, resumed = read_traces(setup["out"]), read_traces(out, require_complete=True)
    assert _rows(resumed) == _rows(full)
    assert not list(out.glob(".shard-*"))


def test_append_with_other_model_shape_is_an_error(setup, tmp_path):
    # Traces of a 4-expert model in the directory; the checkpoint (loaded from its path) has 6.
    other = tmp_path / "other"
    shutil.copytree(setup["out"], other)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps(dict(meta, E=4)))
    with pytest.raises(TraceError, match=r"metadata.json: field 'E' is 4 .* model has 6"):
        collect(setup["ckpt"], other, setup["corpus"], router_logits=True, sketch=4, **KW)
    with pytest.raises(TraceError, match=r"field 'args.prompt_len'"):
        collect(
            setup["model"],
            setup["out"],
            setup["corpus"],
            tokenizer=setup["tok"],
            router_logits=True,
            sketch=4,
            **dict(KW, prompt_len=8),
        )


def test_corrupted_truncated_and_unknown_version_are_errors(setup, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(setup["out"], bad)
    shard = bad / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(TraceError, match="shard-00001.parquet: corrupted or truncated"):
        read_traces(bad)
    shard.unlink()
    with pytest.raises(TraceError, match=r"shard-00001.parquet'\] listed in metadata.json are missing"):
        read_traces(bad)
    meta = json.loads((bad / "metadata.json").read_text())
    (bad / "metadata.json").write_text(json.dumps(dict(meta, schema_version=99)))
    with pytest.raises(TraceError, match="metadata.json: field 'schema_version' is 99"):
        read_traces(bad)
    (bad / "metadata.json").unlink()
    with pytest.raises(TraceError, match="missing metadata"):
        read_traces(bad)


def test_stats_cli_writes_json_and_figures(setup, tmp_path):
    traces.main(["stats", str(setup["out"]), "--out", str(tmp_path)])
    s = json.loads((tmp_path / "stats.json").read_text())
    assert np.allclose(np.asarray(s["popularity"]).sum(1), 1)
    assert "code|prose" in s["domain_tv"] and len(s["layer_entropy"]) == 1 and len(s["temporal_entropy"]) == 2
    for name in (
        "popularity.png",
        "transitions.png",
        "entropy.png",
        "reuse_distance.png",
        "domain_popularity.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000


# ---- statistics on synthetic routing with known answers --------------------------------------------------


def test_entropy_known_answers():
    rng = np.random.default_rng(0)
    E, N = 8, 40_000
    a = rng.integers(0, E, (N, 1))
    chain = traces.routing_entropy(a, (a * 3 + 1) % E)  # deterministic (a permutation)
    assert chain["set"]["conditional"] == pytest.approx(0, abs=1e-9)
    assert chain["choice"]["marginal"] == pytest.approx(3, abs=0.02)
    indep = traces.routing_entropy(a, rng.integers(0, E, (N, 1)))
    assert indep["choice"]["conditional"] == pytest.approx(math.log2(E), abs=0.02)
    # top-2, b = a + 1: zero set entropy. Per choice, given one choice x at a, b's choice is x + 1 half the
    # time and the other (uniform over E - 1) + 1 otherwise: 0.5 + 0.5 log2(2 (E - 1)) bits.
    a2 = np.stack([rng.permutation(E)[:2] for _ in range(5000)])
    det2 = traces.routing_entropy(a2, (a2 + 1) % E)
    assert det2["set"]["conditional"] == pytest.approx(0, abs=1e-9)
    assert det2["choice"]["conditional"] == pytest.approx(0.5 + 0.5 * math.log2(2 * (E - 1)), abs=0.02)
    assert traces.entropy_bits(np.array([0, 0, 1, 1])) == pytest.approx(1)


def test_popularity_transitions_tv_and_reuse():
    ids = np.array([[[0], [1]], [[0], [1]], [[2], [3]], [[0], [-1]]])  # [N=4, L=2, K=1]
    pop = traces.popularity(ids, 4)
    np.testing.assert_allclose(pop, [[0.75, 0, 0.25, 0], [0, 2 / 3, 0, 1 / 3]])
    tr = traces.transition_matrix(ids[:, 0], ids[:, 1], 4)
    np.testing.assert_allclose(tr[0], [0, 1, 0, 0])
    np.testing.assert_allclose(tr[2], [0, 0, 0, 1])
    np.testing.assert_allclose(traces.tv_distance(pop, pop), 0)
    np.testing.assert_allclose(traces.tv_distance(np.eye(2), np.eye(2)[::-1]), 1)
    # one sequence alternating A, B, A, B and a second sequence reusing expert 5 every token
    ids_NK = np.array([[0], [1], [0], [1], [5], [5], [5]])
    seq = np.array([0, 0, 0, 0, 1, 1, 1])
    pos = np.array([0, 1, 2, 3, 0, 1, 2])
    d, first = traces.reuse_distances(ids_NK, seq, pos)
    assert sorted(d.tolist()) == [1, 1, 2, 2] and first == 3
    np.testing.assert_array_equal(traces.previous_token(seq, pos), [-1, 0, 1, 2, -1, 4, 5])


def test_plan_interleaves_domains_and_stops_at_budget():
    docs = [
        {"doc_id": "p", "domain": "prose", "input_ids": list(range(40))},
        {"doc_id": "c", "domain": "code", "input_ids": list(range(25))},
    ]
    plan = traces.plan_sequences(docs, prompt_len=10, total_rows=45, decode_tokens=5, decode_every=2)
    assert [s.domain for s in plan] == ["code", "prose", "code", "prose"]
    assert [len(s.ids) for s in plan] == [10, 10, 10, 10] and [s.decode for s in plan] == [1, 0, 1, 0]


@pytest.mark.slow
def test_switch_traces_encoder_then_decoder_layers(setup, tmp_path):
    from moecxl.config import ModelConfig
    from moecxl.model.switch import SwitchModel

    cfg = ModelConfig(
        family="switch",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        d_kv=8,
        num_experts=4,
        top_k=1,
        eos_token_id=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    out = collect(
        SwitchModel(cfg, rngs=nnx.Rngs(0)),
        tmp_path / "sw",
        setup["corpus"],
        tokenizer=setup["tok"],
        router_logits=True,
        **dict(KW, tokens=60),
    )
    ts = read_traces(out, require_complete=True)
    assert ts.metadata["layers"] == ["encoder.1", "encoder.3", "decoder.1", "decoder.3"]
    ids, dec = ts.expert_ids, ts.is_decode
    assert dec.any() and (ids[~dec][:, 2:] == -1).all() and (ids[~dec][:, :2] >= 0).all()
    assert (ids[dec][:, :2] == -1).all() and (ids[dec][:, 2:] >= 0).all()
    assert np.isnan(ts.router_logits[dec][:, :2]).all()
    assert traces.compute_stats(ts)["layer_entropy"][1] is None  # no token passes encoder.3 -> decoder.1


def test_paper_experiment_on_a_collected_trace_feeds_the_report(setup, tmp_path):
    """eval/simulate.py's experiment on a real (tiny) trace, every section, then the report reads it."""
    import yaml

    from moecxl.evaluation import report
    from moecxl.sim.experiments import load_results, run_experiment

    target = tmp_path / "wide.yaml"
    wide = dict(tiny_config(vocab_size=300, num_experts=6, top_k=2).to_dict(), name="tiny-wide")
    wide.update(hidden_size=4096, intermediate_size=14336, dtype="bfloat16")
    target.write_text(yaml.safe_dump({"model": wide}))
    exp = {
        "trace": str(setup["out"]),
        "predictor_model": str(setup["ckpt"]),
        "target": str(target),
        "device_budget": 0.75,  # 9 of 12 experts: a prefill needs all 6 of a layer + 2 in flight
        "requests": 1,
        "warmup_requests": 1,
        "library_sequences": 1,
        "policies": ["on_demand", "lru", "pregate", "oracle", "moecxl"],
        "headline": {
            "hardware": ["h100-pcie4-dram", "h100-cxl"],
            "baseline": {"hardware": "h100-pcie4-dram", "policy": "on_demand"},
        },
        "batch": {"batches": [1, 2], "runs": [["h100-cxl", "moecxl"]]},
        "long_context": {"prompt_tokens": [64], "runs": [["h100-cxl", "oracle"]]},
        "ablation": {"hardware": "h100-4cxl"},
        "failure": {"hardware": "h100-4cxl-faults", "policies": ["moecxl"]},
        "miss_handling": {"batches": [1, 2], "hardware": ["h100-pcie4-dram"]},
        "host_sensitivity": {"batches": [1], "hardware": ["h100-pcie4-dram"], "fractions": [0.25, 1.0]},
        "cost": {
            "hardware": "h100-cxl",
            "prices_usd": {
                "gpu": {"usd": 30000, "source": "test"},
                "cxl_per_gb": {"usd": 10, "source": "test"},
            },
        },
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    res = run_experiment(tmp_path / "exp.yaml", tmp_path / "results" / "sim")
    assert load_results(tmp_path / "results" / "sim" / "results.json")["git_commit"]
    head = res["sections"]["headline"]["rows"]
    assert set(head) == {f"{h}/{p}" for h in ("h100-pcie4-dram", "h100-cxl") for p in exp["policies"]}
    for key, r in head.items():
        assert r["tpot_s"] > 0 and r["batch"] == 1 and r["budget"] == 0.75, key
    for hw in ("h100-pcie4-dram", "h100-cxl"):
        assert head[f"{hw}/oracle"]["tpot_s"] <= head[f"{hw}/on_demand"]["tpot_s"]
    assert set(res["sections"]) == {
        "headline",
        "batch",
        "long_context",
        "ablation",
        "failure",
        "cost",
        "miss_handling",
        "host_sensitivity",
    }
    sens = res["sections"]["host_sensitivity"]["rows"]["1"]
    # a quarter of the host: the three-way run is no faster (the same routing, slower host work)
    slow, full = sens["h100-pcie4-dram/moecxl_nd@0.25"], sens["h100-pcie4-dram/moecxl_nd@1"]
    assert slow["host_mem_gbps"] == full["host_mem_gbps"] / 4 and slow["tpot_s"] >= full["tpot_s"] * 0.9999
    miss = res["sections"]["miss_handling"]["rows"]
    for b in ("1", "2"):
        got = {k.split("/")[1]: r for k, r in miss[b].items()}
        assert (
            got["host_only"]["miss_choices"]["fetch"] == 0 and got["fetch_only"]["miss_choices"]["host"] == 0
        )
        # the three-way decision picks the faster way per miss: never slower than both one-way variants
        assert (
            got["three_way"]["tpot_s"]
            <= max(got["host_only"]["tpot_s"], got["fetch_only"]["tpot_s"]) * 1.0001
        )
        assert all(r["energy_j_per_token"] > 0 for r in got.values())
    md = report.build(tmp_path / "results", tmp_path / "report").read_text()
    assert "## Paper-scale experiment (simulated)" in md and "| h100-cxl/moecxl |" in md
    assert "Ablation on h100-4cxl" in md and "Device failure on h100-4cxl-faults" in md
    assert "Beyond fetching: fetch-only, host-compute-only and the three-way miss decision" in md
    assert "Host sensitivity (simulated)" in md and "| 1 | h100-pcie4-dram | moecxl_nd |" in md
    cmp = report.paper_comparison(
        report.collect(tmp_path / "results"), report.Comparison("on_demand", "moecxl", "h100-pcie4-dram")
    )
    tpot = next(r for r in cmp if r["claim"].startswith("TPOT"))
    want = head["h100-pcie4-dram/on_demand"]["tpot_s"] / head["h100-cxl/moecxl"]["tpot_s"]
    assert tpot["label"] == "simulated" and tpot["ours"] == f"{want:.2f}x"


# ---- Switch: sketches of both stacks, pre-gating within a stack ------------------------------------------


@pytest.fixture(scope="module")
def switch_setup(setup):
    """A tiny Switch (3 + 3 sparse blocks, E=32 > the 16-token prompt, so prefill prefetch pre-gates rather
    than streaming whole layers) and its traces with sketches and router logits."""
    from moecxl.config import ModelConfig
    from moecxl.model.switch import SwitchModel

    cfg = ModelConfig(
        family="switch",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_layers=6,
        num_heads=4,
        num_kv_heads=4,
        d_kv=8,
        num_experts=32,
        top_k=1,
        eos_token_id=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    model = SwitchModel(cfg, rngs=nnx.Rngs(1))
    kw = dict(KW, tokens=100)
    out = collect(
        model,
        setup["root"] / "switch",
        setup["corpus"],
        tokenizer=setup["tok"],
        router_logits=True,
        sketch=4,
        **kw,
    )
    return dict(model=model, ts=read_traces(out, require_complete=True), Le=3)


def _switch_reference(model, ts, seq: int):
    """Rows and MoE inputs of one full-length sequence from the model's own forward pass (no trace code)."""
    from moecxl.model.switch import switch_forward

    sid, dec, tok = ts.seq_id, ts.is_decode, ts.column("token_id")
    enc_rows, dec_rows = np.flatnonzero((sid == seq) & ~dec), np.flatnonzero((sid == seq) & dec)
    assert len(enc_rows) == KW["prompt_len"] and len(dec_rows)  # no padding: the forward is the collection's
    out = switch_forward(model, tok[enc_rows][None], tok[dec_rows][None])
    x_enc = np.stack([np.asarray(x[0], np.float32) for x in out.encoder_moe_inputs])  # [Le, S, D]
    x_dec = np.stack([np.asarray(x[0], np.float32) for x in out.decoder_moe_inputs])  # [Ld, T, D]
    routers = [
        np.asarray(b.core.router_DE[...], np.float32)
        for stack in (model.encoder, model.decoder)
        for b in stack.layers
        if b.core.router_DE is not None
    ]
    return (enc_rows, x_enc), (dec_rows, x_dec), routers, out


@pytest.mark.slow
def test_switch_traces_carry_sketches_of_both_stacks(switch_setup):
    ts, model, Le = switch_setup["ts"], switch_setup["model"], switch_setup["Le"]
    meta, N = ts.metadata, len(ts)
    assert meta["layers"] == [f"{s}.{i}" for s in ("encoder", "decoder") for i in (1, 3, 5)]
    assert (meta["L"], meta["E"], meta["K"], meta["P"]) == (6, 32, 1, 4)
    sk, ids, dec = ts.hidden_sketch, ts.expert_ids, ts.is_decode
    assert sk.shape == (N, 6, 4) and ts.router_logits.shape == (N, 6, 32) and dec.any()
    passed = ids[..., 0] >= 0
    assert (passed[~dec, :Le]).all() and (passed[dec, Le:]).all() and not passed[~dec, Le:].any()
    assert np.isfinite(sk[passed]).all() and np.isnan(sk[~passed]).all()
    proj = ts.sketch_projection
    (enc_rows, x_enc), (dec_rows, x_dec), _, out = _switch_reference(model, ts, 0)
    np.testing.assert_allclose(sk[enc_rows, :Le], np.einsum("LSD,DP->SLP", x_enc, proj), atol=1e-4)
    np.testing.assert_allclose(sk[dec_rows, Le:], np.einsum("LTD,DP->TLP", x_dec, proj), atol=1e-4)
    lg_dec = np.stack([np.asarray(a[0]) for a in out.decoder_router_logits], axis=1)
    np.testing.assert_allclose(ts.router_logits[dec_rows, Le:], lg_dec, atol=1e-4)


@pytest.mark.slow
def test_switch_pregate_is_the_later_router_on_the_earlier_input_within_a_stack(switch_setup):
    from moecxl.sim.predict import pregate_tops_for_trace
    from predictor.data import gather, load_arrays, windows

    ts, model, Le = switch_setup["ts"], switch_setup["model"], switch_setup["Le"]
    H = 2
    tops = pregate_tops_for_trace(model, ts, H)  # [N, L, H, 1]
    tr = load_arrays(ts, ("current", "history", "sketch", "pregate"), horizon=H, model=model)
    assert tops.shape == (len(ts), 6, H, 1) and tr.pregate_NLGE.shape == (len(ts), 6, H + 1, 32)
    (enc_rows, x_enc), (dec_rows, x_dec), routers, _ = _switch_reference(model, ts, 0)
    for rows, x_nTD, lo in ((enc_rows, x_enc, 0), (dec_rows, x_dec, Le)):
        for j in range(3):
            for g in range(H + 1):
                pg = tr.pregate_NLGE[rows, lo + j, g].astype(np.float32)
                if j + g < 3:  # router of layer lo+j+g (same stack) on layer lo+j's MoE input
                    want = x_nTD[j] @ routers[lo + j + g]
                    np.testing.assert_allclose(pg, want, atol=2e-2, rtol=1e-2)
                    if g:
                        np.testing.assert_array_equal(tops[rows, lo + j, g - 1, 0], want.argmax(-1))
                else:  # across the encoder/decoder boundary, or past the last layer: none
                    assert (pg == 0).all()
                    if g:
                        assert (tops[rows, lo + j, g - 1] == -1).all()
    dec = ts.is_decode
    assert (tops[~dec, Le:] == -1).all() and (tops[dec, :Le] == -1).all()  # a stack the rows never pass
    n_W, l_W = windows(tr, np.arange(tr.N))  # the predictor's windows: sketch and pre-gate inputs, finite
    b = gather(tr, n_W, l_W, H, 2, ("current", "history", "sketch", "pregate"))
    assert b.sketch_WP.shape == (len(n_W), 4) and np.isfinite(b.sketch_WP).all()
    assert np.isfinite(b.pregate_WGE).all() and set(np.unique(l_W)) == {0, 1, 3, 4}


@pytest.mark.slow
def test_simulator_prefetches_on_a_switch_trace_within_stacks(switch_setup):
    """Pre-gate replay on a Switch trace: `pregate` issues prefetches, and a prefill (encoder) visit never
    prefetches a decoder layer (no pre-gate across the boundary: -1 ids cast no votes), a decode visit
    never an encoder layer. moecxl runs on the same predictions: its candidates reach the cost-benefit
    gate (which, with the simulator's layer time of a tenth of a copy, passes few on a cold short trace)."""
    from moecxl.memory import Hardware
    from moecxl.sim.costmodel import shape_of
    from moecxl.sim.predict import pregate_tops_for_trace
    from moecxl.sim.simulate import SimConfig, simulate
    from moecxl.sim.workload import requests_from_trace

    ts, model, Le = switch_setup["ts"], switch_setup["model"], switch_setup["Le"]
    tops = pregate_tops_for_trace(model, ts, 2)
    # Switch-Base widths (9.4 MB bfloat16 experts) on the tiny trace's routing.
    shape = shape_of(model.cfg.replace(hidden_size=768, intermediate_size=3072, dtype="bfloat16"))
    reqs = requests_from_trace(ts, shape, pregate_NLHK=tops)
    hw = Hardware.from_yaml("configs/hardware/h100-cxl.yaml")
    m, phases = {}, {}
    for policy in ("pregate", "moecxl"):
        res = simulate(reqs, shape, hw, SimConfig(policy=policy, device_budget=0.5, record_events=True))
        pre = [e for e in res.events if e["kind"] == "prefetch"]
        assert all(e["layer"] < Le for e in pre if e["phase"] == "prefill"), policy
        assert all(e["layer"] >= Le for e in pre if e["phase"] == "decode"), policy
        m[policy], phases[policy] = res.metrics, {e["phase"] for e in pre}
    assert phases["pregate"] == {"prefill", "decode"}  # both stacks pre-gated, so the checks above bite
    assert m["pregate"]["prefetch_issued"] > 0 and m["pregate"]["prefetch_used"] > 0
    assert m["moecxl"]["prefetch_issued"] + m["moecxl"]["gated_prefetches"] > 0
    # Warm (the same requests again after a warm-up pass): moecxl's gate lets prefetches through.
    warm = simulate(
        reqs * 4, shape, hw, SimConfig(policy="moecxl", device_budget=0.5, warmup_requests=len(reqs))
    )
    assert warm.metrics["prefetch_issued"] > 0
