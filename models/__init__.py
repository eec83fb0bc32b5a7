"""Example Pyro models shipped with the package, loadable by name.

=================  ============================================================================
file               models
=================  ============================================================================
``paper_targets``  the five targets of arXiv:2512.04954 (``single_mode_2d``, ``two_mode_2d``,
                   ``three_mode_2d``, ``three_mode_3d``, ``non_gaussian_3d``), built from
                   ``paper_targets.json`` (the benchmark spec); each carries ``.truth``
``high_dim``       separated Gaussian mixtures in 5, 10 and 20 dimensions and a 5-D banana,
                   each with ``.truth``
``normal_scale``   Normal data with unknown mean and HalfNormal scale over a plate, with
                   ``.example_data()``
``sbi_tasks``      three tasks of the SBI benchmark (sbibm 1.1.0: ``two_moons``, ``slcp``,
                   ``gaussian_linear``) with sbibm's priors and simulators and closed-form
                   likelihoods; each simulates under ``pyro.poutine.uncondition``
``ode_models``     ``lotka_volterra``: predator–prey rates from noisy populations, the ODE
                   solved by SciPy (a NumPy black box behind ``pyro.factor``), with
                   ``.example_data()``, ``.true_params`` and a gradient-free reference posterior
=================  ============================================================================

Each file is an ordinary module of this package (``pyro_lwflow.models.paper_targets``) and
also a plain model file: :func:`load` takes ``"file[:function]"`` by name,
:func:`pyro_lwflow.model_files.load_model` the same by path, and ``lwflow fit
paper_targets.py:three_mode_2d`` finds it from any folder. Example::

    from pyro_lwflow import models, fit

    models.names()                      # ['high_dim:banana_5d', ..., 'paper_targets:two_mode_2d']
    model = models.load("paper_targets:three_mode_2d")
    result = fit(model, num_components=3)
    model.truth.sample(1000)              # exact posterior draws
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

__all__ = ["DIRECTORY", "example_args", "load", "names"]

DIRECTORY = Path(__file__).resolve().parent
"""The folder holding the example model files."""


def load(name: str) -> Callable:
    """The example model ``"file[:function]"``, e.g. ``"paper_targets:three_mode_2d"``.

    ``file`` may end in ``.py``; without ``:function`` the file's ``model`` is used.

    :raises FileNotFoundError: there is no such example file (the message lists them).
    :raises AttributeError: the file has no such function (the message lists the ones it has).
    """
    from ..model_files import load_model

    stem, sep, function = name.partition(":")
    stem = stem.removesuffix(".py")
    path = DIRECTORY / f"{stem}.py"
    if "/" in stem or "\\" in stem or stem.startswith("_") or not path.is_file():
        files = sorted(p.stem for p in DIRECTORY.glob("[!_]*.py"))
        raise FileNotFoundError(f"no example model file '{stem}'; the examples are: {', '.join(files)}")
    return load_model(f"{path}{sep}{function}")


def example_args(model: Callable) -> tuple:
    """``model``'s positional arguments from its ``.example_data()`` (``()`` without one): a tuple
    that fits the model's positional parameters is those arguments (``real_models.linear_regression(x,
    y)``, ``ar_model(y, order=5)``); any other value is the one argument (a tuple too, for a model that
    takes one)."""
    if not callable(getattr(model, "example_data", None)):
        return ()
    example = model.example_data()
    if isinstance(example, tuple):
        try:
            params = [p for p in inspect.signature(model).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            return example
        required = sum(p.default is p.empty for p in params)
        if required <= len(example) <= len(params):
            return example
    return (example,)


def names() -> list[str]:
    """``"file:function"`` for every example model, sorted."""
    from ..model_files import bundled_models

    return sorted(key.replace(".py:", ":") for key in bundled_models())
