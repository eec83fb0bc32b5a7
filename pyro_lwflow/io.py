"""Safe save and load of a fitted :class:`~pyro_lwflow.AutoLWFlow` or a trained
:class:`~pyro_lwflow.AmortizedLWFlow`: plain settings + ``state_dict``.

A saved file holds only a JSON config string, a format tag and the guide's ``state_dict()``
(tensors), written with :func:`torch.save` and read back with ``torch.load(weights_only=True)``,
which refuses to run code: a pickled object, a foreign or a corrupt file gets a ``ValueError``.
The guide itself is rebuilt from the model, so the model (and its data) must be passed to
:func:`load`::

    save(result, "fit.lwflow")                     # a FitResult or a guide
    guide = load("fit.lwflow", model, y)           # same draws as before for the same seed
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from .amortized import AmortizedLWFlow
from .guide import AutoLWFlow

__all__ = ["AMORTIZED_FORMAT", "FORMAT", "load", "load_config", "save"]

FORMAT = "pyro_lwflow.guide/1"
AMORTIZED_FORMAT = "pyro_lwflow.amortized/1"


def save(result_or_guide, path: str | os.PathLike) -> Path:
    """Write a fitted guide (or a :class:`~pyro_lwflow.FitResult`'s guide) to ``path`` atomically.

    The file is written to a temporary file in the same folder and moved into place with
    :func:`os.replace`, so ``path`` is never left half-written. For a ``FitResult`` the config
    also records ``losses``, ``ess``, ``log_evidence`` (± stderr, nats), ``num_likelihood_evals``,
    ``wall_time`` (s) and ``seed``.

    :returns: the path written.
    """
    from . import __version__

    guide = getattr(result_or_guide, "guide", result_or_guide)
    if isinstance(guide, AmortizedLWFlow):
        return _write(_amortized_payload(guide, __version__), Path(path))
    if not isinstance(guide, AutoLWFlow):
        raise TypeError(f"save() takes a FitResult, an AutoLWFlow or an AmortizedLWFlow, got "
                        f"{type(result_or_guide).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("the guide has not been fitted (it has not seen the model yet); nothing to save")
    config = {
        "format": FORMAT,
        "version": __version__,
        "num_components": int(guide.component_loc.shape[0]),
        "num_components_requested": guide.num_components,
        "num_transforms": guide.num_transforms,
        "hidden_dims": list(guide.hidden_dims),
        "log_scale_bound": float(guide.log_scale_bound),
        "marginal_bins": guide.marginal_bins,
        "max_components": guide.max_components,
        "box_margin": guide.box_margin,
        "latent_dim": guide.latent_dim,
        "sites": {s.name: list(s.shape) for s in guide.layout},
        "component_scores": {str(k): float(v) for k, v in guide.component_scores.items()},
    }
    if result_or_guide is not guide:
        r = result_or_guide
        config["fit"] = {
            "losses": [float(x) for x in r.losses],
            "ess": float(r.ess),
            "log_evidence": float(r.log_evidence),
            "log_evidence_stderr": float(r.log_evidence_stderr),
            "num_likelihood_evals": int(r.num_likelihood_evals),
            "wall_time": float(r.wall_time),
            "num_skipped_steps": int(r.num_skipped_steps),
            "seed": r.seed,
        }
    state = {k: v.detach().cpu().clone() for k, v in guide.state_dict().items()}
    return _write({"format": FORMAT, "config": json.dumps(config), "state_dict": state}, Path(path))


def _amortized_payload(guide: AmortizedLWFlow, version: str) -> dict:
    config = {
        "format": AMORTIZED_FORMAT, "version": version, **guide.settings,
        "sites": {s.name: list(s.shape) for s in guide.layout},
        "data_sites": {n: list(s) for n, s in zip(guide.data_layout.names, guide.data_layout.shapes, strict=True)},
        "num_simulations": guide.num_simulations, "num_likelihood_evals": guide.num_likelihood_evals,
        "losses": guide.losses, "val_losses": guide.val_losses,
    }
    state = {k: v.detach().cpu().clone() for k, v in guide.state_dict().items()}
    return {"format": AMORTIZED_FORMAT, "config": json.dumps(config), "state_dict": state}


def _write(payload: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then :func:`os.replace` into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_config(path: str | os.PathLike) -> dict:
    """The config a file was saved with (settings, library version and, for a fit, its summary)."""
    return _read(path)[0]


def load(path: str | os.PathLike, model: Callable, *model_args, embedding: torch.nn.Module | None = None,
         **model_kwargs) -> AutoLWFlow | AmortizedLWFlow:
    """Rebuild a saved guide for ``model`` conditioned on ``*model_args, **model_kwargs``.

    A saved :class:`~pyro_lwflow.AmortizedLWFlow` comes back as one (``model_args`` a template data
    set, as for :func:`~pyro_lwflow.amortize`); one trained with a custom ``embedding`` needs a new
    instance of the same module passed as ``embedding=`` (its weights are loaded from the file).

    The guide traces the model once (as on first use), gets the saved number of mixture
    components and then the saved parameters. Its entries in Pyro's global param store are
    dropped, so the loaded values are the ones used, also inside ``pyro_method`` calls and SVI.
    (Two guides of the same class share their parameter names in that store: to keep using
    another ``AutoLWFlow`` side by side, give it a different ``pyro.get_param_store()`` scope.)

    :raises ValueError: ``path`` is not a file written by :func:`save` (corrupt, foreign or a
        pickle of arbitrary objects: nothing in it is executed), or it does not fit the model.
    """
    config, state = _read(path)
    if config["format"] == AMORTIZED_FORMAT:
        return _load_amortized(path, config, state, model, model_args, model_kwargs, embedding)
    guide = AutoLWFlow(
        model,
        num_components=config["num_components"],
        num_transforms=config["num_transforms"],
        hidden_dims=config["hidden_dims"],
        log_scale_bound=config["log_scale_bound"],
        marginal_bins=config.get("marginal_bins"),
        max_components=config.get("max_components", 8),
        box_margin=config.get("box_margin"),
    )
    with torch.random.fork_rng(devices=[]):  # set-up draws initial values; leave the user's RNG alone
        guide.setup(*model_args, **model_kwargs)
    sites = {s.name: list(s.shape) for s in guide.layout}
    if "sites" in config and config["sites"] != sites:
        raise ValueError(f"'{path}' was saved for latent sites {config['sites']}, but this model has {sites}")
    shapes = [state.get(f"{name}_unconstrained") for name in ("mixture_logits", "component_loc", "component_scale")]
    if any(t is None for t in shapes):
        raise ValueError(f"'{path}' has no mixture parameters; it was not saved from an AutoLWFlow")
    # the saved K (and shapes), whatever the set-up chose; the values come from the state_dict
    guide.set_mixture(torch.zeros(shapes[0].shape), torch.zeros(shapes[1].shape), torch.ones(shapes[2].shape))
    try:
        guide.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"'{path}' does not fit this model's guide: {err}") from err
    guide.initialized = True
    guide.component_scores = {int(k): v for k, v in config.get("component_scores", {}).items()}
    store = pyro.get_param_store()
    prefix = guide._pyro_name + "."
    for name in [n for n in store.keys() if n.startswith(prefix)]:
        del store[name]  # a stale entry by the same name would otherwise replace the loaded value
    return guide


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of a saved file, checked; ``ValueError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"'{path}' does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the file is refused below anyway
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle safely means "not our file"
        raise ValueError(
            f"'{path}' is not a pyro_lwflow guide file: it is corrupt, written by another program, or "
            f"holds objects other than tensors and plain values ({type(err).__name__}); nothing in it was run"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, AMORTIZED_FORMAT):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"'{path}' is not a pyro_lwflow guide file (expected format {FORMAT!r}, found {found!r})")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"'{path}' has no valid state_dict of tensors")
    try:
        config = json.loads(payload["config"])
        config["format"] = payload["format"]
        for key in ("num_components", "num_transforms", "hidden_dims", "log_scale_bound"):
            config[key]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"'{path}' has a missing or invalid config: {err!r}") from None
    return config, state


def _load_amortized(path, config: dict, state: dict, model: Callable, model_args: tuple, model_kwargs: dict,
                    embedding: torch.nn.Module | None) -> AmortizedLWFlow:
    if config.get("custom_embedding") and embedding is None:
        raise ValueError(f"'{path}' was trained with a custom embedding: pass a new instance of the same module "
                         "as load(..., embedding=...); its weights come from the file")
    settings = {k: config[k] for k in ("num_components", "num_transforms", "hidden_dims", "log_scale_bound",
                                       "embedding_dim", "box_margin")}
    settings["ensemble"] = config.get("ensemble", 1)
    with torch.random.fork_rng(devices=[]):  # set-up draws initial values; leave the user's RNG alone
        guide = AmortizedLWFlow(model, *model_args, model_kwargs=model_kwargs, embedding=embedding, **settings)
    sites = {s.name: list(s.shape) for s in guide.layout}
    if config["sites"] != sites:
        raise ValueError(f"'{path}' was saved for latent sites {config['sites']}, but this model has {sites}")
    # a file saved before the base had its MLP: the new guide's MLP ends in a zero layer, which is the
    # affine base the file was trained with
    state = {**{k: v for k, v in guide.state_dict().items() if k.startswith("base.mlp.")}, **state}
    try:
        guide.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as err:
        hint = ""
        saved, built = ({k for k in d if k.startswith("embedding.")} for d in (state, guide.state_dict()))
        if saved != built and not config.get("custom_embedding"):
            hint = (" (it was saved with an earlier default embedding, an MLP, which data of at most embedding_dim "
                    "numbers no longer go through: train it again, or pass that MLP as load(..., embedding=...))")
        raise ValueError(f"'{path}' does not fit this model's amortized guide: {err}{hint}") from err
    guide.num_simulations = config.get("num_simulations", 0)
    guide.num_likelihood_evals = config.get("num_likelihood_evals", 0)
    guide.losses, guide.val_losses = list(config.get("losses", [])), list(config.get("val_losses", []))
    return guide
