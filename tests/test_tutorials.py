"""The tutorial notebooks: committed executed and error-free, listed in the README, and each runs
top to bottom in quick mode (``LWFLOW_TUTORIAL_QUICK=1``).

The quick-mode runs execute the notebooks in memory with nbclient on a ``python3`` kernel started
from the interpreter running pytest (Jupyter swaps a kernel spec's ``python`` for
``sys.executable``), so a fresh virtualenv with the ``dev`` extra needs nothing else. The files on
disk are not modified.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_was_run_top_to_bottom_without_errors(path):
    """The stored outputs (what the README and the docs show) come from one clean run."""
    cells = json.loads(path.read_text())["cells"]
    cells = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c["execution_count"] for c in cells]
    assert cells and counts == list(range(1, len(cells) + 1)), f"not one fresh run, top to bottom: {counts}"
    outputs = [o for c in cells for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [o for o in outputs if o["output_type"] == "stream" and "Traceback" in "".join(o["text"])]


def test_every_notebook_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert NOTEBOOKS
    assert [p.name for p in NOTEBOOKS if f"(tutorials/{p.name})" not in readme] == []


@pytest.mark.tutorial
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("LWFLOW_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=3000, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
