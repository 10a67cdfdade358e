"""The example notebook runs top to bottom against a LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "workflows" / "submit_to_cluster.ipynb"


@pytest.mark.cluster
@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DIFFIM_NOTEBOOK_OUT", str(tmp_path / "nb"))
    monkeypatch.setenv("DIFFIM_NOTEBOOK_SIZE", "384")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "Dashboard:" in outputs and "DIA sources" in outputs
    import json

    summary = json.loads((tmp_path / "nb" / "run" / "run_summary.json").read_text())
    assert summary["counts"]["done"] == 4, summary["units"]
