"""Train the learned predictor on router traces; evaluate it and every baseline on the test split.

    python train_predictor.py --traces DIR [--out DIR] [--config configs/predictor/default.yaml]

`out/` receives: `checkpoints/` (orbax, resumed automatically), `predictor/` (the exported best model,
for `LivePredictor.load`), `metrics.json`, `reliability.png`, `run.json`. A non-finite loss stops the
run with an error; the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from moecxl.distributed import DATA, MeshError, data_mesh, dp_value_and_grad, replicate_tree, shard_batch
from moecxl.distributed.expert_parallel import to_local
from moecxl.traces import TraceSet, read_metadata
from predictor import metrics as M
from predictor.baselines import fit_baselines
from predictor.checkpoint import PredictorError, check_tokenizer, save_predictor, tokenizer_record
from predictor.data import (
    FEATURES,
    Batch,
    SplitSpec,
    TraceArrays,
    gather,
    load_arrays,
    multi_hot,
    split_rows,
    windows,
)
from predictor.model import PredictorConfig, encode, flops_per_window, init, loss_sum_count, set_loss

# Mixtral-8x7B MoE layer, batch-1 decode on an H100 (FACTS: "The arithmetic of a miss"), and H100 bf16 dense.
TARGET_LAYER_S = 0.21e-3
TARGET_TFLOPS = 989.0
BUDGET_SHARE = 0.05


class TrainingDiverged(PredictorError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a predictor run depends on (YAML keys are these field names)."""

    features: tuple[str, ...] = FEATURES
    horizon: int = 4
    current_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    num_blocks: int = 2
    mlp_mult: int = 2
    direct_mult: int = 4  # the direct path from the sketch (`predictor.model.DirectPath`); 0: none
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    batch_size: int = 1024
    max_steps: int = 6000  # a cap: early stopping on validation ends a run that stops improving
    eval_every: int = 200
    patience: int = 3
    # Softmax cross-entropy term of the loss (`predictor.model.loss_sum_count`): a little better ranking
    # (+0.7 points of recall@1 on Switch), but over-confident top candidates (0.75 said, ~0.5 true), which
    # the gate reads as probabilities: off by default.
    listwise_weight: float = 0.0
    history_dropout: float = 0.25  # share of training windows without the previous token (live prefill)
    val_windows: int = 20_000
    test_windows: int = 100_000
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test_domain: str | None = None
    train_domain: str | None = None
    seed: int = 0
    library_size: int = 256
    bins: int = 10
    latency_repeats: int = 200  # jitted calls timed for the CPU latency (0: skip the measurement)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_config(path: str | os.PathLike | None, **overrides) -> TrainConfig:
    """A `TrainConfig` from YAML (unknown keys are errors naming the file and key), then `overrides`."""
    data = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PredictorError(f"{path}: unreadable config: {e}") from e
        if not isinstance(data, dict):
            raise PredictorError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PredictorError(f"{path or 'config'}: unknown key(s) {unknown}; known: {sorted(known)}")
    for k in ("features", "fractions"):
        if k in data:
            data[k] = tuple(data[k])
    cfg = TrainConfig(**data)
    if cfg.horizon < 1 or cfg.current_layers < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise PredictorError(
            f"{path or 'config'}: horizon, current_layers, batch_size, eval_every must be >= 1"
        )
    return cfg


# ----------------------------------------------------------------------------------------------- steps


def _raw(b: Batch) -> tuple:
    return (
        b.layer_W,
        b.cur_ids_WCK,
        b.cur_w_WCK,
        b.prev_ids_WHK,
        b.pregate_WGE,
        b.sketch_WP,
        b.target_ids_WHK,
    )


def _logits_targets(graphdef, params, raw, E: int, use_pregate: bool):
    """(logits [W, H, E], multi-hot targets [W, H, E], valid [W, H]) of raw batch arrays."""
    *inputs, target_ids_WHK = raw
    logits = nnx.merge(graphdef, params)(encode(*inputs, E=E, use_pregate=use_pregate))
    return logits, multi_hot(target_ids_WHK, E, xp=jnp), (target_ids_WHK >= 0).all(-1)


def _loss(graphdef, params, raw, E: int, use_pregate: bool, listwise: float = 0.0):
    return set_loss(*_logits_targets(graphdef, params, raw, E, use_pregate), listwise)


@functools.lru_cache
def optimizer(weight_decay: float) -> optax.GradientTransformation:
    """AdamW without its learning rate (passed per step), one object per setting: the jitted step
    then compiles once per predictor shape, whatever the schedule."""
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.add_decayed_weights(weight_decay)
    )


def _apply(opt, params, opt_state, grads, lr):
    updates, opt_state = opt.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(params, updates), opt_state


@partial(jax.jit, static_argnums=(0, 1, 6, 7, 8))
def _train_step(graphdef, opt, params, opt_state, raw, lr, E: int, use_pregate: bool, listwise: float):
    loss, grads = jax.value_and_grad(lambda p: _loss(graphdef, p, raw, E, use_pregate, listwise))(params)
    return (*_apply(opt, params, opt_state, grads, lr), loss)


@functools.lru_cache(maxsize=8)
def _dp_train_step(graphdef, opt, mesh, E: int, use_pregate: bool, listwise: float):
    """`_train_step` as one SPMD program with the windows split over `mesh`'s `data` axis: params and
    optimizer state replicated, loss and gradients those of the whole batch (sum and count over shards)."""
    loss_grad = dp_value_and_grad(
        lambda p, raw: loss_sum_count(*_logits_targets(graphdef, p, raw, E, use_pregate), listwise)
    )

    def local(params, opt_state, raw, lr):
        loss, grads = loss_grad(params, raw)
        return (*_apply(opt, params, opt_state, grads, lr), loss)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(DATA), P()), out_specs=P()))


def _pad_windows(raw: tuple, n: int) -> tuple:
    """Raw batch arrays padded to a multiple of `n` windows with copies of window 0 whose targets are all
    -1: such windows are outside the loss's sum and count, so loss and gradients stay the batch's."""
    *inputs, target_ids_WHK = raw
    W = len(target_ids_WHK)
    pad = -W % n
    if not pad:
        return raw
    idx = np.r_[np.arange(W), np.zeros(pad, np.int64)]
    no_target = np.full((pad, *target_ids_WHK.shape[1:]), -1, target_ids_WHK.dtype)
    return (*(x[idx] for x in inputs), np.concatenate([target_ids_WHK, no_target]))


def make_train_step(graphdef, opt, E: int, use_pregate: bool, mesh=None, listwise: float = 0.0):
    """`step(params, opt_state, batch: Batch, lr) -> (params, opt_state, loss)` on one device, or
    data-parallel over `mesh`'s `data` axis: params and optimizer state replicated there (`replicate_tree`),
    the batch padded to a multiple of the axis size (`_pad_windows`) and split over it."""
    if mesh is None:
        return lambda p, s, b, lr: _train_step(graphdef, opt, p, s, _raw(b), lr, E, use_pregate, listwise)
    dp, n = _dp_train_step(graphdef, opt, mesh, E, use_pregate, listwise), mesh.shape[DATA]
    return lambda p, s, b, lr: dp(p, s, tuple(shard_batch(x, mesh) for x in _pad_windows(_raw(b), n)), lr)


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _eval_loss(graphdef, params, raw, E: int, use_pregate: bool, listwise: float):
    return _loss(graphdef, params, raw, E, use_pregate, listwise)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _probs(graphdef, params, inputs, E: int, use_pregate: bool):
    return jax.nn.sigmoid(nnx.merge(graphdef, params)(encode(*inputs, E=E, use_pregate=use_pregate)))


@dataclass(frozen=True)
class Learned:
    """The trained model behind the baselines' interface: `predict(tr, n_W, l_W) -> p [W, H, E]`."""

    graphdef: nnx.GraphDef
    params: nnx.State
    cfg: PredictorConfig
    name: str = "learned"
    history: str = "all"
    chunk: int = 4096

    def predict(self, tr: TraceArrays, n_W, l_W) -> np.ndarray:
        out = []
        for i in range(0, len(n_W), self.chunk):
            sl = slice(i, i + self.chunk)
            b = gather(tr, n_W[sl], l_W[sl], self.cfg.H, self.cfg.C, self.cfg.features, self.history)
            out.append(
                np.asarray(
                    _probs(
                        self.graphdef, self.params, _raw(b)[:-1], self.cfg.E, "pregate" in self.cfg.features
                    )
                )
            )
        return np.concatenate(out) if out else np.zeros((0, self.cfg.H, self.cfg.E), np.float32)


def _mean_loss(
    graphdef, params, tr, wins, cfg: PredictorConfig, listwise: float = 0.0, chunk: int = 4096
) -> float:
    n_W, l_W = wins
    total, count = 0.0, 0
    for i in range(0, len(n_W), chunk):
        b = gather(tr, n_W[i : i + chunk], l_W[i : i + chunk], cfg.H, cfg.C, cfg.features)
        loss = _eval_loss(graphdef, params, _raw(b), cfg.E, "pregate" in cfg.features, listwise)
        total += float(loss) * len(b.layer_W)
        count += len(b.layer_W)
    return total / max(count, 1)


def _subsample(wins, n: int, seed: int):
    n_W, l_W = wins
    if len(n_W) <= n:
        return wins
    pick = np.sort(np.random.default_rng(seed).choice(len(n_W), n, replace=False))
    return n_W[pick], l_W[pick]


def _finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------- costs


def cost_report(graphdef, params, cfg: PredictorConfig, repeats: int = 200) -> dict:
    """FLOPs per (token, layer), measured CPU latency of one jitted call (1 and 128 windows), and the
    share of the target layer's time (Mixtral-8x7B layer, H100) those FLOPs would take at peak."""
    flops = flops_per_window(cfg)
    out = {"flops_per_token_layer": flops}
    for W in (1, 128) if repeats else ():
        raw = (
            np.zeros(W, np.int32),
            np.full((W, cfg.C, cfg.K), -1, np.int32),
            np.zeros((W, cfg.C, cfg.K), np.float32),
            np.full((W, cfg.H, cfg.K), -1, np.int32),
            np.zeros((W, cfg.H + 1, cfg.E), np.float32),
            np.zeros((W, cfg.P), np.float32),
        )
        raw = jax.device_put(raw)
        use_pg = "pregate" in cfg.features
        _probs(graphdef, params, raw, cfg.E, use_pg).block_until_ready()
        times = []
        for _ in range(repeats if W == 1 else max(repeats // 4, 1)):
            t0 = time.perf_counter()
            _probs(graphdef, params, raw, cfg.E, use_pg).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[f"cpu_latency_us_W{W}"] = float(np.median(times) * 1e6)
    target_s = flops / (TARGET_TFLOPS * 1e12)
    out.update(
        target="Mixtral-8x7B MoE layer, batch-1 decode, H100 (0.21 ms); predictor FLOPs at 989 TFLOP/s",
        target_layer_s=TARGET_LAYER_S,
        predictor_s_at_peak=target_s,
        share_of_layer=target_s / TARGET_LAYER_S,
        under_budget=target_s / TARGET_LAYER_S < BUDGET_SHARE,
    )
    return out


# ---------------------------------------------------------------------------------------------- main


def _write_json(path: Path, data: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)


def _plot_reliability(
    results: dict, path: Path, names=("learned", "pregate", "layer_freq", "temporal")
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="k", lw=0.6)
    for name in names:
        if name not in results:
            continue
        r = results[name]["reliability"]
        c, f, n = (np.asarray(r[k]) for k in ("confidence", "frequency", "count"))
        ax.plot(c[n > 0], f[n > 0], marker="o", label=f"{name} (ECE {r['ece']:.3f})")
    ax.set(xlabel="predicted P(expert in top-k set)", ylabel="observed frequency", title="reliability (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def summary_table(results: dict, horizons=M.HORIZONS) -> dict:
    """{predictor: {h: {exact, recall@k, recall@2k}}}: the headline numbers."""
    return {
        name: {
            h: {
                k: round(r["horizons"][h][k], 4)
                for k in ("exact", "recall@k", "recall@2k")
                if k in r["horizons"][h]
            }
            for h in map(str, horizons)
            if h in r["horizons"]
        }
        for name, r in results.items()
    }


def train(
    traces: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | str | os.PathLike | None = None,
    *,
    model=None,
    test_traces: str | os.PathLike | None = None,
    progress: bool = True,
    data_parallel: int = 1,
) -> dict:
    """Train (resuming from `out/checkpoints`), export the best predictor, write metrics.json. Returns it.

    `model`: the traced model (object or path) for pre-gate features; default the traces' metadata path.
    `test_traces`: evaluate on this trace directory (same model) instead of the test split of `traces`.
    `data_parallel` > 1: each training batch split over that many of this process's devices (0: all),
    padded to a multiple of it with masked windows; the losses equal one device's up to float rounding,
    and a run may resume with another device count. Evaluation stays on one device.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    mesh = None
    if data_parallel != 1:
        try:
            mesh = data_mesh(data_parallel)
        except MeshError as e:
            raise PredictorError(f"data_parallel={data_parallel}: {e}") from e
    on_mesh = partial(replicate_tree, mesh=mesh) if mesh is not None else (lambda t: t)
    one_device = partial(jax.tree.map, to_local) if mesh is not None else (lambda t: t)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    H, C = cfg.horizon, cfg.current_layers
    meta = traces.metadata if isinstance(traces, TraceSet) else read_metadata(traces)
    tok_record = tokenizer_record(meta.get("tokenizer"))
    if test_traces is not None:  # before any work: traces of another tokenizer are refused
        check_tokenizer(
            tok_record,
            read_metadata(test_traces).get("tokenizer"),
            f"the predictor of {traces}",
            f"--test-traces {test_traces}",
        )
    tr = load_arrays(traces, cfg.features, H, model)
    splits = split_rows(tr, SplitSpec(cfg.fractions, cfg.test_domain, cfg.train_domain, cfg.seed))
    win = {k: windows(tr, v) for k, v in splits.items()}
    for k, (n_W, _) in win.items():
        if not len(n_W):
            raise PredictorError(f"{tr.path}: split {k!r} has no window (a routed layer with one after it)")
    val_wins = _subsample(win["validation"], cfg.val_windows, cfg.seed + 1)
    test_tr = tr
    test_wins = win["test"]
    if test_traces is not None:
        test_tr = load_arrays(test_traces, cfg.features, H, model)
        if (test_tr.L, test_tr.E, test_tr.K, test_tr.P) != (tr.L, tr.E, tr.K, tr.P):
            raise PredictorError(
                f"{test_traces}: L/E/K/P {(test_tr.L, test_tr.E, test_tr.K, test_tr.P)} differ from {traces}'s "
                f"{(tr.L, tr.E, tr.K, tr.P)}"
            )
        test_wins = windows(test_tr, np.arange(test_tr.N))
    test_wins = _subsample(test_wins, cfg.test_windows, cfg.seed + 2)
    pcfg = PredictorConfig(
        tr.L,
        tr.E,
        tr.K,
        tr.P,
        H,
        C,
        tuple(cfg.features),
        cfg.d_model,
        cfg.num_heads,
        cfg.num_blocks,
        cfg.mlp_mult,
        cfg.direct_mult,
    )
    use_pg = "pregate" in cfg.features
    model_meta = tr.meta["model"]
    run = {  # what a resumed run must share (max_steps may grow, and evaluation settings change)
        "config": {
            k: v
            for k, v in cfg.to_dict().items()
            if k not in ("max_steps", "patience", "test_windows", "latency_repeats", "bins", "library_size")
        },
        "predictor": pcfg.to_dict(),
        "traces": tr.path,
        "model": {"id": model_meta.get("id"), "hash": model_meta.get("hash")},
        "tokenizer": (tok_record or {}).get("hash"),
    }
    run_file = out / "run.json"
    ckpt_dir = out / "checkpoints"
    if run_file.is_file() and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        old = json.loads(run_file.read_text())
        old.setdefault("tokenizer", run["tokenizer"])  # runs from before the tokenizer was recorded
        if old != run:
            diff = sorted(k for k in run if old.get(k) != run[k])
            raise PredictorError(
                f"{run_file}: existing checkpoints were made with other {diff}; use another --out to start anew"
            )
    _write_json(run_file, run)

    graphdef, params = init(pcfg, cfg.seed)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.max_steps, cfg.warmup_steps + 1)
    )
    opt = optimizer(cfg.weight_decay)
    opt_state = jax.jit(opt.init)(params)
    best = params
    progress_rec = {"step": 0, "best_val": None, "bad_evals": 0, "history": [], "stopped": None}
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    latest = mngr.latest_step()
    if latest is not None:
        abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
        r = mngr.restore(
            latest,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params)),
                opt=ocp.args.StandardRestore(abstract(opt_state)),
                best=ocp.args.StandardRestore(abstract(params)),
                progress=ocp.args.JsonRestore(),
            ),
        )
        params, opt_state, best, progress_rec = r.params, r.opt, r.best, dict(r.progress)
    params, opt_state = on_mesh(params), on_mesh(opt_state)
    train_step = make_train_step(graphdef, opt, tr.E, use_pg, mesh, cfg.listwise_weight)

    train_n, train_l = win["train"]
    step = progress_rec["step"]
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, desc="predictor", unit="step")
    try:
        while step < cfg.max_steps and progress_rec["stopped"] is None:
            rng = np.random.default_rng([cfg.seed, step])
            pick = rng.integers(0, len(train_n), cfg.batch_size)
            b = gather(tr, train_n[pick], train_l[pick], H, C, cfg.features)
            drop = rng.random(cfg.batch_size) < cfg.history_dropout
            b = dataclasses.replace(b, prev_ids_WHK=np.where(drop[:, None, None], -1, b.prev_ids_WHK))
            lr = np.float32(sched(step))
            params, opt_state, loss = train_step(params, opt_state, b, lr)
            loss = float(loss)
            if not np.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss is {loss} at step {step + 1}; stopped. Last good checkpoint: "
                    f"{ckpt_dir}/{mngr.latest_step()} (lower learning_rate, or check the traces for NaN)"
                )
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val = _mean_loss(graphdef, one_device(params), tr, val_wins, pcfg, cfg.listwise_weight)
                if not np.isfinite(val) or not _finite(params):
                    raise TrainingDiverged(
                        f"validation loss is {val} at step {step}; stopped. Last good checkpoint: "
                        f"{ckpt_dir}/{mngr.latest_step()}"
                    )
                progress_rec["history"].append({"step": step, "train_loss": loss, "val_loss": val})
                if progress_rec["best_val"] is None or val < progress_rec["best_val"]:
                    progress_rec["best_val"], progress_rec["bad_evals"], best = val, 0, one_device(params)
                else:
                    progress_rec["bad_evals"] += 1
                    if progress_rec["bad_evals"] >= cfg.patience:
                        progress_rec["stopped"] = (
                            f"early stop at step {step} (validation loss up {cfg.patience}x)"
                        )
                progress_rec["step"] = step
                mngr.save(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardSave(params),
                        opt=ocp.args.StandardSave(opt_state),
                        best=ocp.args.StandardSave(best),
                        progress=ocp.args.JsonSave(progress_rec),
                    ),
                )
                mngr.wait_until_finished()
                bar.write(f"step {step}: train {loss:.4f} val {val:.4f} best {progress_rec['best_val']:.4f}")
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    if progress_rec["stopped"] is None:
        progress_rec["stopped"] = f"max_steps {cfg.max_steps}"

    learned = Learned(graphdef, best, pcfg)
    save_predictor(
        out / "predictor",
        nnx.merge(graphdef, best),
        {
            "model": {
                "id": model_meta.get("id"),
                "hash": model_meta.get("hash"),
                "family": model_meta.get("family"),
            },
            "layers": tr.meta.get("layers"),
            "tokenizer": tok_record,
            "sketch_DP": tr.sketch_DP.tolist() if (tr.sketch_DP is not None and tr.P) else None,
            "traces": tr.path,
            "best_val_loss": progress_rec["best_val"],
        },
    )
    baselines = fit_baselines(tr, splits["train"], H, cfg.library_size, cfg.seed)
    predictors = {"learned": learned, **baselines}
    if "history" in cfg.features:  # as live: no previous-token history in prefill
        predictors["learned_live"] = dataclasses.replace(learned, name="learned_live", history="decode")
    n_W, l_W = test_wins
    b = gather(test_tr, n_W, l_W, H, 1, ())
    results = {}
    for name, pred in predictors.items():
        results[name] = M.evaluate(
            pred.predict(test_tr, n_W, l_W), b.target_ids_WHK, b.decode_W, bins=cfg.bins
        )
    report = {
        "traces": tr.path,
        "test_traces": test_tr.path,
        "model": run["model"],
        "tokenizer": tok_record,
        "L": tr.L,
        "E": tr.E,
        "K": tr.K,
        "P": tr.P,
        "features": list(cfg.features),
        "split": {
            "fractions": list(cfg.fractions),
            "test_domain": cfg.test_domain,
            "train_domain": cfg.train_domain,
            "windows": {k: int(len(v[0])) for k, v in win.items()} | {"test_evaluated": int(len(n_W))},
        },
        "training": {k: progress_rec[k] for k in ("step", "best_val", "stopped", "history")}
        | {"data_parallel": 1 if mesh is None else mesh.shape[DATA]},
        "cost": cost_report(graphdef, best, pcfg, cfg.latency_repeats),
        "summary": summary_table(results),
        "results": results,
        "predictor_checkpoint": str(out / "predictor"),
    }
    _write_json(out / "metrics.json", report)
    _plot_reliability(results, out / "reliability.png")
    return report
