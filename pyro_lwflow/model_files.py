"""Loading Pyro models from plain ``.py`` files (``path/to/file.py[:function]``).

The example models shipped in :mod:`pyro_lwflow.models` are such files too; loading one of them
by path gives the package's own module (``pyro_lwflow.models.paper_targets``), so the model is the
same object however it was loaded, and process pools can pickle it by reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["BUNDLED_MODELS", "bundled_models", "load_model"]

BUNDLED_MODELS = Path(importlib.util.find_spec(f"{__package__}.models").origin).resolve().parent
"""The folder of the example model files (:mod:`pyro_lwflow.models`), inside the installed package."""


def load_model(spec: str | Path) -> Callable:
    """Load the model function named by ``"path/to/file.py[:function]"``.

    Without ``:function`` the file's ``model`` is used. A model may carry ``.truth`` (exact
    posterior) and ``.example_data()`` attributes, used by benchmarks and the command line.

    :raises FileNotFoundError: the file does not exist.
    :raises AttributeError: the file has no such function (the message lists the ones it has).
    """
    path_text, _, name = str(spec).partition(":")
    module = _load_module(Path(path_text))
    name = name or "model"
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", "") == module.__name__]
        raise AttributeError(
            f"'{path_text}' has no model function '{name}'; it defines: {', '.join(sorted(found)) or 'nothing'}"
        )
    return fn


def bundled_models() -> dict[str, Callable]:
    """``{"file.py:function": model}`` for every model in :mod:`pyro_lwflow.models`."""
    out = {}
    for path in sorted(BUNDLED_MODELS.glob("[!_]*.py")):
        module = _load_module(path)
        models = getattr(module, "MODELS", None) or {"model": getattr(module, "model", None)}
        out.update({f"{path.name}:{name}": fn for name, fn in models.items() if callable(fn)})
    return out


def _load_module(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if path.resolve().parent == BUNDLED_MODELS and path.stem.isidentifier() and not path.stem.startswith("_"):
        return importlib.import_module(f"{__package__}.models.{path.stem}")
    module_name = f"_lwflow_model_{path.stem}_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"'{path}' is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
