"""Train a small MoE language model (decoder-only or Switch prefix LM) and report perplexity.

    python -m moecxl.train --config configs/models/mixtral-topology.yaml --out runs/mixtral-topology
    python -m moecxl.train --config ... --out DIR --resume          # continue from DIR/checkpoints
    python -m moecxl.train --config ... --out DIR --dense           # dense baseline, same active params

Loss = LM cross-entropy + aux_loss_coef · load balance + z_loss_coef · router z-loss, both averaged over
the MoE layers (load balance per layer E · Σ_e f_e · P_e, 1.0 for uniform routing; z-loss the mean
logsumexp² of the router logits). One pure `jax.jit` step over the `nnx.split` state pytrees.

A checkpoint is written only for a state whose training loss has been seen finite (state k is saved
while step k + 1 runs), so a NaN stops training with the last good checkpoint in place. Resume restores
parameters and optimizer state and skips the batches already seen: the result equals an uninterrupted
run. Switch (encoder-decoder) trains as a prefix LM: the encoder reads the first half of each sequence,
the decoder predicts the second half from `decoder_start_token_id` (teacher forcing).

Outputs in DIR: tokenizer.json, run.json (the configs), log.jsonl, checkpoints/, final/ (HF format +
tokenizer.json + metrics.json + README.md), metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from moecxl import data
from moecxl.config import ConfigError, ModelConfig, TrainConfig, from_dict, load_yaml
from moecxl.model.family import family_of
from moecxl.model.layers import DTYPES


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a resume that does not match); the message says where."""


# ---------------------------------------------------------------------------------------------- configs


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, TrainConfig]:
    """A config YAML with `model:` (ModelConfig) and `train:` (TrainConfig) sections, strictly read."""
    d = load_yaml(path)
    unknown = sorted(set(d) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; expected 'model' and 'train'")
    if "model" not in d:
        raise ConfigError(f"{path}: missing the 'model' section")
    return (
        from_dict(ModelConfig, d["model"] or {}, f"{path}:model"),
        from_dict(TrainConfig, d.get("train") or {}, f"{path}:train"),
    )


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The dense baseline: one FFN of width K·F (same active parameters and FLOPs per token) as E=1, K=1.
    Shared experts (DeepSeek) join that FFN (width (K + shared)·F), and its one expert is routed by a plain
    softmax (weight 1), whatever the MoE's scoring and group limits."""
    return cfg.replace(
        num_experts=1,
        top_k=1,
        intermediate_size=(cfg.top_k + cfg.n_shared_experts) * cfg.intermediate_size,
        n_shared_experts=0,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        routed_scaling_factor=1.0,
        name=f"{cfg.name or cfg.family}-dense",
    )


def build_model(cfg: ModelConfig, seed: int = 0):
    """A freshly initialised model of `cfg` (MoEDecoder or SwitchModel)."""
    if family_of(cfg).encoder_decoder:
        from moecxl.model.switch import SwitchModel

        return SwitchModel(cfg, rngs=nnx.Rngs(seed))
    from moecxl.model.decoder import MoEDecoder

    return MoEDecoder(cfg, rngs=nnx.Rngs(seed))


def param_counts(cfg: ModelConfig, model) -> dict[str, int]:
    """Total parameters and those one token uses (all but the E - K experts it is not routed to)."""
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    idle = cfg.num_moe_layers * (cfg.num_experts - cfg.top_k) * cfg.expert_params
    return {"total": total, "active": total - idle}


def cast_model(model, dtype: str):
    """A copy of `model` whose floating parameters (and config) are in `dtype`."""
    cfg = model.cfg.replace(dtype=dtype)
    new = nnx.eval_shape(lambda: build_model(cfg))
    state = jax.tree.map(
        lambda a: a.astype(DTYPES[dtype]) if jnp.issubdtype(a.dtype, jnp.floating) else a, nnx.state(model)
    )
    nnx.update(new, state)
    return new


# ------------------------------------------------------------------------------------------------ losses


def load_balance_loss(router_logits_NE, ids_NK):
    """Switch/Mixtral auxiliary loss E · Σ_e f_e · P_e: f = fraction of top-k assignments, P = mean prob."""
    E = router_logits_NE.shape[-1]
    K = ids_NK.shape[-1]
    probs_NE = jax.nn.softmax(router_logits_NE.astype(jnp.float32), axis=-1)
    f_E = jnp.sum(jax.nn.one_hot(ids_NK, E, dtype=jnp.float32), axis=(0, 1)) / (ids_NK.shape[0] * K)
    P_E = jnp.mean(probs_NE, axis=0)
    return E * jnp.sum(f_E * P_E)


def router_z_loss(router_logits_NE):
    """Mean over tokens of logsumexp(router logits)² (ST-MoE): keeps router logits small."""
    return jnp.mean(jax.nn.logsumexp(router_logits_NE.astype(jnp.float32), axis=-1) ** 2)


def _routing(out) -> tuple[list, list]:
    """Router logits and expert ids of every MoE layer, flattened to [N, E] and [N, K]."""
    if hasattr(out, "encoder_router_logits"):
        logits = list(out.encoder_router_logits) + list(out.decoder_router_logits)
        ids = list(out.encoder_expert_ids) + list(out.decoder_expert_ids)
    else:
        logits, ids = list(out.router_logits), list(out.expert_ids)
    return (
        [x.reshape(-1, x.shape[-1]) for x in logits],
        [x.reshape(-1, x.shape[-1]) for x in ids],
    )


def split_batch(cfg: ModelConfig, rows_BT1):
    """Model inputs and targets of a batch of packed rows [B, T + 1].

    Decoder: inputs rows[:, :-1], targets rows[:, 1:]. Switch (prefix LM over the first T tokens):
    encoder rows[:, :T/2], targets rows[:, T/2:T], decoder inputs the targets shifted right after
    `decoder_start_token_id`.
    """
    if not family_of(cfg).encoder_decoder:
        return (rows_BT1[:, :-1],), rows_BT1[:, 1:]
    T = rows_BT1.shape[1] - 1
    half = T // 2
    enc_BS = rows_BT1[:, :half]
    tgt_BT = rows_BT1[:, half:T]
    start_B1 = jnp.full((rows_BT1.shape[0], 1), cfg.decoder_start_token_id, rows_BT1.dtype)
    dec_BT = jnp.concatenate([start_B1, tgt_BT[:, :-1]], axis=1)
    return (enc_BS, dec_BT), tgt_BT


def loss_terms(model, rows_BT1):
    """(lm, aux, z): mean cross-entropy over the targets; aux and z averaged over the MoE layers."""
    inputs, tgt_BT = split_batch(model.cfg, rows_BT1)
    out = model(*inputs)
    lm = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), tgt_BT))
    logits, ids = _routing(out)
    if not logits:
        zero = jnp.zeros((), jnp.float32)
        return lm, zero, zero
    aux = jnp.mean(jnp.stack([load_balance_loss(lg, i) for lg, i in zip(logits, ids)]))
    z = jnp.mean(jnp.stack([router_z_loss(lg) for lg in logits]))
    return lm, aux, z


# ---------------------------------------------------------------------------------------- optimizer/step


def make_optimizer(tc: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (or Adafactor) with linear warm-up and cosine decay to min_lr_ratio · lr, after global-norm
    clipping. AdamW's weight decay applies to matrices only (not norm scales or biases).
    """
    warmup = min(tc.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    if tc.optimizer == "adafactor":
        # Factored second moments, update clipping at RMS 1, step scaled by the parameter's RMS (T5);
        # no weight decay, as in T5 / Switch pre-training.
        inner = optax.adafactor(schedule, multiply_by_parameter_scale=True, clipping_threshold=1.0)
    else:
        inner = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask)
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), inner)
    return opt, schedule


def make_steps(graphdef, opt: optax.GradientTransformation, tc: TrainConfig):
    """Pure jitted `train_step(params, rest, opt_state, rows) -> (params, opt_state, metrics)` and
    `eval_step(params, rest, rows) -> (sum of target NLL, count)`; `graphdef` is closed over (static)."""

    def objective(params, rest, rows_BT1):
        lm, aux, z = loss_terms(nnx.merge(graphdef, params, rest), rows_BT1)
        loss = lm + tc.aux_loss_coef * aux + tc.z_loss_coef * z
        return loss, {"loss": loss, "lm_loss": lm, "aux": aux, "z": z}

    @jax.jit
    def train_step(params, rest, opt_state, rows_BT1):
        grads, metrics = jax.grad(objective, has_aux=True)(params, rest, rows_BT1)
        updates, opt_state = opt.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    @jax.jit
    def eval_step(params, rest, rows_BT1):
        model = nnx.merge(graphdef, params, rest)
        inputs, tgt_BT = split_batch(model.cfg, rows_BT1)
        logits = model(*inputs).logits.astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tgt_BT)
        return jnp.sum(nll), nll.size

    return train_step, eval_step


def perplexity(eval_step, params, rest, rows_NT1: np.ndarray, batch_size: int, max_batches: int) -> float:
    """exp(mean target NLL) over `max_batches` batches of rows spread evenly over `rows_NT1` (fixed)."""
    n = min(max_batches, len(rows_NT1) // batch_size)
    if n == 0:
        raise TrainingError(f"{len(rows_NT1)} evaluation sequences are fewer than one batch of {batch_size}")
    # Rows spread evenly over the split: packed rows follow documents, so the first rows are few documents.
    rows_NT1 = rows_NT1[np.linspace(0, len(rows_NT1) - 1, n * batch_size).astype(np.int64)]
    total, count = 0.0, 0
    for i in range(n):
        s, c = eval_step(params, rest, jnp.asarray(rows_NT1[i * batch_size : (i + 1) * batch_size]))
        total += float(s)
        count += int(c)
    return math.exp(total / count)


# ------------------------------------------------------------------------------------------------- files


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


class JsonlLog:
    """Append-only JSON-lines log; each record is one write of one line, flushed and fsync'ed."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is None:
            _write_atomic(path, "")
        elif path.exists():  # resuming: drop records past the restored step (a new run rewrites them)
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= keep_until_step
            ]
            _write_atomic(path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _domain_rows(corpus: str, split: str, tok, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """Packed rows of each domain of a split apart ({'prose': ..., 'code': ...})."""
    tokens = data.tokenize_documents(corpus, split, tok)
    domains = np.asarray(tokens["domain"])
    eos = data.special_ids(tok)["eos"]
    out = {}
    for d in sorted(set(domains.tolist())):
        sub = tokens.select(np.flatnonzero(domains == d).tolist())
        try:
            out[d] = data.pack_documents(sub, seq_len, eos, seed)
        except ValueError:
            continue  # too few tokens of this domain for one row
    return out


def _tokenizer(out: Path, tc: TrainConfig):
    """DIR/tokenizer.json if present (resume), else the configured one or one trained on the train split."""
    path = out / "tokenizer.json"
    if path.is_file():
        return data.load_tokenizer(path)
    if tc.tokenizer:
        tok = data.load_tokenizer(tc.tokenizer)
    else:
        data.ensure_corpus(tc.corpus)
        tok = data.train_tokenizer(tc.corpus, tc.vocab_size)
    data.save_tokenizer(tok, path)
    return data.load_tokenizer(path)


def _with_token_ids(cfg: ModelConfig, tok) -> ModelConfig:
    ids = data.special_ids(tok)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.get_vocab_size()} tokens but ModelConfig.vocab_size={cfg.vocab_size}"
        )
    changes = dict(pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    if family_of(cfg).encoder_decoder:
        changes["decoder_start_token_id"] = ids["pad"]  # T5 convention: start = pad
    return cfg.replace(**changes)


# -------------------------------------------------------------------------------------------------- train


def train(
    model_cfg: ModelConfig,
    tc: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    dense: bool = False,
    export_dir: str | os.PathLike | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train, checkpoint, evaluate and export; returns the metrics written to DIR/metrics.json.

    `stop_after`: stop (as if interrupted) once this many steps are done, after checkpointing them;
    the schedule still follows `tc.steps`. Returns {} in that case.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense = dense or tc.dense
    cfg = dense_config(model_cfg) if dense else model_cfg
    run = {"model": cfg.to_dict(), "train": dataclasses.asdict(tc), "dense": dense}
    run_path = out / "run.json"
    if resume and run_path.is_file():
        before = json.loads(run_path.read_text())
        before["train"].pop("max_minutes", None)
        now = json.loads(json.dumps(run, default=list))
        now["train"].pop("max_minutes", None)
        before["model"] = {k: v for k, v in before["model"].items() if not k.endswith("token_id")}
        now["model"] = {k: v for k, v in now["model"].items() if not k.endswith("token_id")}
        diff = sorted(
            f"{sec}.{k}"
            for sec in ("model", "train")
            for k in set(before[sec]) | set(now[sec])
            if before[sec].get(k) != now[sec].get(k)
        )
        if diff or before["dense"] != now["dense"]:
            raise TrainingError(f"{run_path}: --resume with a different config; changed: {diff or ['dense']}")
    elif not resume and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")

    tok = _tokenizer(out, tc)
    cfg = _with_token_ids(cfg, tok)
    _write_atomic(run_path, json.dumps({**run, "model": cfg.to_dict()}, indent=2, default=list))
    train_rows = data.lm_sequences(tc.corpus, "train", tok, tc.seq_len, tc.seed)
    val_rows = data.lm_sequences(tc.corpus, "validation", tok, tc.seq_len, tc.seed)

    model = build_model(cfg, tc.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt, schedule = make_optimizer(tc, tc.steps)
    opt_state = opt.init(params)
    train_step, eval_step = make_steps(graphdef, opt, tc)

    ckpt = ocp.CheckpointManager(
        (out / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True),
    )
    start = 0
    if resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        target = {"params": params, "opt_state": opt_state}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = ckpt.restore(start, args=ocp.args.StandardRestore(abstract))
        params, opt_state = restored["params"], restored["opt_state"]
    log = JsonlLog(out / "log.jsonl", keep_until_step=start if resume else None)

    batches = data.iterate_batches(train_rows, tc.batch_size, tc.seed, num_epochs=None)
    batches = itertools.islice(batches, start, None)  # resume: same data order as an uninterrupted run
    tokens_per_step = tc.batch_size * tc.seq_len
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(
        total=tc.steps,
        initial=start,
        disable=not progress,
        desc=cfg.name or cfg.family,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    t_log, steps_since_log = t0, 0
    deadline = None if tc.max_minutes is None else t0 + 60 * tc.max_minutes
    step = start
    val_ppl = None
    while step < end:
        rows = jnp.asarray(next(batches))
        new_params, new_opt, metrics = train_step(params, rest, opt_state, rows)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            bar.close()
            ckpt.wait_until_finished()
            raise TrainingError(
                f"{out}: non-finite loss {loss} at step {step} (lm={float(metrics['lm_loss'])}, "
                f"aux={float(metrics['aux'])}, z={float(metrics['z'])}); last good checkpoint: "
                f"step {ckpt.latest_step()} in {out / 'checkpoints'}"
            )
        # The state before this step had a finite loss: checkpoint it if due.
        if (step > start or step == 0) and step % tc.checkpoint_every == 0:
            ckpt.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        params, opt_state = new_params, new_opt
        step += 1
        steps_since_log += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        do_eval = step % tc.eval_every == 0 or step == tc.steps
        if step % tc.log_every == 0 or do_eval or step == end:
            now = time.perf_counter()
            rec = {
                "step": step,
                **{k: round(float(v), 6) for k, v in metrics.items()},
                "lr": float(schedule(step - 1)),
                "tokens_per_s": round(steps_since_log * tokens_per_step / (now - t_log), 1),
                "elapsed_s": round(now - t0, 1),
            }
            if do_eval:
                val_ppl = perplexity(eval_step, params, rest, val_rows, tc.batch_size, tc.eval_batches)
                rec["val_ppl"] = round(val_ppl, 4)
                bar.write(f"step {step}: loss {loss:.4f} val_ppl {val_ppl:.2f}")
            log.write(rec)
            t_log, steps_since_log = time.perf_counter(), 0
        if deadline is not None and time.perf_counter() > deadline:
            bar.write(f"max_minutes={tc.max_minutes} reached at step {step}")
            break
    bar.close()
    train_s = time.perf_counter() - t0
    ckpt.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    if step < tc.steps and stop_after is not None:
        return {}

    model = nnx.merge(graphdef, params, rest)
    if val_ppl is None or step % tc.eval_every:
        val_ppl = perplexity(eval_step, params, rest, val_rows, tc.batch_size, tc.eval_batches)
    if not math.isfinite(val_ppl):
        raise TrainingError(f"{out}: validation perplexity is {val_ppl} after step {step}")
    test = {
        d: perplexity(eval_step, params, rest, rows, tc.batch_size, tc.test_batches)
        for d, rows in _domain_rows(tc.corpus, "test", tok, tc.seq_len, tc.seed).items()
    }
    test_rows = data.lm_sequences(tc.corpus, "test", tok, tc.seq_len, tc.seed)
    metrics = {
        "name": cfg.name,
        "dense": dense,
        "train_time_s": round(train_s, 1),
        "steps": step,
        "tokens": step * tokens_per_step,
        "final_val_ppl": round(val_ppl, 4),
        "test_ppl": round(perplexity(eval_step, params, rest, test_rows, tc.batch_size, tc.test_batches), 4),
        "test_ppl_by_domain": {d: round(v, 4) for d, v in test.items()},
        "params": param_counts(cfg, model),
        "corpus": tc.corpus,
        "vocab_size": tok.get_vocab_size(),
        "export_dtype": tc.export_dtype,
        "command": command,
    }
    export = Path(export_dir) if export_dir is not None else out / "final"
    export_model(model, tok, export, metrics, tc.export_dtype, command)
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def restore(out_dir: str | os.PathLike, step: int | None = None):
    """The model of a run directory at checkpoint `step` (default the latest), from run.json + orbax."""
    out = Path(out_dir)
    run = json.loads((out / "run.json").read_text())
    cfg = from_dict(ModelConfig, run["model"], str(out / "run.json"))
    tc = from_dict(TrainConfig, run["train"], str(out / "run.json"))
    model = build_model(cfg, tc.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt, _ = make_optimizer(tc, tc.steps)
    target = {"params": params, "opt_state": opt.init(params)}
    with ocp.CheckpointManager((out / "checkpoints").absolute()) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise TrainingError(f"{out / 'checkpoints'}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = ckpt.restore(step, args=ocp.args.StandardRestore(abstract))
    return nnx.merge(graphdef, restored["params"], rest)


def export_model(model, tok, path: Path, metrics: dict, dtype: str, command: str | None) -> Path:
    """HF-format checkpoint (in `dtype`) + tokenizer.json + metrics.json + README.md, written atomically."""
    from moecxl.model import hf

    path = Path(path)
    hf.save(cast_model(model, dtype) if dtype != model.cfg.dtype else model, path)
    data.save_tokenizer(tok, path / "tokenizer.json")
    _write_atomic(path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    name = metrics.get("name") or path.name
    lines = [
        f"# {name}",
        "",
        f"moecxl-trained MoE LM ({model.cfg.family}, L={model.cfg.num_layers}, E={model.cfg.num_experts}, "
        f"K={model.cfg.top_k}, D={model.cfg.hidden_size}, F={model.cfg.intermediate_size}), {dtype}; "
        f"val ppl {metrics['final_val_ppl']}, test ppl {metrics['test_ppl']} "
        f"({metrics['test_ppl_by_domain']}), {metrics['steps']} steps in {metrics['train_time_s']} s.",
        "",
        f"Reproduce: `{command}`" if command else "",
    ]
    _write_atomic(path / "README.md", "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m moecxl.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML with model: and train: sections")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final/)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dense", action="store_true", help="dense baseline with the same active parameters")
    p.add_argument("--export", default=None, help="final HF checkpoint dir (default OUT/final)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    model_cfg, tc = load_config(args.config)
    if args.steps is not None:
        tc = dataclasses.replace(tc, steps=args.steps)
    if args.max_minutes is not None:
        tc = dataclasses.replace(tc, max_minutes=args.max_minutes)
    command = "python -m moecxl.train " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume", "--no-progress")
    )
    metrics = train(
        model_cfg,
        tc,
        args.out,
        resume=args.resume,
        dense=args.dense,
        export_dir=args.export,
        progress=not args.no_progress,
        command=command,
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
