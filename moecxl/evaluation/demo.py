"""Small, ready-made steps for the notebooks: which corpus, tokenizer, trace and predictor sizes to use,
a policy comparison on emulated links and, where `moecxl.sim` exists, the same policies simulated.

Every size shrinks under `MOECXL_NOTEBOOK_TINY=1` (the test suite sets it) so a notebook runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

from moecxl.evaluation.inputs import REPO, tiny_mode


def demo_corpus(tiny: bool | None = None) -> tuple[str, str]:
    """(corpus, split): this package's own sources (local, instant) in tiny mode, else `mixed`:test."""
    if tiny_mode() if tiny is None else tiny:
        return f"file:{REPO / 'moecxl'}/**/*.py", "train"
    return "mixed", "test"


def demo_tokenizer(model_dir, vocab_size: int, corpus: str, cfg=None):
    """`model_dir`: where `demo_model` loaded from (or its description). The checkpoint's tokenizer with
    its special tokens when it has a tokenizer.json, else a BPE of the model's vocabulary size trained on
    `corpus` (a random model has no tokenizer of its own). `cfg`: the model's config (vocabulary check)."""
    from moecxl import tokenizer
    from moecxl.data import train_tokenizer

    p = Path(str(model_dir))
    if (p / "tokenizer.json").is_file():
        return tokenizer.load(p, cfg=cfg)
    return tokenizer.from_tokenizer(train_tokenizer(corpus, vocab_size=vocab_size), cfg)


def random_prompt(model, batch: int = 1, prompt_len: int = 16, seed: int = 0):
    """int [batch, prompt_len] seeded random ids that avoid the model config's pad/bos/eos ids."""
    from moecxl.evaluation.latency import prompts, special_ids

    return prompts(model.cfg.vocab_size, batch, prompt_len, seed, special=special_ids(model.cfg))


def trace_kwargs(tiny: bool | None = None) -> dict:
    """Arguments for `moecxl.traces.collect`: a few thousand tokens in tiny mode, more otherwise."""
    if tiny_mode() if tiny is None else tiny:
        return dict(tokens=1500, prompt_len=24, decode_tokens=4, decode_every=4, batch=8, sketch=8)
    return dict(tokens=20_000, prompt_len=64, decode_tokens=16, decode_every=4, batch=8, sketch=16)


def predictor_config(tiny: bool | None = None):
    """A small `predictor.train.TrainConfig` (seconds in tiny mode)."""
    from predictor.train import TrainConfig

    small = dict(
        d_model=32,
        num_heads=2,
        num_blocks=1,
        batch_size=128,
        warmup_steps=10,
        learning_rate=1e-2,
        val_windows=1000,
        test_windows=1000,
        library_size=32,
        latency_repeats=0,
        horizon=2,
        current_layers=2,
        features=("current", "history"),
    )
    if tiny_mode() if tiny is None else tiny:
        return TrainConfig(**small, max_steps=20, eval_every=10)
    return TrainConfig(**{**small, "horizon": 4, "current_layers": 4}, max_steps=400, eval_every=100)


def policy_sweep(tiny: bool | None = None, profiles=("h100-cxl", "h100-pcie4-dram")):
    """The `latency.Sweep` notebook 03 runs: every baseline and moecxl at one budget, emulated links."""
    from moecxl.evaluation.latency import Sweep

    if tiny_mode() if tiny is None else tiny:
        return Sweep(
            profiles=profiles[:1],
            policies=("lru", "pregate", "moecxl", "oracle"),
            budgets=(0.6,),
            prompt_lens=(8,),
            new_tokens=4,
            repeats=1,
        )
    return Sweep(
        profiles=profiles,
        policies=("on_demand", "lru", "pregate", "moe_infinity", "moecxl", "oracle"),
        budgets=(0.25, 0.5),
        prompt_lens=(16,),
        new_tokens=16,
        repeats=3,
    )


def simulate_policies(
    model,
    prompt_ids,
    policies,
    profile: str = "h100-cxl",
    budget: float = 0.25,
    target: str | None = "mixtral-8x7b",
    new_tokens: int = 16,
) -> list[dict]:
    """Replay one resident generation's routing through `moecxl.sim` for each policy (timing
    "simulated"). The target's shapes are used when its topology (L, E, K) matches the model's; else
    the model's own. A policy the simulator refuses becomes a row with `skipped`."""
    from moecxl.evaluation.inputs import resolve_profile, resolve_target
    from moecxl.generate import generate
    from moecxl.sim.costmodel import shape_of
    from moecxl.sim.simulate import SimConfig, SimError, simulate
    from moecxl.sim.workload import requests_from_generate

    hw = resolve_profile(profile)
    res = generate(model, prompt_ids, max_new_tokens=new_tokens)
    requests = requests_from_generate(res)
    tcfg = resolve_target(target)
    own = shape_of(model.cfg)
    shape = own
    if tcfg is not None:
        t = shape_of(tcfg, shape_only=True)
        shape = t if (t.L, t.E, t.K) == (own.L, own.E, own.K) else own
    rows = []
    for pol in policies:
        key = {"profile": hw.name, "policy": pol, "budget": budget, "target_model": shape.name}
        try:
            m = simulate(requests, shape, hw, SimConfig(policy=pol, device_budget=budget)).metrics
        except (SimError, ValueError) as e:
            rows.append({**key, "skipped": str(e)})
            continue
        rows.append(
            {
                **key,
                **{
                    k: m[k]
                    for k in (
                        "timing",
                        "ttft_s",
                        "tpot_s",
                        "tokens_per_s",
                        "hit_rate",
                        "stall_s",
                        "bytes_by_tier",
                    )
                },
            }
        )
    return rows


def table(
    rows: list[dict],
    columns=("profile", "policy", "budget", "timing", "ttft_s", "tpot_s", "hit_rate", "stall_s"),
) -> str:
    """Rows as a plain-text table for notebook output (skipped rows say why)."""

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [" | ".join(columns)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r.get('profile')} | {r.get('policy')} | skipped: {r['skipped']}")
        else:
            lines.append(" | ".join(cell(r.get(c, "")) for c in columns))
    return "\n".join(lines)


def output_dir(notebook: str) -> Path:
    """Where a notebook writes: `$MOECXL_NOTEBOOK_OUT/<notebook>` or runs/notebooks/<notebook>[-tiny]."""
    import os

    root = os.environ.get("MOECXL_NOTEBOOK_OUT")
    base = Path(root) if root else REPO / "runs" / "notebooks"
    out = base / (f"{notebook}-tiny" if tiny_mode() else notebook)
    out.mkdir(parents=True, exist_ok=True)
    return out
