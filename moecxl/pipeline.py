"""The main job: from the shipped small models to a report, one command (`python -m moecxl`).

Stages (each a package entry point run as its own process, so a stage's memory is returned to the
system and a failure names its stage; outputs under `--out`, finished stages are skipped on a rerun):

  generate    text from the mixtral-topology model, resident (measured-cpu)
  traces      router traces of prose and code from the test split (+ hidden-state sketches)
  stats       routing statistics: entropies, popularity by domain, reuse distance
  predictor   the learned expert predictor against every baseline
  perplexity  resident vs each exact policy, one prefill step per sequence (identical logits)
  perplexity_decode  resident vs each inexact policy (hobbit, fiddler, moecxl_host, moecxl_nd), one token
              per step through the engine, where their approximations are used (int8 copies of misses,
              experts computed on the host): the perplexity delta and how often each was used
  latency     the main policies on emulated CXL-D (+ PCIe-5 DRAM), 25% and 50% device budgets (emulated)
  latency_pcie4  on-demand offloading from DRAM over PCIe 4, the paper's baseline (emulated)
  switch_perplexity  the shipped switch-topology model (Switch-Base-128's topology): resident vs each
              policy, encoder prefix and decoder targets, one decoder token per step
  switch_latency  switch-topology through the engine, emulated as Switch-Base-128 on CXL and PCIe 4
  simulate    Mixtral-8x7B at paper scale on the seed's hardware, driven by the traces (simulated)
  report      markdown + plots from everything above
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWITCH_MODEL = REPO / "models" / "switch-topology"  # the encoder-decoder stages' model (own tokenizer)
STAGES = (
    "generate",
    "traces",
    "stats",
    "predictor",
    "perplexity",
    "perplexity_decode",
    "latency",
    "latency_pcie4",
    "switch_perplexity",
    "switch_latency",
    "simulate",
    "report",
)


class PipelineError(RuntimeError):
    """A stage failed; the message names it and where its log is."""


def _stage_cmds(
    out: Path, model: str, quick: bool, tokenizer: str | None = None
) -> dict[str, tuple[list[str], Path]]:
    """The command of each stage and the file whose presence means it is done. `tokenizer`: a
    tokenizer.json (or directory) for the stages that tokenise, instead of MODEL/tokenizer.json."""
    py = sys.executable
    tok = ["--tokenizer", tokenizer] if tokenizer else []
    traces = out / "traces" / Path(model).name
    n_tokens = "4000" if quick else "16000"
    policies = [
        "on_demand",
        "lru",
        "lfu",
        "pregate",
        "moe_infinity",
        "hobbit",
        "oracle",
        "moecxl",
        "moecxl_nd",
    ]
    # inexact by design: scored one token per step, where a miss is a single token's (HOBBIT's int8 copy
    # goes to a low routing weight; the host computes a few tokens' experts)
    inexact = ["hobbit", "fiddler", "moecxl_host", "moecxl_nd"]
    exp = out / "simulate" / "experiment.yaml"
    return {
        "generate": (
            [
                py,
                "-m",
                "moecxl.pipeline",
                "_generate",
                "--model",
                model,
                "--out",
                str(out / "generate.json"),
                *tok,
            ],
            out / "generate.json",
        ),
        "traces": (
            [
                py,
                "-m",
                "moecxl.traces",
                "collect",
                "--model",
                model,
                "--corpus",
                "mixed",
                "--split",
                "test",
                "--tokens",
                n_tokens,
                "--prompt-len",
                "64",
                "--decode-tokens",
                "16",
                "--decode-every",
                "3",  # enough decoded sequences for two batch-32 requests in the simulation
                "--sketch",
                "16",
                "--out",
                str(traces),
                *tok,
            ],
            traces / "metadata.json",
        ),
        "stats": (
            [py, "-m", "moecxl.traces", "stats", str(traces), "--out", str(out / "stats")],
            out / "stats" / "stats.json",
        ),
        "predictor": (
            [
                py,
                str(REPO / "train_predictor.py"),
                "--traces",
                str(traces),
                "--model",
                model,
                "--out",
                str(out / "predictor"),
                "--no-progress",
            ]
            + ["--max-steps", "200" if quick else "600", "--batch-size", "512"],
            out / "predictor" / "metrics.json",
        ),
        "perplexity": (
            [
                py,
                str(REPO / "eval" / "perplexity.py"),
                "--model",
                model,
                "--corpus",
                "mixed",
                "--tokens",
                "256" if quick else "1024",
                "--seq-len",
                "128",
                "--mode",
                "prefill",  # one step per sequence: the exact policies' bit-identity over many tokens
                "--policies",
                *[p for p in policies if p not in inexact],
                "--budget",
                "0.25",
                "--profile",
                "h100-cxl",
                "--out",
                str(out / "results" / "perplexity.json"),
                *tok,
            ],
            out / "results" / "perplexity.json",
        ),
        "perplexity_decode": (
            [
                py,
                str(REPO / "eval" / "perplexity.py"),
                "--model",
                model,
                "--corpus",
                "mixed",
                "--tokens",
                "128" if quick else "256",  # one engine visit per token and layer: ~10 s per policy
                "--seq-len",
                "64",
                "--mode",
                "decode",
                "--policies",
                *inexact,
                "--budget",
                "0.25",
                "--profile",
                "h100-cxl",
                "--out",
                str(out / "results" / "perplexity-decode.json"),
                *tok,
            ],
            out / "results" / "perplexity-decode.json",
        ),
        "latency": _latency_cmd(
            py,
            model,
            out / "results" / "latency.json",
            quick,
            ["h100-cxl"],
            ["on_demand", "lru", "pregate", "oracle", "moecxl", "moecxl_nd"],
            ["0.25", "0.5"],
            tok,
        ),
        # the on-demand CPU-offloading baseline the paper compares against
        "latency_pcie4": _latency_cmd(
            py,
            model,
            out / "results" / "latency-pcie4.json",
            quick,
            ["h100-pcie4-dram"],
            ["on_demand", "moecxl_nd"],
            ["0.25"],
            tok,
        ),
        "switch_perplexity": (
            [
                py,
                str(REPO / "eval" / "perplexity.py"),
                "--model",
                str(SWITCH_MODEL),
                "--corpus",
                "mixed",
                "--tokens",
                "256" if quick else "512",  # rows of 128: the decoder scores the second 64 of each
                "--seq-len",
                "128",
                "--mode",
                "decode",
                "--policies",
                *policies[:-1],
                "--budget",
                "0.25",
                "--profile",
                "h100-cxl",
                "--out",
                str(out / "results" / "switch" / "perplexity.json"),
            ],
            out / "results" / "switch" / "perplexity.json",
        ),
        "switch_latency": _latency_cmd(
            py,
            str(SWITCH_MODEL),
            out / "results" / "switch" / "latency.json",
            quick,
            ["h100-cxl", "h100-pcie4-dram"],
            ["on_demand", "lru", "oracle", "moecxl", "moecxl_nd"],
            ["0.25"],
            target="switch-base-128",
        ),
        "simulate": (
            [
                py,
                str(REPO / "eval" / "simulate.py"),
                "--experiment",
                str(exp),
                "--out",
                str(out / "results" / "sim"),
            ],
            out / "results" / "sim" / "results.json",
        ),
        "report": (
            [
                py,
                str(REPO / "eval" / "report.py"),
                "--results",
                str(out / "results"),
                "--out",
                str(out / "report"),
                "--predictor-metrics",
                str(out / "predictor" / "metrics.json"),
                # the paper's comparison: on-demand CPU offloading over PCIe 4 against moecxl on CXL
                "--baseline-policy",
                "on_demand",
                "--baseline-profile",
                "h100-pcie4-dram",
                "--ours-profile",
                "h100-cxl",
            ],
            out / "report" / "report.md",
        ),
    }


def _latency_cmd(
    py, model, dst: Path, quick: bool, profiles, policies, budgets, tok=(), target: str = "mixtral-8x7b"
) -> tuple[list[str], Path]:
    """An `eval/latency.py` run at batch 1, prompt 32, a few tokens, one repeat (the 15-minute budget),
    copies emulated as `target`'s experts."""
    cmd = [
        py,
        str(REPO / "eval" / "latency.py"),
        "--model",
        model,
        "--profiles",
        *profiles,
        "--policies",
        *policies,
        "--budgets",
        *budgets,
        "--batch",
        "1",
        "--prompt-lens",
        "32",
        "--tokens",
        "6" if quick else "8",
        "--repeats",
        "1",
        "--corpus",
        "mixed",
        "--target",
        target,
        "--out",
        str(dst),
        *tok,
    ]
    return cmd, dst


def _write_experiment(out: Path, model: str, quick: bool) -> None:
    """The paper-scale experiment, pointed at this run's traces."""
    import yaml

    src = REPO / "configs" / "experiments" / "mixtral-8x7b.yaml"
    exp = yaml.safe_load(src.read_text())
    exp["trace"] = str(out / "traces" / Path(model).name)
    exp["predictor_model"] = model
    # The 15-minute budget: two profiles and the main policies; configs/experiments has the full run.
    exp["requests"] = 1
    exp["decode_tokens"] = 16
    exp["policies"] = ["on_demand", "lru", "pregate", "oracle", "moecxl", "moecxl_nd"]
    exp["headline"]["hardware"] = ["h100-pcie4-dram", "h100-pcie5-dram", "h100-cxl"]
    exp["batch"] = {"batches": [1, 8, 32], "runs": [["h100-pcie4-dram", "on_demand"], ["h100-cxl", "moecxl"]]}
    exp["long_context"]["prompt_tokens"] = [16384]
    exp["long_context"]["runs"] = [["h100-pcie4-dram", "on_demand"], ["h100-cxl", "moecxl"]]
    exp["failure"]["policies"] = ["moecxl"]
    exp["miss_handling"]["batches"] = [1, 32]
    exp["host_sensitivity"] |= {"hardware": ["h100-cxl"], "policies": ["moecxl_nd"], "batches": [1]}
    dst = out / "simulate" / "experiment.yaml"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(exp, sort_keys=False))
    os.replace(tmp, dst)


def run(
    out: str | os.PathLike = "runs/main",
    model: str | None = None,
    stages=STAGES,
    quick: bool = False,
    force: bool = False,
    tokenizer: str | None = None,
) -> dict:
    """Run the stages in order; returns {stage: seconds}. Raises PipelineError naming a failed stage.
    `tokenizer`: a tokenizer.json (or directory) when the checkpoint has none of its own."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(model or REPO / "models" / "mixtral-topology").resolve())
    if not (Path(model) / "config.json").is_file() and not (Path(model) / "moecxl.json").is_file():
        raise PipelineError(
            f"{model}: no checkpoint (config.json); the shipped models live in {REPO / 'models'}"
        )
    _write_experiment(out, model, quick)
    if tokenizer:
        tokenizer = str(Path(tokenizer).resolve())
    cmds = _stage_cmds(out, model, quick, tokenizer)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(stages):
        if stage not in cmds:
            raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        cmd, done = cmds[stage]
        if done.exists() and not force:
            print(f"[{i + 1}/{len(stages)}] {stage}: done already ({done})", flush=True)
            continue
        print(f"[{i + 1}/{len(stages)}] {stage} ...", flush=True)
        log = out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in proc.stdout:
                f.write(line)
                if not quick or stage in ("generate",):
                    print(f"    {line.rstrip()}"[:160], flush=True)
            rc = proc.wait()
        timings[stage] = time.perf_counter() - t0
        if rc != 0:
            tail = log.read_text().splitlines()[-15:]
            raise PipelineError(f"stage {stage!r} failed (exit {rc}); log {log}:\n" + "\n".join(tail))
        print(f"    {stage}: {timings[stage]:.0f} s", flush=True)
    timings["total"] = time.perf_counter() - t_all
    summary = {
        "model": model,
        "quick": quick,
        "stage_seconds": timings,
        "report": str(out / "report" / "report.md"),
    }
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2))
    return summary


def _generate(model_dir: str, out: str, tokenizer: str | None = None) -> None:
    """Stage `generate`: decode a prose and a code prompt from the test split, fully resident, each
    prompt framed as the checkpoint's tokenizer frames one (its BOS, where it adds one)."""
    import moecxl
    from moecxl import tokenizer as checkpoint_tokenizer
    from moecxl.data import trace_documents

    model = moecxl.load(model_dir)
    tok = checkpoint_tokenizer.load(model_dir, tokenizer, cfg=model.cfg)
    docs = trace_documents("mixed", tok, split="test", max_docs_per_domain=1)
    rows = []
    for doc in docs[:2]:
        prompt = tok.prompt(doc["input_ids"][:48])
        res = moecxl.generate(model, [prompt], max_new_tokens=32)
        rows.append(
            {
                "domain": doc["domain"],
                "prompt": tok.decode(prompt),
                "continuation": tok.decode(res.tokens[0].tolist()),
                "metrics": res.metrics,
            }
        )
        print(
            f"--- {doc['domain']} prompt:\n{rows[-1]['prompt'][-200:]}\n--- continuation:\n"
            f"{rows[-1]['continuation']}\n--- TTFT {res.metrics['ttft_s'] * 1e3:.1f} ms, "
            f"TPOT {res.metrics['tpot_s'] * 1e3:.2f} ms ({res.metrics['timing']})"
        )
    Path(out).write_text(json.dumps(rows, indent=2, default=float))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_generate"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--model", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--tokenizer", default=None)
        a = ap.parse_args(argv[1:])
        _generate(a.model, a.out, a.tokenizer)
        return 0
    ap = argparse.ArgumentParser(prog="python -m moecxl", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/main")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: models/mixtral-topology)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--force", action="store_true", help="rerun stages that are done")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a directory holding one, for a checkpoint without its own (any the "
        "`tokenizers` library reads; special ids from the checkpoint's config files)",
    )
    a = ap.parse_args(argv)
    try:
        summary = run(a.out, a.model, a.stages, a.quick, a.force, a.tokenizer)
    except PipelineError as e:
        print(f"moecxl: {e}", file=sys.stderr)
        return 1
    print(f"\nDone in {summary['stage_seconds']['total']:.0f} s. Report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
