"""Latency sweeps on this machine: policies x hardware profiles x device budgets x batch sizes x prompt
lengths, each repeated, reported as medians with the interquartile range.

Copies are real; with `mode="emulated"` each completes no earlier than the profile predicts for the
target model's expert (Mixtral-8x7B by default), time-scaled so that copy time over measured layer
compute equals the target's (timing "emulated"). `mode="measured"` lets copies take the time they take
(timing "measured-cpu", or "measured-gpu" on a GPU). Resident runs (`policy="resident"`) are the
reference every row's `tpot_over_resident` divides by.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moecxl.evaluation.inputs import EvalError

SUMMARY_METRICS = (
    "ttft_s",
    "tpot_s",
    "tokens_per_s",
    "hit_rate",
    "stall_s",
    "prefetch_precision",
    "control_us_median_decode",
)
MODES = ("emulated", "measured")


@dataclass(frozen=True)
class Sweep:
    """One latency experiment: what to vary and how often to repeat each point."""

    profiles: tuple = ("h100-cxl", "h100-pcie4-dram")
    policies: tuple = ("on_demand", "lru", "pregate", "moecxl", "oracle")
    budgets: tuple = (0.25, 0.5)
    batches: tuple = (1,)
    prompt_lens: tuple = (16,)
    new_tokens: int = 8
    repeats: int = 3
    target: str | None = "mixtral-8x7b"
    modes: tuple = ("emulated",)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def summarize(values) -> dict:
    """Median, quartiles and IQR of the finite values (None when there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not len(v):
        return {"median": None, "q25": None, "q75": None, "iqr": None}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25)}


def aggregate(runs: list[dict]) -> dict:
    """One flat row from repeated runs' metrics: medians under the metric names, `<name>_iqr` =
    [q25, q75], per-tier bytes and per-layer hit rates as medians, raw values under `repeats`."""
    row: dict = {}
    for name in SUMMARY_METRICS:
        vals = [r.get(name) for r in runs]
        s = summarize(vals)
        row[name] = s["median"]
        row[f"{name}_iqr"] = [s["q25"], s["q75"]]
    tiers = sorted({t for r in runs for t in r.get("bytes_by_tier", {})})
    row["bytes_by_tier"] = {
        t: float(np.median([r.get("bytes_by_tier", {}).get(t, 0) for r in runs])) for t in tiers
    }
    layers = [r["hit_rate_by_layer"] for r in runs if r.get("hit_rate_by_layer")]
    row["hit_rate_by_layer"] = np.median(np.asarray(layers), axis=0).tolist() if layers else []
    row["repeats"] = {name: [r.get(name) for r in runs] for name in ("ttft_s", "tpot_s", "tokens_per_s")}
    return row


def prompts(
    vocab_size: int, batch: int, prompt_len: int, seed: int = 0, corpus_rows=None, special=(0, 1, 2)
) -> np.ndarray:
    """int [batch, prompt_len]: rows of a tokenised corpus when given (cycled), else seeded random ids
    that avoid the `special` ids (the model config's pad/bos/eos)."""
    if corpus_rows is not None and len(corpus_rows) and corpus_rows.shape[1] >= prompt_len:
        idx = np.arange(batch) % len(corpus_rows)
        return np.asarray(corpus_rows[idx, :prompt_len], np.int64)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special, np.int64))
    return allowed[np.random.default_rng(seed).integers(0, len(allowed), (batch, prompt_len))]


def special_ids(cfg) -> tuple[int, ...]:
    """The model config's pad, bos and eos ids (no tokenizer needed): what random prompts avoid."""
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    return tuple(int(i) for i in (cfg.pad_token_id, cfg.bos_token_id, *eos) if i is not None)


def sweep(model, sw: Sweep, *, corpus_rows=None, progress=print) -> list[dict]:
    """Rows of a latency sweep (see the module docstring). Configurations the engine refuses (a budget
    too small for the batch) become rows with `skipped` saying why."""
    from moecxl.evaluation.inputs import resolve_profile, resolve_target
    from moecxl.generate import generate
    from moecxl.runtime.engine import EngineError, OffloadEngine, calibrate_time_scale
    from moecxl.runtime.policies import POLICIES

    for p in sw.policies:
        if p not in POLICIES:
            raise EvalError(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    for mode in sw.modes:
        if mode not in MODES:
            raise EvalError(f"unknown timing mode {mode!r}; known: {', '.join(MODES)}")
    if sw.repeats < 1 or sw.new_tokens < 2:
        raise EvalError(f"need repeats >= 1 and new_tokens >= 2 (TPOT), got {sw.repeats}, {sw.new_tokens}")
    hws = [resolve_profile(p) for p in sw.profiles]
    target = resolve_target(sw.target)
    target_name = target.name if target is not None else (model.cfg.name or "self")
    say = progress or (lambda msg: None)
    rows = []
    for batch in sw.batches:
        for plen in sw.prompt_lens:
            x = prompts(model.cfg.vocab_size, batch, plen, sw.seed, corpus_rows, special_ids(model.cfg))
            generate(model, x, max_new_tokens=2)  # compile this shape outside the measurement
            ref = generate(model, x, max_new_tokens=sw.new_tokens)
            runs = [generate(model, x, max_new_tokens=sw.new_tokens).metrics for _ in range(sw.repeats)]
            res_row = {
                "profile": "resident",
                "policy": "resident",
                "budget": 1.0,
                "batch": batch,
                "prompt_len": plen,
                "timing": runs[0]["timing"],
                "mode": "resident",
                **aggregate(runs),
            }
            res_row["tpot_over_resident"] = 1.0
            rows.append(res_row)
            resident_tpot = res_row["tpot_s"]
            say(f"resident B={batch} T={plen}: TPOT {resident_tpot * 1e3:.2f} ms")
            scales = {}
            for hw, mode, budget, pol in itertools.product(hws, sw.modes, sw.budgets, sw.policies):
                key = {
                    "profile": hw.name,
                    "policy": pol,
                    "budget": budget,
                    "batch": batch,
                    "prompt_len": plen,
                    "mode": mode,
                }
                if (hw.name, mode) not in scales:
                    scales[hw.name, mode] = (
                        calibrate_time_scale(model, hw, target or model.cfg) if mode == "emulated" else 1.0
                    )
                engine = functools.partial(
                    OffloadEngine,
                    model,
                    hardware=hw,
                    policy=pol,
                    device_budget=budget,
                    emulate=mode == "emulated",
                    time_scale=scales[hw.name, mode],
                    target_model=target,
                    trace=ref if pol == "oracle" else None,
                )
                try:
                    runs, same = _repeat(model, x, engine, sw, ref, generate)
                except EngineError as e:
                    rows.append({**key, "skipped": str(e)})
                    say(f"skip {key}: {e}")
                    continue
                row = {**key, "timing": runs[0]["timing"], **aggregate(runs)}
                row["time_scale"] = scales[hw.name, mode]
                row["target_model"] = target_name
                row["bit_identical_to_resident"] = same
                row["exact"] = bool(runs[0]["exact"])
                row["tpot_over_resident"] = (
                    row["tpot_s"] / resident_tpot if row["tpot_s"] and resident_tpot else None
                )
                rows.append(row)
                say(
                    f"{hw.name:>16} {mode:8} b={budget:<5g} B={batch:<3} T={plen:<5} {pol:>12}: "
                    f"TPOT {row['tpot_s'] * 1e3:8.2f} ms (x{row['tpot_over_resident']:.2f}) hit {row['hit_rate']:.3f}"
                )
    return rows


def _repeat(model, x, engine, sw: Sweep, ref, generate):
    warm = engine()  # compile this policy's steps outside the measurement
    try:
        generate(model, x, max_new_tokens=2, engine=warm)
    finally:
        warm.close()
    runs, same = [], True
    for _ in range(sw.repeats):
        eng = engine()
        try:
            res = generate(model, x, max_new_tokens=sw.new_tokens, engine=eng)
        finally:
            eng.close()
        same = same and bool(np.array_equal(res.logits, ref.logits))
        runs.append(res.metrics)
    return runs, same


def corpus_prompt_rows(tok, corpus: str, prompt_len: int) -> np.ndarray:
    """int32 [N, prompt_len]: the test split packed as the tokenizer frames documents (BOS? text EOS),
    each row framed as the tokenizer frames a prompt (its BOS where it adds one; an encoder-decoder's
    EOS last)."""
    from moecxl.data import lm_sequences

    prefix, suffix = tok.prompt_frame()
    n = prompt_len - len(prefix) - len(suffix)
    rows = lm_sequences(corpus, "test", tok, n)[:, :n]
    frame = [np.broadcast_to(np.asarray(f, np.int32), (len(rows), len(f))) for f in (prefix, suffix)]
    return np.concatenate([frame[0], rows, frame[1]], 1)


def run(
    model_dir=None,
    sw: Sweep = Sweep(),
    *,
    corpus: str | None = None,
    tokenizer=None,
    model=None,
    progress=print,
) -> dict:
    """The `eval/latency.py` job: a `latency` result document. `corpus`: prompts from its test split
    with the checkpoint's tokenizer (or `tokenizer`: a tokenizer.json or directory); None: seeded random
    token ids."""
    import time as _t

    from moecxl.evaluation.inputs import load_model, load_tokenizer_of
    from moecxl.evaluation.results import envelope

    if model is None:
        model = load_model(model_dir)
    corpus_rows, prompt_src, tok_meta = None, "random token ids (seeded)", None
    if corpus:
        tok = load_tokenizer_of(model_dir, tokenizer, model.cfg)
        corpus_rows = corpus_prompt_rows(tok, corpus, max(sw.prompt_lens))
        prompt_src, tok_meta = f"{corpus}:test", tok.metadata()
    t0 = _t.perf_counter()
    rows = sweep(model, sw, corpus_rows=corpus_rows, progress=progress)
    cfg = asdict(sw) | {"prompts": prompt_src, "tokenizer": tok_meta, "wall_s": _t.perf_counter() - t0}
    return envelope(
        "latency",
        rows,
        model={
            "path": str(model_dir) if model_dir else None,
            "name": model.cfg.name or (Path(model_dir).name if model_dir else ""),
            "family": model.cfg.family,
        },
        config=cfg,
    )


def cli(out, model_dir, sw: Sweep, corpus: str | None = None, tokenizer=None) -> int:
    """`eval/latency.py`: run the sweep, write the result file, print where it is."""
    from moecxl.evaluation.results import write_result

    t0 = time.perf_counter()
    doc = run(model_dir, sw, corpus=corpus, tokenizer=tokenizer)
    write_result(out, doc)
    print(f"wrote {out} ({len(doc['rows'])} rows, {time.perf_counter() - t0:.0f} s)")
    return 0


def default_modes() -> tuple:
    """Emulated links everywhere; also real copies where a GPU exists (timing measured-gpu)."""
    import jax

    return ("emulated", "measured") if jax.default_backend() == "gpu" else ("emulated",)
