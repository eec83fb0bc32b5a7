"""Sphinx configuration: API pages from the docstrings, the executed tutorials, the benchmark results.

Built by ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``), offline.
The front page is the README. The tutorials (``tutorials/*.ipynb``, executed and committed), the
benchmark results (``benchmarks/results/``) and ``CHANGELOG.md`` live outside ``docs/``; they are
copied to the same relative places under ``docs/`` at every build (ignored by git), so the README's
links work unchanged. The notebooks are rendered with their stored outputs, never re-executed. One API
page per module of the package is written into ``docs/api/`` (also generated), so a new or
renamed module needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import pyro_lwflow  # noqa: E402

project = "pyro_lwflow"
author = "the pyro_lwflow authors"
copyright = "2026, the pyro_lwflow authors"
release = version = pyro_lwflow.__version__

extensions = [
    "myst_nb",  # Markdown (MyST) and notebooks, no pandoc needed
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"pyro_lwflow {release}"

# notebooks: show what was stored when they were executed; never run them here
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # Pyro's and torch's own docstrings are not ours to check
# The docstrings use reST field lists (":param x:"); napoleon only adds Google-style sections.
napoleon_numpy_docstring = False

nitpicky = False  # Pyro's and torch's classes in the type hints are not documented here


# -- generated pages --------------------------------------------------------------------------

MODULE_ORDER = [
    "fit", "amortized", "calibration", "schedule", "guide", "loss", "draws", "adapter", "tracing", "layout",
    "evaluation", "adaptive", "starts", "modes", "flows", "conditional",
    "coordinates", "diagnostics", "metrics",
    "arviz", "io", "plots", "models", "model_files", "truth", "cli",
]


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _copy_tree(source: Path, target: Path, patterns: tuple[str, ...]) -> list[Path]:
    copied = []
    for pattern in patterns:
        for path in sorted(source.rglob(pattern)):
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            copied.append(dest)
    return copied


def _first_line(module) -> str:
    """The first paragraph of a module's docstring, on one line."""
    paragraph = (module.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split()).rstrip(".")


def _api_pages() -> None:
    api = _fresh(DOCS / "api")
    found = [m.name for m in pkgutil.iter_modules(pyro_lwflow.__path__) if not m.name.startswith("_")]
    found.append("models")  # the top-level models/ folder, installed as pyro_lwflow.models
    names = [n for n in MODULE_ORDER if n in found] + sorted(set(found) - set(MODULE_ORDER))
    rows = []
    for name in names:
        title = f"``pyro_lwflow.{name}``"
        (api / f"{name}.rst").write_text(
            f"{title}\n{'=' * len(title)}\n\n.. automodule:: pyro_lwflow.{name}\n"
        )
        rows.append(f"   {name}")
    title = "API reference"
    (api / "index.rst").write_text(
        f"{title}\n{'=' * len(title)}\n\n"
        "The names most users need are importable from the package itself:\n\n"
        ".. code-block:: python\n\n"
        f"   from pyro_lwflow import {', '.join(sorted(pyro_lwflow.__all__))}\n\n"
        "One page per module:\n\n"
        + "".join(f"* :doc:`{n}`: {_first_line(importlib.import_module(f'pyro_lwflow.{n}'))}\n" for n in names)
        + "\n.. toctree::\n   :hidden:\n\n" + "\n".join(rows) + "\n"
    )


def _tutorial_pages() -> None:
    target = _fresh(DOCS / "tutorials")
    notebooks = _copy_tree(ROOT / "tutorials", target, ("*.ipynb",))
    (target / "index.md").write_text(
        "# Tutorials\n\nExecuted notebooks from the repository's `tutorials/` folder, shown with the outputs "
        "they had when they were run (each reruns in seconds with `LWFLOW_TUTORIAL_QUICK=1`).\n\n"
        "```{toctree}\n:maxdepth: 1\n\n" + "\n".join(p.stem for p in notebooks) + "\n```\n"
    )


def _benchmark_pages() -> None:
    target = _fresh(DOCS / "benchmarks")
    pages = _copy_tree(ROOT / "benchmarks" / "results", target / "results", ("*.md", "*.png", "*.json"))
    docs = [p.relative_to(target).with_suffix("").as_posix() for p in pages if p.suffix == ".md"]
    (target / "index.md").write_text(
        "# Benchmark results\n\nThe result files of `benchmarks/` as they were committed, each with the "
        "command that produced it.\n\n```{toctree}\n:maxdepth: 1\n\n" + "\n".join(docs) + "\n```\n"
    )


_api_pages()
_tutorial_pages()
_benchmark_pages()
shutil.copy2(ROOT / "CHANGELOG.md", DOCS / "CHANGELOG.md")  # the README links to it by that name
