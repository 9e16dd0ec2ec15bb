"""Subprocess side of tests/test_distributed.py (forced CPU devices must not leak into other tests).

`python -m tests.distributed_worker devices OUT.json`: 8 forced devices, every single-process check.
`python -m tests.distributed_worker host PORT PID NPROC OUT.json [--die-after-init] [--timeout S]`:
one process of a multi-process run on 127.0.0.1:PORT with 2 forced CPU devices each.
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
NEW_TOKENS = 4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def build(seed: int = 0):
    from flax import nnx

    from moecxl.config import ModelConfig
    from moecxl.model import MoEDecoder

    return MoEDecoder(ModelConfig(**TINY), rngs=nnx.Rngs(seed))


def reference(prompt):
    """Single-device tokens, logits and full-forward logits, computed on one device."""
    import jax
    from flax import nnx

    from moecxl.generate import generate

    model = build()
    res = generate(model, prompt, max_new_tokens=NEW_TOKENS)
    g, s = nnx.split(model)
    full = jax.jit(lambda s, ids: nnx.merge(g, s)(ids))(s, np.asarray(prompt, np.int32))
    return res, full


def devices_checks(out_path: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import optax
    from flax import nnx

    from moecxl import distributed as dist
    from moecxl.generate import generate
    from moecxl.train import loss_terms

    report: dict = {"devices": jax.device_count(), "meshes": {}, "timings_s": {}}
    t0 = time.perf_counter()
    ref, full = reference(PROMPT)
    report["timings_s"]["reference"] = time.perf_counter() - t0
    for data, expert in [(1, 8), (2, 4), (4, 2)]:
        t = time.perf_counter()
        mesh = dist.make_mesh(data, expert)
        model = dist.shard_model(build(), mesh)
        dispatches = ["all_to_all", "psum"] if (data, expert) == (2, 4) else ["all_to_all"]
        row = {}
        for disp in dispatches:
            res = generate(
                model,
                PROMPT,
                max_new_tokens=NEW_TOKENS,
                engine=dist.ExpertParallel(model, mesh, dispatch=disp),
            )
            fwd = dist.ep_forward(model, PROMPT, mesh, dispatch=disp)
            row[disp] = {
                "tokens_equal": bool((res.tokens == ref.tokens).all()),
                "generate_logits_rel": rel_err(res.logits, ref.logits),
                "forward_logits_rel": rel_err(fwd.logits, full.logits),
                "forward_ids_equal": all(
                    bool((np.asarray(a) == np.asarray(b)).all())
                    for a, b in zip(fwd.expert_ids, full.expert_ids)
                ),
                "expert_shard_shape": list(
                    model.layers[0].experts.w_down_EFD[...].sharding.shard_shape((8, 48, 32))
                ),
            }
        report["meshes"][f"{data}x{expert}"] = row
        report["timings_s"][f"mesh_{data}x{expert}"] = time.perf_counter() - t

    # A tier runtime per host (here one host owning every expert) under expert parallelism.
    t = time.perf_counter()
    mesh = dist.make_mesh(2, 4)
    model = dist.shard_model(build(), mesh)
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
        "rollup": dist.rollup([m, m], names=["a", "b"]),
    }
    report["timings_s"]["offloaded"] = time.perf_counter() - t

    # Data-parallel training step (gradients averaged over `data`) == the single-device step.
    t = time.perf_counter()
    model = build(1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(1e-2)
    rows = np.random.default_rng(0).integers(0, TINY["vocab_size"], (8, 9)).astype(np.int32)

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
        jax.tree.map(lambda a, b: rel_err(a, b) if np.any(np.asarray(b)) else 0.0, p8, p1)
    )
    report["dp_train"] = {"loss_single": float(loss1), "loss_dp": float(loss8), "params_max_rel": max(diffs)}
    report["timings_s"]["dp_train"] = time.perf_counter() - t

    # Data-parallel routing forward (trace collection) == the single-device routing.
    t = time.perf_counter()
    ids, w, _ = dist.dp_routing(build(), np.asarray(PROMPT), np.ones((4, 6), bool), dist.make_mesh(4, 2))
    ref_ids = np.stack([np.asarray(a) for a in full.expert_ids], axis=2)
    ref_w = np.stack([np.asarray(a) for a in full.expert_weights], axis=2)
    report["dp_routing"] = {
        "ids_equal": bool((np.asarray(ids) == ref_ids).all()),
        "weights_rel": rel_err(w, ref_w),
        "sharding": str(ids.sharding.spec),
    }
    report["timings_s"]["dp_routing"] = time.perf_counter() - t

    # Bad input: an expert axis that does not divide E.
    errors = {}
    try:
        dist.shard_model(build(), dist.make_mesh(1, 3, devices=jax.devices()[:3]))
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


def host(port: int, pid: int, nproc: int, out_path: str, die_after_init: bool, timeout_s: int) -> None:
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
    if die_after_init and pid == nproc - 1:
        time.sleep(1.0)
        os._exit(9)  # dies without a goodbye, like a killed host
    with dist.Watchdog(stall_s=timeout_s, what="generate step") as dog:
        mesh = dist.make_mesh(1, jax.device_count())  # experts over every device of every process
        model = dist.shard_model(build(), mesh)
        dog.beat("shard_model")
        ep = dist.OffloadedExpertParallel(model, mesh, policy="lru", device_budget=1.0)
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
        host(port, pid, nproc, out, "--die-after-init" in sys.argv, timeout)
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}: use 'devices' or 'host'")
