"""Perplexity with every expert resident against the same model run through each offloading policy.

The sequence is teacher-forced through `generate`'s own per-layer steps (`core`, then the provider's
expert hand-off, then `experts`): mode "decode" feeds one true token per step with the KV cache (the
engine sees the visits a real decode sees, so HOBBIT's low-precision misses happen as they would),
mode "prefill" runs the whole sequence as one forward. An encoder-decoder (Switch) is scored as it is
trained, a prefix LM: its encoder reads the first half of a row once (prefill), its decoder predicts the
second half (`seq2seq.teacher_forced`; mode "prefill": the decoder in one step). Exact policies must give
logits bit-identical to the resident provider; `evaluate` records the check, the largest logit
difference and the delta.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from moecxl import seq2seq
from moecxl.evaluation.inputs import EvalError
from moecxl.generate import (
    ResidentExperts,
    _bucket,
    _core_jit,
    _embed_jit,
    _experts_jit,
    _Head,
    split_flat,
)
from moecxl.model.decoder import kv_cache
from moecxl.model.family import family_of
from moecxl.train import split_batch

MODES = ("decode", "prefill")


@functools.lru_cache(maxsize=16)
def _head_all_jit(graphdef, treedef):
    def head_fn(leaves, x_BTD):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x_BTD)

    return jax.jit(head_fn)


def score_rows(model, rows_BT1: np.ndarray, provider=None, mode: str = "decode"):
    """(logits [B, T', V], targets [B, T'], routing) of packed rows [B, T + 1], scored as training scores
    them (`train.split_batch`): a decoder predicts every next token; an encoder-decoder (Switch) reads the
    first half in its encoder and predicts the second half in its decoder."""
    if mode not in MODES:
        raise EvalError(f"mode must be one of {MODES}, got {mode!r}")
    inputs, tgt = split_batch(model.cfg, np.asarray(rows_BT1, np.int32))
    if family_of(model.cfg).encoder_decoder:
        logits, routing = seq2seq.teacher_forced(model, *(np.asarray(x) for x in inputs), provider, mode)
    else:
        logits, routing = teacher_forced(model, np.asarray(inputs[0]), provider, mode)
    return logits, np.asarray(tgt), routing


def teacher_forced(model, ids_BT: np.ndarray, provider=None, mode: str = "decode"):
    """(logits float32 [B, T, V], routing): the model's predictions at every position of `ids_BT`.

    `provider`: an `OffloadEngine` (or any ExpertProvider); None keeps every expert resident. `routing`
    is one list per forward step of per-MoE-layer id arrays (what an oracle engine is given as trace).
    Decoder families; an encoder-decoder goes through `score_rows` (`seq2seq.teacher_forced`).
    """
    if mode not in MODES:
        raise EvalError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = model.cfg
    if family_of(cfg).encoder_decoder:
        raise EvalError(
            f"teacher_forced reads one token sequence; a {cfg.family!r} model (encoder-decoder) is scored "
            "by score_rows (encoder prefix, decoder targets)"
        )
    ids_BT = np.asarray(ids_BT, np.int32)
    B, T = ids_BT.shape
    if cfg.max_position_embeddings < T:
        raise EvalError(f"sequence length {T} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    provider = provider if provider is not None else ResidentExperts(model)
    S = _bucket(T)
    dt = model.embed_VD[...].dtype
    kvs = [kv_cache(cfg, B, S, dt) for _ in model.layers]
    layers = [split_flat(layer.core) for layer in model.layers]
    cores = [_core_jit(*k) for k, _ in layers]
    head_key, head_leaves = split_flat(_Head(model))
    head = _head_all_jit(*head_key)
    embed_VD = model.embed_VD[...]
    key_valid = np.zeros((B, S), bool)
    routing = []

    experts_step = getattr(provider, "experts_fn", None) or _experts_jit  # host compute, expert parallel
    after = getattr(provider, "after_experts", None)

    def forward(start, stop, phase, step):
        key_valid[:, start:stop] = True
        q = np.broadcast_to(np.arange(start, stop, dtype=np.int32), (B, stop - start))
        x, mask_BTS = _embed_jit(embed_VD, ids_BT[:, start:stop], key_valid, q, cfg.sliding_window)
        provider.begin(phase, step)
        ids_step = []
        m = 0
        for li, (_, leaves) in enumerate(layers):
            co, kvs[li] = cores[li](leaves, x, q, mask_BTS, kvs[li], np.int32(start))
            if co.ids_BTK is None:
                x = co.h_BTD
                continue
            ins, out, slot_E = provider.experts(m, co)
            x = experts_step(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E)
            if after is not None:
                after(m)
            ids_step.append(np.asarray(co.ids_BTK))
            m += 1
        provider.end(phase, step)
        routing.append(ids_step)
        return head(head_leaves, x)

    first = T if mode == "prefill" else 1
    logits = [np.asarray(forward(0, first, "prefill", 0))]
    for i, t in enumerate(range(first, T)):
        logits.append(np.asarray(forward(t, t + 1, "decode", i + 1)))
    return np.concatenate(logits, axis=1), routing


def token_nll(logits_BTV: np.ndarray, targets_BT: np.ndarray) -> np.ndarray:
    """float64 [B, T]: -log p(target) under softmax(logits), computed stably in float64."""
    lg = logits_BTV.astype(np.float64)
    mx = lg.max(axis=-1, keepdims=True)
    lse = mx[..., 0] + np.log(np.exp(lg - mx).sum(axis=-1))
    return lse - np.take_along_axis(lg, targets_BT[..., None].astype(np.int64), axis=-1)[..., 0]


def evaluate(
    model,
    sequences_NT1: np.ndarray,
    policies=("lru",),
    *,
    make_engine=None,
    batch_size: int = 4,
    mode: str = "decode",
    progress=None,
) -> list[dict]:
    """Perplexity rows: `resident` first, then one per policy, on packed rows [N, T + 1].

    `make_engine(policy, trace)` builds the engine of a policy (`trace`: the resident routing, for the
    oracle); default `OffloadEngine(model, policy=...)` on the local profile. Each policy's engine lives
    across all batches, as a serving engine would. Rows carry `bit_identical` (logits equal to resident
    bit for bit), `max_abs_logit_diff`, `ppl_delta` and the engine's hit rate and bytes per tier.
    """
    seqs = np.asarray(sequences_NT1)
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise EvalError(f"sequences must be [N, T + 1] with T >= 1, got shape {seqs.shape}")
    if make_engine is None:
        from moecxl.runtime.engine import OffloadEngine

        def make_engine(policy, trace):
            return OffloadEngine(model, policy=policy, trace=trace if policy == "oracle" else None)

    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    say = progress or (lambda msg: None)

    def run(provider, label):
        t0 = time.perf_counter()
        nll_sum, n, logits_all, routing_all = 0.0, 0, [], []
        for b in batches:
            logits, tgt, routing = score_rows(model, b, provider, mode)
            nll = token_nll(logits, tgt)
            nll_sum += float(nll.sum())
            n += nll.size
            logits_all.append(logits)
            routing_all.extend(routing)
        say(f"{label}: nll {nll_sum / n:.4f} over {n} tokens in {time.perf_counter() - t0:.1f} s")
        return nll_sum / n, n, logits_all, routing_all, time.perf_counter() - t0

    nll0, n0, ref_logits, ref_routing, wall0 = run(None, "resident")
    ppl0 = math.exp(nll0)
    rows = [
        {
            "policy": "resident",
            "exact": True,
            "nll": nll0,
            "perplexity": ppl0,
            "tokens": n0,
            "bit_identical": True,
            "max_abs_logit_diff": 0.0,
            "ppl_delta": 0.0,
            "ppl_rel_delta": 0.0,
            "mode": mode,
            "wall_s": wall0,
        }
    ]
    for policy in policies:
        eng = make_engine(policy, ref_routing)
        try:
            nll, n, logits, _, wall = run(eng, policy)
            m = eng.metrics()
        finally:
            eng.close()
        same = all(np.array_equal(a, b) for a, b in zip(logits, ref_logits))
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(logits, ref_logits))
        rows.append(
            {
                "policy": policy,
                "exact": bool(m["exact"]),
                "nll": nll,
                "perplexity": math.exp(nll),
                "tokens": n,
                "bit_identical": same,
                "max_abs_logit_diff": diff,
                "ppl_delta": math.exp(nll) - ppl0,
                "ppl_rel_delta": math.exp(nll) / ppl0 - 1.0,
                "mode": mode,
                "wall_s": wall,
                "hit_rate": m["hit_rate"],
                **approximation_uses(m),
                "bytes_by_tier": m["bytes_by_tier"],
                "timing": m["timing"],
                "hardware": m["hardware"],
                "device_budget_bytes": m["device_budget_bytes"],
            }
        )
    return rows


def approximation_uses(m: dict) -> dict:
    """How often a run used an inexact path, from the engine's metrics: int8 copies fetched (HOBBIT; each
    serves at least the use it was fetched for) and expert uses computed on the host (Fiddler, moecxl_host,
    moecxl_nd; a host kernel's numerics differ from the device's), out of all expert uses."""
    int8 = int(m["striping"]["not_striped"].get("low-precision", 0))
    host = int(m["miss_choices"]["host"]) + int(m["inflight_host_computed"])
    return {
        "expert_uses": int(m["hits"] + m["inflight_hits"] + m["misses"]),
        "int8_copies": int8,
        "host_computed_uses": host,
        "approximate_uses": int8 + host,
    }


def unused_approximations(rows: list[dict]) -> list[str]:
    """Inexact policies whose run never used their approximation (their delta says nothing), as messages."""
    return [
        f"policy {r['policy']!r} is inexact but used no int8 copy and computed no expert on the host in "
        f"mode {r.get('mode')!r}: its perplexity delta does not measure its approximation"
        for r in rows
        if not r.get("exact") and not r.get("skipped") and r.get("approximate_uses") == 0
    ]


def exactness_violations(rows: list[dict]) -> list[str]:
    """Policies that claim to be exact yet changed the logits (a broken contract), as messages."""
    return [
        f"policy {r['policy']!r} is exact but its logits differ from resident (max |diff| "
        f"{r['max_abs_logit_diff']:.3g}, perplexity delta {r['ppl_delta']:.3g})"
        for r in rows
        if r.get("exact") and not r.get("bit_identical")
    ]


def corpus_sequences(
    model_dir, corpus: str, split: str, tokens: int, seq_len: int, seed: int = 0, *, tokenizer=None
) -> np.ndarray:
    """About `tokens` target tokens of a corpus split as packed rows [N, seq_len + 1], with the
    checkpoint's own tokenizer (or `tokenizer`), documents framed as it frames them (BOS? text EOS)."""
    from moecxl.data import lm_sequences
    from moecxl.evaluation.inputs import load_tokenizer_of

    tok = load_tokenizer_of(model_dir, tokenizer)
    rows = lm_sequences(corpus, split, tok, seq_len, seed)
    n = max(1, math.ceil(tokens / seq_len))
    return rows[:n]


def run(
    model_dir,
    corpus: str = "mixed",
    split: str = "test",
    policies=("lru", "pregate", "hobbit", "oracle", "moecxl"),
    *,
    profile: str = "cpu-local",
    budget: float = 0.5,
    tokens: int = 512,
    seq_len: int = 128,
    batch_size: int = 4,
    mode: str = "decode",
    tokenizer=None,
    progress=print,
) -> dict:
    """The `eval/perplexity.py` job: a `perplexity` result document for one checkpoint and corpus split.

    `tokenizer`: a tokenizer.json (or directory) instead of MODEL_DIR/tokenizer.json. Engines use
    `profile` without link emulation (perplexity does not depend on timing)."""
    from moecxl.evaluation.inputs import load_model, load_tokenizer_of, resolve_profile
    from moecxl.evaluation.results import envelope
    from moecxl.runtime.engine import OffloadEngine
    from moecxl.runtime.policies import POLICIES

    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise EvalError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    model = load_model(model_dir)
    tok = load_tokenizer_of(model_dir, tokenizer, model.cfg)
    hw = resolve_profile(profile)
    seq_len = min(seq_len, model.cfg.max_position_embeddings - 1)
    seqs = corpus_sequences(model_dir, corpus, split, tokens, seq_len, tokenizer=tok)

    def make_engine(policy, trace):
        return OffloadEngine(
            model,
            hardware=hw,
            policy=policy,
            device_budget=budget,
            emulate=False,
            trace=trace if policy == "oracle" else None,
        )

    rows = evaluate(
        model,
        seqs,
        policies,
        make_engine=make_engine,
        batch_size=batch_size,
        mode=mode,
        progress=progress,
    )
    return envelope(
        "perplexity",
        rows,
        model={
            "path": str(model_dir),
            "name": model.cfg.name or Path(model_dir).name,
            "family": model.cfg.family,
        },
        config={
            "corpus": corpus,
            "split": split,
            "profile": hw.name,
            "budget": budget,
            "tokens": int(rows[0]["tokens"]),
            "seq_len": seq_len,
            "batch_size": batch_size,
            "mode": mode,
            "tokenizer": tok.metadata(),
        },
    )


def cli(out, model_dir, **kwargs) -> int:
    """`eval/perplexity.py`: run, write the result file, print the table; 1 if an exact policy differs."""
    from moecxl.evaluation.results import write_result

    doc = run(model_dir, **kwargs)
    write_result(out, doc)
    print(format_table(doc["rows"]))
    print(f"wrote {out}")
    bad = exactness_violations(doc["rows"])
    for msg in bad:
        print(f"error: {msg}")
    for msg in unused_approximations(doc["rows"]):
        print(f"warning: {msg}")
    return 1 if bad else 0


def format_table(rows: list[dict]) -> str:
    """A markdown table of perplexity rows (resident first). `approximate uses`: of an inexact policy, the
    expert uses served by its approximation (int8 copies, host-computed experts) out of all."""
    lines = [
        "| policy | exact | perplexity | delta | rel. delta | bit-identical | max abs logit diff | hit rate "
        "| approximate uses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['policy']} | | skipped: {r['skipped']} | | | | | | |")
            continue
        hit = r.get("hit_rate")
        lines.append(
            f"| {r['policy']} | {'yes' if r.get('exact') else 'no'} | {r['perplexity']:.4f} | "
            f"{r.get('ppl_delta', 0.0):+.4g} | {r.get('ppl_rel_delta', 0.0):+.3%} | "
            f"{r.get('bit_identical', '')} | {r.get('max_abs_logit_diff', 0.0):.3g} | "
            f"{'' if hit is None else f'{hit:.3f}'} | {_uses(r)} |"
        )
    return "\n".join(lines)


def _uses(r: dict) -> str:
    if r.get("exact") or "approximate_uses" not in r:
        return ""
    parts = [f"{r['int8_copies']} int8"] if r["int8_copies"] else []
    parts += [f"{r['host_computed_uses']} host"] if r["host_computed_uses"] else []
    if not parts:
        return f"0 of {r['expert_uses']}: approximation unused, delta not meaningful"
    return f"{' + '.join(parts)} of {r['expert_uses']}"
