"""Execute every notebook with nbclient on tiny configs (MOECXL_NOTEBOOK_TINY=1); a failing cell fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def test_all_three_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_quickstart", "02_traces_and_predictor", "03_policies_and_simulation"], names


# The quickstart runs in the default set; the traces-and-predictor (~55 s on 2 cores) and policies-and-
# simulation (~30 s) walkthroughs repeat what the CLI and simulator tests check: they run with the slow set.
SLOW_NOTEBOOKS = {"02_traces_and_predictor", "03_policies_and_simulation"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECXL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MOECXL_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MOECXL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # A kernel spec of this very interpreter, found first on JUPYTER_PATH: no `ipykernel install` needed
    # after `pip install -e '.[dev]'`, and never a different `python` from PATH.
    spec = tmp_path / "jupyter" / "kernels" / "moecxl-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "moecxl", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="moecxl-test", resources={"metadata": {"path": str(NB_DIR)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    if path.stem == "01_quickstart":
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert "bit-identical to resident: True" in text
