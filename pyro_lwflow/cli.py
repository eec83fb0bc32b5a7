"""The ``lwflow`` command line: fit a model file, list the bundled models, run the benchmarks.

    lwflow models
    lwflow fit paper_targets.py:two_mode_2d --components 2 --out out/
    lwflow fit normal_scale.py --data y.npz --out out/
    lwflow fit path/to/my_model.py:model --data y.npy --out out/
    lwflow bench paper --quick

A bare file name (``paper_targets.py`` or ``paper_targets``) that is not a file in the current
folder is one of the example models of :mod:`pyro_lwflow.models`. The training options default
to :func:`pyro_lwflow.fit`'s own defaults (read from its signature, so the two always agree).

``--data`` files become the model's arguments:

* ``.npy``: one array, the model's first positional argument;
* ``.npz``: arrays named ``arg0``, ``arg1``, … (or NumPy's own ``arr_0``, ``arr_1``, … from
  ``np.savez(path, y)``) are positional arguments in that order; any other name is a keyword
  argument (``np.savez(path, y=y)`` calls ``model(y=y)``);
* ``.pt``: a tensor (one argument), a list/tuple (positional) or a dict (keyword arguments, with
  ``arg0``, … positional as for ``.npz``), read with ``torch.load(weights_only=True)``;
* ``.csv``: a numeric table, comma-separated, with or without a header row: one argument,
  ``(rows,)`` for one column, else ``(rows, columns)``.

Floating arrays become float32 tensors. Without ``--data`` the model's ``.example_data()`` is used
when it has one (a tuple with one item per positional parameter: those arguments; anything else:
the one argument), else the model is called without arguments. Errors in the input (a missing file,
a model file that does not load, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "read_data"]

BENCHMARKS = {"paper": "paper.py", "high-dim": "high_dim.py"}
SOURCE_ROOT = Path(__file__).resolve().parent.parent
"""The source checkout's root when running from one (its ``benchmarks/`` are not in the wheel)."""
DATA_HELP = """--data files become the model's arguments:
  .npy  one array: the first positional argument
  .npz  arrays named arg0, arg1, ... (or arr_0, arr_1, ... as np.savez(path, y) writes them) are
        positional arguments in that order; other names are keyword arguments (np.savez(path, y=y))
  .pt   a tensor (one argument), a list/tuple (positional) or a dict (keywords; arg0, ... positional)
  .csv  a numeric table, with or without a header row: one argument, (rows,) or (rows, columns)
Floating arrays become float32 tensors. Without --data the model's .example_data() is used if it
has one, else the model is called with no arguments.

examples:
  lwflow fit paper_targets.py:two_mode_2d --components 2 --out out/
  lwflow fit normal_scale.py --data y.npy --out out/
  lwflow fit path/to/my_model.py:model --data y.npz --steps 1000 --out out/"""


class UsageError(Exception):
    """An error in what the user gave: reported in one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lwflow`` console script; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        if args.command == "fit":
            return _fit(args)
        if args.command == "models":
            return _models()
        return _bench(args.which, extra)
    except UsageError as err:
        print(f"lwflow: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwflow",
        description="Likelihood-weighted normalizing flows for Pyro models (arXiv:2512.04954).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,models,bench}")
    fit = sub.add_parser(
        "fit",
        help="fit a model file and write posterior.nc, summary.csv, plots and metrics.json",
        description="Fit a model and write posterior.nc (ArviZ), summary.csv (az.summary), pair_plot.png, "
        "training_curves.png, metrics.json and guide.lwflow (pyro_lwflow.io.load) into --out.",
        epilog=DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = _fit_defaults()
    fit.add_argument("model", help="PATH/TO/model.py[:function] (default function: model); a bare "
                     "file name not found in the current folder is looked up in the bundled examples "
                     "(lwflow models lists them)")
    fit.add_argument("--data", help="a .npz, .npy, .pt or .csv file with the model's arguments (see below)")
    fit.add_argument("--components", default=str(defaults["num_components"]),
                     help="mixture components of the base: 'auto' (estimated from the weighted draws) or "
                     "K >= 1 (default %(default)s)")
    fit.add_argument("--rounds", default=str(defaults["num_rounds"]),
                     help="adaptive rounds: 'auto' or N >= 1 (--rounds 1 --starts prior is the paper's one-shot "
                     "method) (default %(default)s)")
    fit.add_argument("--steps", type=int, default=defaults["num_steps"],
                     help="gradient steps of the first training; later rounds warm-start (default %(default)s)")
    fit.add_argument("--budget", type=int, default=defaults["budget"],
                     help="most model evaluations, likelihood and gradient (default %(default)s)")
    fit.add_argument("--initial-draws", type=int, default=defaults["initial_draws"],
                     help="draws of round 0 (default: by dimension; see pyro_lwflow.Schedule)")
    fit.add_argument("--starts", choices=("auto", "gradient", "prior"), default=defaults["starts"],
                     help="start from the optima L-BFGS finds ('gradient'; 'auto' when the likelihood is "
                     "differentiable) or from the prior (default %(default)s)")
    fit.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                     help="draws per step (default %(default)s)")
    fit.add_argument("--lr", type=float, default=defaults["lr"], help="Adam learning rate (default %(default)s)")
    fit.add_argument("--seed", type=int, default=defaults["seed"], help="random seed (default %(default)s)")
    fit.add_argument("--num-samples", type=int, default=4000, help="posterior draws exported (default %(default)s)")
    fit.add_argument("--out", default="lwflow_output", help="output folder (default %(default)s)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("models", help="list the bundled example models",
                   description="List the example models bundled in pyro_lwflow.models.")
    bench = sub.add_parser(
        "bench",
        help="run a benchmark script from benchmarks/ (extra arguments are passed on)",
        description="Run benchmarks/paper.py or benchmarks/high_dim.py of a source checkout (they are not "
        "part of the installed package); "
        "arguments after the name are passed to the script (e.g. lwflow bench paper --quick).",
    )
    bench.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    return parser


def _fit_defaults() -> dict:
    """The defaults of :func:`pyro_lwflow.fit` and :class:`pyro_lwflow.Schedule` for the options
    ``lwflow fit`` passes on."""
    import dataclasses
    import inspect

    from .fit import fit
    from .schedule import Schedule

    params = inspect.signature(fit).parameters
    out = {name: params[name].default for name in ("num_components", "batch_size", "lr", "seed")}
    fields = {f.name: f.default for f in dataclasses.fields(Schedule)}
    out.update({name: fields[name] for name in ("num_rounds", "num_steps", "budget", "initial_draws", "starts")})
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lwflow: warning: {message}", file=sys.stderr)


# -- fit ------------------------------------------------------------------------------------


def _fit(args: argparse.Namespace) -> int:
    model = _load_model(args.model)
    components = _components(args.components)
    rounds = _components(args.rounds, "--rounds")
    for name in ("steps", "budget", "initial_draws", "batch_size", "num_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.data:
        model_args, model_kwargs = read_data(args.data)
    else:
        from . import models

        model_args, model_kwargs = models.example_args(model), {}

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # the command only writes files: no window, no display needed
    import arviz as az
    import matplotlib.pyplot as plt

    from . import Schedule, fit
    from .arviz import to_arviz
    from .io import save
    from .plots import pair_plot, training_curves

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder '{out}': {err.strerror}") from None
    start = time.perf_counter()
    try:
        schedule = Schedule(num_rounds=rounds, num_steps=args.steps, budget=args.budget,
                            initial_draws=args.initial_draws, starts=args.starts)
        result = fit(
            model, *model_args, num_components=components, schedule=schedule, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed, progress=not args.quiet, model_kwargs=model_kwargs,
        )
        idata = to_arviz(result, num_samples=args.num_samples, seed=args.seed)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as err:
        raise UsageError(f"fitting '{args.model}' failed: {_one_line(err)}") from None
    idata.to_netcdf(str(out / "posterior.nc"))
    with warnings.catch_warnings():  # R-hat of a constant element (a Cholesky factor's corner) is 0 / 0
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        az.summary(idata).to_csv(out / "summary.csv")
    save(result, out / "guide.lwflow")
    samples = {k: v.values.reshape((-1,) + v.shape[2:]) for k, v in idata.posterior.data_vars.items()}
    truth = getattr(model, "truth", None)
    one_site = len(samples) == 1
    fig = pair_plot(
        samples,
        truth_log_prob=truth.log_prob if truth is not None and one_site else None,
        reference=truth.sample(len(next(iter(samples.values()))), seed=1)
        if truth is not None and one_site and truth.dim > 2 else None,
        title=Path(args.model).name,
    )
    fig.savefig(out / "pair_plot.png", dpi=110)
    curves = training_curves(result.losses)
    curves.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)
    plt.close(curves)
    metrics = _metrics(result, idata, truth if one_site else None, time.perf_counter() - start)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}/")
    print(json.dumps(metrics))
    return 0


def _metrics(result, idata, truth, wall_time: float) -> dict:
    """ESS, evidence and timings; with ``truth``, the benchmark metrics on 10,000 draws each."""
    attrs = idata.attrs
    out = {
        "ess": result.ess,
        "log_evidence": result.log_evidence,
        "log_evidence_stderr": result.log_evidence_stderr,
        "num_likelihood_evals": result.num_likelihood_evals,
        "num_gradient_evals": result.num_gradient_evals,
        "fit_wall_time_s": result.wall_time,
        "wall_time_s": wall_time,
        "num_components": json.loads(attrs["settings"])["num_components"],
        "prior_pareto_k": attrs["prior_pareto_k"],
        "guide_pareto_k": attrs["guide_pareto_k"],
    }
    if truth is not None:
        import torch

        from . import metrics

        exact = truth.sample(10_000, seed=1)
        approx = next(iter(result.sample(10_000).values())).reshape(10_000, -1)
        site = result.guide.layout[0].name
        with torch.no_grad():
            log_q = result.guide.log_density({site: exact.reshape((-1,) + tuple(result.guide.layout[0].shape))})
        out.update(
            kl=metrics.kl_divergence(truth.log_prob(exact), log_q),
            w1_avg=metrics.w1_avg(exact, approx),
            sliced_w=metrics.sliced_w(exact, approx),
            bridge_mass=metrics.bridge_mass(truth.log_prob, exact, approx),
            mode_weight_error=metrics.mode_weight_error(truth.component_log_probs, truth.weights, approx),
            true_log_evidence=truth.log_evidence,
        )
    return out


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _components(text: str, option: str = "--components") -> int | str:
    """``'auto'`` or a positive integer."""
    if text == "auto":
        return "auto"
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    raise UsageError(f"{option} must be 'auto' or a positive integer, got {text!r}")


def _load_model(spec: str):
    """``path.py[:function]`` → the model; a bare file name is also looked up in the examples."""
    from .model_files import BUNDLED_MODELS, load_model

    path_text, sep, name = spec.partition(":")
    path = Path(path_text)
    if not path.is_file() and not path.is_absolute() and len(path.parts) == 1:
        bundled = BUNDLED_MODELS / (path.name if path.suffix else f"{path.name}.py")
        if bundled.is_file() and not bundled.name.startswith("_"):
            path = bundled
    if not path.is_file():
        raise UsageError(f"model file '{path_text}' does not exist (try 'lwflow models' for the bundled ones)")
    if path.suffix != ".py":
        raise UsageError(f"model file '{path_text}' is not a .py file")
    try:
        return load_model(f"{path}{sep}{name}")
    except AttributeError as err:
        raise UsageError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - whatever the file raised, report it in one line
        raise UsageError(f"model file '{path_text}' could not be loaded: {_one_line(err)}") from None


def read_data(path: str | Path) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for the model from a ``.npz``, ``.npy``, ``.pt`` or ``.csv`` file.

    See this module's docstring for the conventions. Floating arrays become float32 tensors.
    """
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return (_tensor(np.load(path, allow_pickle=False)),), {}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return _split({k: data[k] for k in data.files})
        if suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                return _split(obj)
            if isinstance(obj, (list, tuple)):
                return tuple(_tensor(v) for v in obj), {}
            return (_tensor(obj),), {}
        if suffix == ".csv":
            return (_tensor(_read_csv(path)),), {}
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - a file we cannot read is an input error
        raise UsageError(f"data file '{path}' could not be read: {_one_line(err)}") from None
    raise UsageError(f"data file '{path}' must end in .npz, .npy, .pt or .csv")


def _split(named: dict) -> tuple[tuple, dict]:
    """Named arrays → positional (``arg0``/``arr_0``, … in order) and keyword arguments."""
    positional = {}
    kwargs = {}
    for key, value in named.items():
        match = re.fullmatch(r"(?:arg|arr_)(\d+)", str(key))
        if match:
            positional[int(match.group(1))] = _tensor(value)
        else:
            kwargs[str(key)] = _tensor(value)
    if sorted(positional) != list(range(len(positional))):
        raise UsageError(f"positional data arrays must be numbered from 0 without gaps, got {sorted(positional)}")
    return tuple(positional[i] for i in range(len(positional))), kwargs


def _tensor(value):
    import numpy as np
    import torch

    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    return t.float() if t.is_floating_point() else t


def _read_csv(path: Path):
    import numpy as np

    with path.open() as fh:
        first = fh.readline()
    header = any(re.search(r"[A-Za-df-z_]", cell) for cell in first.split(","))
    table = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, dtype=np.float64)
    return table[:, 0] if table.shape[1] == 1 else table


# -- models and bench -----------------------------------------------------------------------


def _models() -> int:
    from .model_files import BUNDLED_MODELS, bundled_models

    models = bundled_models()
    width = max(map(len, models), default=0)
    for name, fn in models.items():
        doc = (fn.__doc__ or getattr(sys.modules.get(fn.__module__), "__doc__", None) or "").strip().splitlines()
        extras = [a for a in ("truth", "example_data") if hasattr(fn, a)]
        note = f"  [{', '.join('.' + a for a in extras)}]" if extras else ""
        print(f"{name:<{width}}  {doc[0] if doc else ''}{note}")
    print(f"(in {BUNDLED_MODELS}; fit one with: lwflow fit FILE.py:FUNCTION, "
          "e.g. lwflow fit paper_targets.py:three_mode_2d)")
    return 0


def _bench(which: str, extra: list[str]) -> int:
    script = SOURCE_ROOT / "benchmarks" / BENCHMARKS[which]
    if not script.is_file():
        raise UsageError(
            f"benchmark '{which}' is not available: {script} does not exist (the benchmarks ship with "
            "the source repository, not with the installed package: run this from an editable install "
            "of a checkout, pip install -e .)"
        )
    return subprocess.call([sys.executable, str(script), *extra], cwd=SOURCE_ROOT)


if __name__ == "__main__":
    sys.exit(main())
