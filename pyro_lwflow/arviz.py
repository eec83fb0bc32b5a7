"""ArviZ export: a fitted flow, its weighted prior draws and pointwise log-likelihoods as InferenceData.

Groups written by :func:`to_arviz` (``C`` chains × ``S`` draws, ``C · S = num_samples``; ``N`` the
number of weighted prior draws kept):

======================  ==========================================================================
``posterior``           independent guide draws of every latent site, constrained values,
                        ``(C, S, *site_shape)``; split into chains only so that ``az.summary``'s
                        R̂ and ESS machinery runs (the draws are i.i.d., so R̂ ≈ 1 is expected).
``sample_stats``        per posterior draw ``(C, S)``: ``log_q`` (the guide's log density of the
                        constrained values, Jacobians included, nats), ``lp`` (log prior +
                        log-likelihood in the unconstrained space, Stan's convention) and
                        ``log_weight`` (``log p(θ, D) − log q(θ)``, the importance weight of the
                        draw: the same in either space).
``log_likelihood``      pointwise log-likelihood of every observed site at the posterior draws,
                        ``(C, S, *data_shape)``; a ``pyro.factor`` site gives its factor value.
                        ``az.loo`` / ``az.waic`` use it (pass ``var_name`` if there are several).
``prior``               the weighted draws the flow was trained on, constrained, ``(1, N, *shape)``.
``sample_stats_prior``  per prior draw ``(1, N)``: ``log_likelihood``, ``log_prior`` and
                        ``log_proposal`` (unconstrained space), ``log_weight`` (unnormalised
                        log importance weight), ``psis_log_weight`` (Pareto-smoothed, normalised
                        over *all* draws) and ``source`` (0 = prior, r = adaptive round r).
``observed_data``       the values of the model's observed sites (``pyro.factor`` sites have none).
======================  ==========================================================================

``idata.attrs`` and ``idata.posterior.attrs`` carry: ``pyro_lwflow_version``, ``seed`` (of the fit),
``export_seed``, ``settings`` (a JSON string of the guide's and the fit's settings),
``log_evidence`` and ``log_evidence_stderr`` (nats), ``ess`` (Kish ESS of the prior draws),
``num_likelihood_evals``, ``wall_time`` (s), ``prior_pareto_k`` (k̂ of the prior draws' weights),
``guide_pareto_k`` and ``guide_ess`` (of the posterior draws' ``log_weight``: k̂ < 0.7 says the
guide is a trustworthy importance sampler of the posterior).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import arviz as az
import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from .adapter import PriorAdapter
from .diagnostics import psis_log_weights

__all__ = ["to_arviz"]


def to_arviz(
    result,
    num_samples: int = 4000,
    num_chains: int = 4,
    *,
    seed: int | None = 0,
    max_prior_draws: int | None = 100_000,
    model: Callable | None = None,
    model_args: tuple | None = None,
    model_kwargs: dict | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
    chunk_size: int = 10_000,
) -> az.InferenceData:
    """Export a :class:`~pyro_lwflow.FitResult` as :class:`arviz.InferenceData`.

    :param result: what :func:`pyro_lwflow.fit` returned.
    :param num_samples: posterior draws from the guide, split evenly into ``num_chains`` chains
        (the remainder of ``num_samples / num_chains`` is dropped).
    :param seed: seeds the guide draws (the global RNG state is left as it was); ``None`` uses it.
    :param max_prior_draws: keep at most this many weighted draws in ``prior`` (the first ones; they
        are i.i.d.); ``None`` keeps all. Diagnostics in the attributes use all of them.
    :param model, model_args, model_kwargs: the model and its data, by default those ``fit`` saw.
    :param coords, dims: passed to :func:`arviz.from_dict` (``dims`` maps a site to dimension names).
    :param chunk_size: posterior draws traced through the model at once (bounds memory).
    :returns: InferenceData with the groups listed in this module's docstring.
    """
    if num_chains < 1 or num_samples < num_chains:
        raise ValueError(f"need num_samples >= num_chains >= 1, got {num_samples} and {num_chains}")
    guide = result.guide
    guide.require_setup()
    model = model or result.model
    if model is None:
        raise ValueError("to_arviz needs the model: pass model= (and model_args=) or use a result of fit()")
    args = tuple(result.model_args if model_args is None else model_args)
    kwargs = dict(result.model_kwargs if model_kwargs is None else model_kwargs)
    per_chain = num_samples // num_chains
    n = per_chain * num_chains
    adapter = PriorAdapter(model, guide.prototype_trace, args, kwargs, chunk_size)
    tracer = adapter.tracer

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        latents = guide.get_posterior().sample((n,))
        log_q_unconstrained = guide.latent_log_prob(latents).double()
    values = adapter.unpack(latents)
    with torch.no_grad():
        log_q = guide.log_density(values).double()
    log_lik, log_prior = adapter.evaluate(latents)
    log_weight = log_lik + log_prior - log_q_unconstrained
    pointwise = tracer.pointwise_log_likelihood(latents, log_lik, chunk_size)
    observed = tracer.observed_values()
    plate_dims, plate_coords = _plate_dims(tracer)

    def chains(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy().reshape((num_chains, per_chain) + tuple(x.shape[1:]))

    prior_part = result.draws if max_prior_draws is None else result.draws.subset(slice(0, max_prior_draws))
    psis_lw, prior_k = psis_log_weights(result.draws.log_weights)
    _, guide_k = psis_log_weights(log_weight)
    guide_w = torch.softmax(log_weight[torch.isfinite(log_weight)], 0)

    def one_chain(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()[None]

    attrs = _attrs(result, seed, prior_k, guide_k, float(1.0 / (guide_w * guide_w).sum()))
    return az.from_dict(
        posterior={k: chains(v) for k, v in values.items()},
        sample_stats={"log_q": chains(log_q), "lp": chains(log_lik + log_prior), "log_weight": chains(log_weight)},
        log_likelihood={k: chains(v) for k, v in pointwise.items()},
        prior={k: one_chain(v) for k, v in adapter.unpack(prior_part.latents).items()},
        sample_stats_prior={
            "log_likelihood": one_chain(prior_part.log_likelihood),
            "log_prior": one_chain(prior_part.log_prior),
            "log_proposal": one_chain(prior_part.log_proposal),
            "log_weight": one_chain(prior_part.log_weights),
            "psis_log_weight": one_chain(psis_lw[: len(prior_part)]),
            "source": one_chain(prior_part.source),
        },
        observed_data=observed or None,
        coords={**plate_coords, **(coords or {})},
        dims={**plate_dims, **(dims or {})},
        attrs=attrs,
        posterior_attrs=dict(attrs),
    )


def _plate_dims(tracer) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """ArviZ ``dims`` naming every plate dimension of every latent and observed site after its plate,
    and ``coords`` ``{plate: [0 … size − 1]}``; other dimensions keep ArviZ's ``{site}_dim_{i}``."""
    trace = tracer.trace(None, None)
    dims, coords = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("is_auxiliary"):
            continue
        batch_ndim = site["value"].dim() - site["fn"].event_dim
        if batch_ndim <= 0:
            continue
        by_dim = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized}
        names = []
        for j in range(batch_ndim):
            frame = by_dim.get(j - batch_ndim)
            if frame is None:
                names.append(f"{name}_dim_{j}")
            else:
                names.append(frame.name)
                coords[frame.name] = list(range(int(site["value"].shape[j])))
        dims[name] = names
    return dims, coords


def _attrs(result, seed: int | None, prior_k: float, guide_k: float, guide_ess: float) -> dict:
    """NetCDF-safe attributes (numbers and strings only)."""
    from . import __version__

    guide = result.guide
    settings = {
        "num_components": int(guide.component_loc.shape[0]),
        "num_components_requested": guide.num_components,
        "num_transforms": guide.num_transforms,
        "hidden_dims": list(guide.hidden_dims),
        "log_scale_bound": guide.log_scale_bound,
        "num_draws": len(result.draws),
        "num_steps": len(result.losses) + result.num_skipped_steps,
        "num_skipped_steps": result.num_skipped_steps,
        "latent_dim": guide.latent_dim,
    }
    return {
        "pyro_lwflow_version": __version__,
        "pyro_version": pyro.__version__,
        "seed": "None" if result.seed is None else int(result.seed),
        "export_seed": "None" if seed is None else int(seed),
        "settings": json.dumps(settings),
        "log_evidence": float(result.log_evidence),
        "log_evidence_stderr": float(result.log_evidence_stderr),
        "ess": float(result.ess),
        "num_likelihood_evals": int(result.num_likelihood_evals),
        "num_gradient_evals": int(result.num_gradient_evals),
        "wall_time": float(result.wall_time),
        "prior_pareto_k": float(prior_k),
        "guide_pareto_k": float(guide_k),
        "guide_ess": float(guide_ess),
    }
