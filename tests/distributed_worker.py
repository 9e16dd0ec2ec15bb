"""Subprocess side of tests/test_distributed.py (forced CPU devices must not leak into other tests).

`python -m tests.distributed_worker devices OUT.json`: 8 forced devices, every single-process check.
`python -m tests.distributed_worker host PORT PID NPROC OUT.json [--timeout S]`: one process of a
multi-process run on 127.0.0.1:PORT, 2 forced CPU devices each; writes OUT.json.ready once initialised.
`python -m tests.distributed_worker dp OUT.json WORKDIR`: 8 forced devices, data-parallel trace
collection and predictor training against their single-device runs (files under WORKDIR).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    max_position_embeddings=512,
)
PROMPT = [[5, 9, 13, 2, 40, 7], [1, 2, 3, 4, 5, 6], [11, 22, 33, 44, 55, 66], [96, 0, 17, 17, 3, 8]]
NEW_TOKENS = 3


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def build(seed: int = 0):
    from flax import nnx

    from moecxl.config import ModelConfig
    from moecxl.model import MoEDecoder

    return MoEDecoder(ModelConfig(**TINY), rngs=nnx.Rngs(seed))


def devices_checks(out_path: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import optax
    from flax import nnx

    from moecxl import distributed as dist
    from moecxl.config import ModelConfig
    from moecxl.generate import generate
    from moecxl.model import MoEDecoder
    from moecxl.model.moe import expert_step
    from moecxl.train import loss_terms

    report: dict = {"devices": jax.device_count(), "meshes": {}, "timings_s": {}}
    t0 = time.perf_counter()
    model = build()  # one model, resharded for each mesh (shard_model works from any placement)
    ref = generate(model, PROMPT, max_new_tokens=NEW_TOKENS)
    T = len(PROMPT[0])
    report["reference_tokens"] = ref.tokens.tolist()
    report["timings_s"]["reference"] = time.perf_counter() - t0
    for data, expert in [(1, 8), (2, 4), (4, 2)]:
        t = time.perf_counter()
        mesh = dist.make_mesh(data, expert)
        dist.shard_model(model, mesh)
        row = {
            "expert_shard_shape": list(
                model.layers[0].experts.w_down_EFD[...].addressable_shards[0].data.shape
            )
        }
        for disp in ["all_to_all", "psum"] if (data, expert) == (2, 4) else ["all_to_all"]:
            res = generate(
                model,
                PROMPT,
                max_new_tokens=NEW_TOKENS,
                engine=dist.ExpertParallel(model, mesh, dispatch=disp),
            )
            row[disp] = {
                "tokens_equal": bool((res.tokens == ref.tokens).all()),
                "logits_rel": rel_err(res.logits, ref.logits),
            }
        if (data, expert) == (
            2,
            4,
        ):  # the full forward as one SPMD program: batch over data, experts over expert
            fwd = dist.ep_forward(model, PROMPT, mesh)
            row["forward"] = {
                "last_logits_rel": rel_err(np.asarray(fwd.logits)[:, -1], ref.logits[:, 0]),
                "ids_equal": all(
                    bool((np.asarray(a) == b[:, :T]).all()) for a, b in zip(fwd.expert_ids, ref.expert_ids)
                ),
            }
        report["meshes"][f"{data}x{expert}"] = row
        report["timings_s"][f"mesh_{data}x{expert}"] = time.perf_counter() - t

    # Both dispatches against the single-device expert step, directly (no model around them).
    t = time.perf_counter()
    rng = np.random.default_rng(3)
    xn = rng.normal(size=(3, 7, TINY["hidden_size"])).astype(np.float32)
    ids = rng.integers(0, TINY["num_experts"], (3, 7, 2)).astype(np.int32)
    w = rng.random((3, 7, 2)).astype(np.float32)
    ins, out = model.layers[0].experts.arrays()
    direct = expert_step(xn, w, ids, tuple(np.asarray(a) for a in ins), np.asarray(out))
    mesh = dist.make_mesh(2, 4)
    dist.shard_model(model, mesh)
    ins, out = model.layers[0].experts.arrays()
    report["dispatch"] = {
        d: rel_err(
            jax.jit(dist.ep_expert_step, static_argnames=("mesh", "dispatch"))(
                xn, w, ids, ins, out, mesh=mesh, dispatch=d
            ),
            direct,
        )
        for d in ("all_to_all", "psum")
    }
    report["timings_s"]["dispatch"] = time.perf_counter() - t

    # A tier runtime per host (here one host owning every expert) under expert parallelism.
    t = time.perf_counter()
    mesh = dist.make_mesh(2, 4)
    dist.shard_model(model, mesh)
    ep = dist.OffloadedExpertParallel(model, mesh, policy="lru", device_budget=0.75)
    res = generate(model, PROMPT, max_new_tokens=NEW_TOKENS, engine=ep)
    m = ep.metrics()
    ep.close()
    report["offloaded"] = {
        "tokens_equal": bool((res.tokens == ref.tokens).all()),
        "logits_rel": rel_err(res.logits, ref.logits),
        "hit_rate": m["hit_rate"],
        "lookups": m["lookups"],
        "owned": len(m["experts"]),
    }
    report["timings_s"]["offloaded"] = time.perf_counter() - t

    # Data-parallel routing forward (trace collection) == the single-device routing.
    t = time.perf_counter()
    ids, w, _ = dist.dp_routing(model, np.asarray(PROMPT), np.ones((4, T), bool), dist.make_mesh(4, 2))
    report["dp_routing"] = {
        "ids_equal": bool((np.asarray(ids) == np.stack([a[:, :T] for a in ref.expert_ids], axis=2)).all()),
        "weights_rel": rel_err(w, np.stack([a[:, :T] for a in ref.expert_weights], axis=2)),
        "sharding": str(ids.sharding.spec),
    }
    report["timings_s"]["dp_routing"] = time.perf_counter() - t

    # Data-parallel training step (gradients averaged over `data`) == the single-device step.
    t = time.perf_counter()
    small = MoEDecoder(ModelConfig(**{**TINY, "num_layers": 1}), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(small, nnx.Param, ...)
    opt = optax.sgd(0.1)  # Adam's first step is sign(g): too sensitive to compare rounding
    rows = np.random.default_rng(0).integers(0, TINY["vocab_size"], (8, 5)).astype(np.int32)

    def loss_fn(p, rows_BT1):
        return loss_terms(nnx.merge(graphdef, p, rest), rows_BT1)[0]

    def single(p, s, rows_BT1):
        loss, g = jax.value_and_grad(loss_fn)(p, rows_BT1)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p1, _, loss1 = jax.jit(single)(params, opt.init(params), rows)
    dmesh = dist.make_mesh(8, 1)
    step = dist.make_dp_train_step(loss_fn, opt, dmesh)
    p8, _, loss8 = step(
        dist.replicate_tree(params, dmesh),
        dist.replicate_tree(opt.init(params), dmesh),
        dist.shard_batch(rows, dmesh),
    )
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p8, p1)
    )
    report["dp_train"] = {"loss_single": float(loss1), "loss_dp": float(loss8), "params_max_abs": max(diffs)}
    report["timings_s"]["dp_train"] = time.perf_counter() - t

    # Bad input: an expert axis that does not divide E; a mesh larger than the devices.
    errors = {}
    try:
        dist.shard_model(model, dist.make_mesh(1, 3, devices=jax.devices()[:3]))
    except dist.MeshError as e:
        errors["mesh_not_dividing"] = str(e)
    try:
        dist.make_mesh(3, 3)
    except dist.MeshError as e:
        errors["mesh_too_big"] = str(e)
    report["errors"] = errors
    report["timings_s"]["total"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def _trace_diff(a_dir, b_dir) -> dict:
    """How two trace directories differ: row columns and ids exactly, floats as relative error."""
    from moecxl.traces import RUN_ONLY_ARGS, read_traces

    a, b = read_traces(a_dir, require_complete=True), read_traces(b_dir, require_complete=True)
    keys = ("seq_id", "pos", "token_id", "phase", "domain", "doc_id")
    same_rows = len(a) == len(b) and all(a.table.column(k).equals(b.table.column(k)) for k in keys)
    args_a, args_b = ({k: v for k, v in t.metadata["args"].items() if k not in RUN_ONLY_ARGS} for t in (a, b))
    out = {
        "rows": [len(a), len(b)],
        "decode_rows": int(a.is_decode.sum()),
        "same_rows": bool(same_rows),
        "ids_equal": bool(same_rows and (a.expert_ids == b.expert_ids).all()),
        "args_equal": args_a == args_b,
        "data_parallel": [a.metadata["args"]["data_parallel"], b.metadata["args"]["data_parallel"]],
    }
    if same_rows:
        out |= {
            "weights_rel": rel_err(b.expert_weights, a.expert_weights),
            "logits_rel": rel_err(b.router_logits, a.router_logits),
            "sketch_rel": rel_err(b.hidden_sketch, a.hidden_sketch),
        }
    return out


def dp_checks(out_path: str, work: str) -> None:
    """Data-parallel trace collection and predictor training on 8 forced devices == one device."""
    from pathlib import Path

    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["MOECXL_CACHE"] = str(Path(work) / "cache")
    import jax

    from moecxl.data import SplitSpec, train_tokenizer
    from moecxl.traces import TraceError, collect
    from predictor.checkpoint import PredictorError
    from predictor.train import TrainConfig, train
    from tests.conftest import tiny_config
    from tests.test_predictor import synthetic, write_traces
    from tests.test_traces import WORDS, _random_model

    work = Path(work)
    report: dict = {"devices": jax.device_count(), "timings_s": {}}
    t0 = time.perf_counter()
    corpus_dir = work / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        (corpus_dir / f"prose{i}.txt").write_text(" ".join(rng.choice(WORDS, 90)) + "\n")
    (corpus_dir / "code0.py").write_text(Path(os.__file__).read_text()[:1500])
    corpus = f"file:{corpus_dir}"
    tok = train_tokenizer(corpus, vocab_size=300, splits=SplitSpec((1.0, 0.0, 0.0)))
    model = _random_model(tiny_config(vocab_size=300, num_experts=6, top_k=2))
    # batch 5 is padded to 8 rows for 8 devices; 3 sequences per shard make several shards to resume.
    kw = dict(
        split="train",
        tokens=140,
        prompt_len=16,
        decode_tokens=3,
        decode_every=2,
        batch=5,
        shard_seqs=6,
        fractions=(1.0, 0.0, 0.0),
        router_logits=True,
        sketch=4,
        progress=lambda msg: None,
        tokenizer=tok,
    )
    single = collect(model, work / "single", corpus, **kw)
    report["timings_s"]["collect_single"] = time.perf_counter() - t0
    t = time.perf_counter()
    dp = collect(model, work / "dp8", corpus, data_parallel=8, **kw)
    report["timings_s"]["collect_dp8"] = time.perf_counter() - t
    # Interrupted after one shard on one device, resumed on 8: still the single-device rows.
    t = time.perf_counter()
    collect(model, work / "resumed", corpus, max_shards=1, **kw)
    resumed = collect(model, work / "resumed", corpus, data_parallel=8, **kw)
    report["timings_s"]["collect_resume"] = time.perf_counter() - t
    report["traces"] = {"dp8": _trace_diff(single, dp), "resumed_dp8": _trace_diff(single, resumed)}
    try:
        collect(model, work / "too_many", corpus, data_parallel=9, **kw)
    except TraceError as e:
        report["traces"]["too_many_devices"] = str(e)

    # Predictor training: synthetic chain traces, 4 layers (windows hold 1 to 3 valid horizons, so shards
    # differ in count); batch 12 is padded to 16 windows for 8 devices. Losses logged at steps 2 and 4.
    t = time.perf_counter()
    ids, seq, pos, dec, dom = synthetic("chain", seqs=24, T_=10)
    traces_dir = write_traces(work / "chain", ids, seq, pos, decode_N=dec, domain_N=dom)
    cfg = TrainConfig(
        features=("current",),
        d_model=32,
        num_heads=2,
        num_blocks=0,  # no attention block: the same step, half the compile time
        batch_size=12,
        max_steps=4,
        eval_every=2,
        warmup_steps=2,
        learning_rate=1e-2,
        val_windows=200,
        test_windows=200,
        library_size=8,
        latency_repeats=0,
    )
    runs = {n: train(traces_dir, work / f"pred{n}", cfg, progress=False, data_parallel=n) for n in (1, 8)}
    report["predictor"] = {
        str(n): {
            "train_loss": [h["train_loss"] for h in r["training"]["history"]],
            "val_loss": [h["val_loss"] for h in r["training"]["history"]],
            "data_parallel": r["training"]["data_parallel"],
        }
        for n, r in runs.items()
    }
    try:
        train(traces_dir, work / "pred9", cfg, progress=False, data_parallel=9)
    except PredictorError as e:
        report["predictor"]["too_many_devices"] = str(e)
    report["timings_s"]["predictor"] = time.perf_counter() - t
    report["timings_s"]["total"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def host(port: int, pid: int, nproc: int, out_path: str, timeout_s: int) -> None:
    from moecxl import distributed as dist

    t0 = time.perf_counter()
    dist.initialize(
        f"127.0.0.1:{port}",
        nproc,
        pid,
        local_devices=2,
        timeout_s=timeout_s,
        heartbeat_timeout_s=5,
        shutdown_timeout_s=5,
    )
    import jax

    from moecxl.generate import generate

    init_s = time.perf_counter() - t0
    with open(out_path + ".ready", "w") as f:  # the test may kill this process from now on
        f.write(str(os.getpid()))
    if "--barriers" in sys.argv:  # the peer-death test: cheap collectives until something gives
        from jax.experimental import multihost_utils

        with dist.Watchdog(stall_s=timeout_s, what="barrier") as dog:
            for i in range(10_000):
                multihost_utils.sync_global_devices(f"step {i}")
                dog.beat(f"barrier {i}")
                time.sleep(0.2)
        return
    with dist.Watchdog(stall_s=timeout_s, what="generate step") as dog:
        mesh = dist.make_mesh(1, jax.device_count())  # experts over every device of every process
        model = dist.shard_model(build(), mesh)
        dog.beat("shard_model")
        ep = dist.OffloadedExpertParallel(model, mesh, policy="lru", device_budget=1.0, heartbeat=dog.beat)
        res = generate(model, PROMPT, max_new_tokens=NEW_TOKENS, engine=ep)
        dog.beat("generate")
        everyone = dist.allgather_json(ep.metrics())
        dog.beat("allgather")
        report = {
            "process": pid,
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "tokens": res.tokens.tolist(),
            "logits": res.logits.tolist(),
            "rollup": dist.rollup(everyone),
            "init_s": init_s,
            "total_s": time.perf_counter() - t0,
        }
        ep.close()
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    if sys.argv[1] == "devices":
        devices_checks(sys.argv[2])
    elif sys.argv[1] == "host":
        port, pid, nproc, out = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        timeout = int(sys.argv[sys.argv.index("--timeout") + 1]) if "--timeout" in sys.argv else 30
        host(port, pid, nproc, out, timeout)
    elif sys.argv[1] == "dp":
        dp_checks(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}: use 'devices', 'host' or 'dp'")
