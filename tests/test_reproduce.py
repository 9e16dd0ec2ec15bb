"""Published cases: loading and checking a case file, running it on tiny traces the test writes, the table,
and bad input naming the file and field (unknown system / precision / metric / GPU, a missing published
figure, a GPU too small for dense + KV, a trace of another family, traces absent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from moecxl.sim import reproduce as R
from tests.test_predictor import write_traces

REPO = Path(__file__).resolve().parents[1]
L, E, K = 4, 8, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer Mixtral-width target, its synthetic trace (sticky routing) and a T4 profile."""
    root = tmp_path_factory.mktemp("reproduce")
    target = root / "mixtral-4l.yaml"
    target.write_text(
        yaml.safe_dump(
            {
                "shape_only": True,
                "model": {
                    "family": "mixtral",
                    "name": "mixtral-4l",
                    "vocab_size": 32000,
                    "hidden_size": 4096,
                    "intermediate_size": 14336,
                    "num_layers": L,
                    "num_heads": 32,
                    "num_kv_heads": 8,
                    "num_experts": E,
                    "top_k": K,
                    "max_position_embeddings": 4096,
                },
            }
        )
    )
    rng = np.random.default_rng(0)
    seqs, T = 24, 40
    N = seqs * T
    ids = np.zeros((N, L, K), np.int32)
    for n in range(N):
        for m in range(L):
            first = (n // 3 + m) % E if rng.random() < 0.7 else rng.integers(E)
            second = (first + 1 + rng.integers(E - 1)) % E
            ids[n, m] = (first, second)
    seq = np.repeat(np.arange(seqs), T)
    pos = np.tile(np.arange(T), seqs)
    dec = pos >= T - 16
    trace = write_traces(root / "trace", ids, seq, pos, decode_N=dec)
    other = write_traces(
        root / "switch-trace",
        ids,
        seq,
        pos,
        decode_N=dec,
        model={"id": "s", "family": "switch", "path": None},
    )
    return {"root": root, "target": target, "trace": trace, "other": other}


def case_file(world, name: str, **changes) -> Path:
    data = {
        "source": "paper: a test, Table 1",
        "target": str(world["target"]),
        "precision": {"experts": "fp16", "dense": "fp16"},
        "hardware": "configs/hardware/published/t4-pcie3.yaml",
        "system": "lru",
        "workload": {"batch": 1, "prompt_tokens": 32, "decode_tokens": 16},
        "metric": "decode_tokens_per_s",
        "published": 1.0,
        "trace": str(world["trace"]),
        "requests": 3,
    }
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    p = world["root"] / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_case_runs_and_writes_the_table(world, tmp_path):
    few = {"expert_slots": 10}  # a third of the experts: misses dominate
    fast = case_file(world, "lru-hqq", precision={"experts": "hqq2", "dense": "hqq4"}, system_args=few)
    slow = case_file(world, "lru-fp16", system_args=few)
    rows = R.run_cases([fast, slow], make_traces=False)
    assert [r["case"] for r in rows] == ["lru-hqq", "lru-fp16"]
    for r in rows:
        assert r["simulated"] > 0 and r["ratio"] == pytest.approx(r["simulated"] / r["published"])
        assert r["details"]["budget"]["experts_bytes"] > 0
    # 2-bit experts move 5.3x fewer bytes than fp16 ones: where misses dominate, 2-bit decodes faster
    assert rows[0]["simulated"] > 2 * rows[1]["simulated"]
    out = R.write(rows, tmp_path / "out")
    data = json.loads((out / "results.json").read_text())
    assert data["timing"] == "simulated" and data["summary"]["cases"] == 2
    md = (out / "results.md").read_text()
    assert "| lru-hqq | lru | decode_tokens_per_s |" in md and "Simulated" in md


def test_an_out_of_range_case_is_listed_with_its_reason(world, tmp_path):
    """A case outside 0.75-1.33 is listed under the table with its `explained:` text, or as not explained."""
    said = case_file(world, "off-said", published=1e-3, explained="a stated  reason\n  over two lines")
    silent = case_file(world, "off-silent", published=1e-3)
    rows = R.run_cases([said, silent], make_traces=False)
    assert rows[0]["explained"] == "a stated reason over two lines" and "explained" not in rows[1]
    md = R.markdown(rows)
    assert "Out of range" in md and "- off-said (" in md and "): a stated reason over two lines" in md
    assert "- off-silent (" in md and "): not explained" in md
    in_range = dict(rows[1], ratio=1.0)
    assert "Out of range" not in R.markdown([in_range])


def test_a_ratio_check_compares_two_systems(world):
    p = case_file(
        world, "ratio", system="lru", compare={"system": "on_demand"}, metric="tpot_s", published=1.0
    )
    (row,) = R.run_cases([p], make_traces=False)
    a, b = row["details"]["values"]
    assert row["simulated"] == pytest.approx(a / b) and "ratio vs on_demand" in row["metric"]


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"system": "vllm"}, "system", "unknown system 'vllm'"),
        ({"system_args": {"experts_per_layer": 2}}, "system", "no argument"),
        ({"precision": {"experts": "fp8", "dense": "fp16"}}, "precision.experts", "unknown precision 'fp8'"),
        ({"precision": {"experts": "fp16"}}, "precision", "expected {experts"),
        ({"metric": "joules"}, "metric", "unknown metric 'joules'"),
        ({"published": None}, "published", "missing"),
        ({"published": "fast"}, "published", "a number > 0"),
        ({"workload": {"batch": 1}}, "workload", "expected exactly"),
        ({"hardware": "configs/hardware/published/nope.yaml"}, "hardware", "not found"),
        ({"colour": "red"}, "colour", "unknown key"),
        ({"compare": {"system": "nope"}}, "compare.system", "unknown system 'nope'"),
    ],
)
def test_bad_case_files_name_the_file_and_field(world, changes, field, words):
    p = case_file(world, "bad", **changes)
    with pytest.raises(R.CaseError) as e:
        R.load_case(p)
    msg = str(e.value)
    assert str(p) in msg and f": {field}:" in msg and words in msg


def test_an_unknown_gpu_names_the_profile(world):
    prof = world["root"] / "gpu-nope.yaml"
    prof.write_text(
        f"include: {REPO / 'configs/hardware/library/devices.yaml'}\ngpu: rtx-9999\nlinks: {{pcie4-x16: pcie4-x16}}\n"
        "tiers:\n  dram: {use: dram-ddr4-2ch, link: pcie4-x16}\n"
    )
    p = case_file(world, "gpu", hardware=str(prof))
    with pytest.raises(
        R.CaseError, match=r"bad|gpu\.yaml: hardware: .*'rtx-9999' is not in the included library"
    ):
        R.run_cases([p], make_traces=False)


def test_dense_and_kv_that_do_not_fit_say_by_how_much(world):
    p = case_file(world, "big", workload={"batch": 64, "prompt_tokens": 30000, "decode_tokens": 2000})
    with pytest.raises(
        R.CaseError, match=r"big\.yaml: hardware \(Tesla-T4\): .*KV cache .*short by \d+\.\d\d GB"
    ):
        R.run_cases([p], make_traces=False)


def test_a_trace_of_another_family_is_refused(world):
    p = case_file(world, "fam", trace=str(world["other"]))
    with pytest.raises(R.CaseError, match=r"fam\.yaml: trace: .*'switch' model .* 'mixtral' model"):
        R.run_cases([p], make_traces=False)


def test_absent_traces_say_how_to_make_them(world, monkeypatch, tmp_path):
    monkeypatch.setitem(
        R.TRACES, "mixtral", (str(tmp_path / "none"), "models/mixtral-topology", ["--tokens", "9"])
    )
    p = case_file(world, "notrace", trace=None)
    with pytest.raises(
        R.CaseError, match=r"notrace\.yaml: trace: .* is absent; make it with `-m moecxl\.traces collect"
    ):
        R.run_cases([p], make_traces=False)


def test_shipped_cases_load():
    paths = sorted((REPO / "configs" / "published").glob("*.yaml"))
    assert len(paths) >= 33
    cases = [R.load_case(p) for p in paths]
    em = [c for c in cases if c.name.startswith("em2023-")]
    assert len(em) == 31  # Table 2 without the 3060 3-bit naive cell (a typo in the paper)
    assert all(c.metric in R.METRICS for c in cases)


def test_the_entry_script_reports_bad_input(world, tmp_path):
    p = case_file(world, "entry", system="vllm")
    r = subprocess.run(
        [sys.executable, str(REPO / "eval" / "reproduce.py"), str(p), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "entry.yaml: system: unknown system 'vllm'" in r.stderr
