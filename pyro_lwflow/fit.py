"""fit(): likelihood-weighted training of an AutoLWFlow in one call."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from .draws import WeightedDraws
from .guide import AutoLWFlow
from .loss import LikelihoodWeightedKL

__all__ = ["FitResult", "fit"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :param guide: the trained :class:`AutoLWFlow`.
    :param draws: the weighted draws it was trained on.
    :param losses: per-step minibatch cross-entropy ``−E_post[log q]`` (nats).
    :param ess: effective sample size of the draws' weights.
    :param num_likelihood_evals: model likelihood evaluations spent.
    :param wall_time: seconds spent in :func:`fit` (drawing and training).
    :param num_skipped_steps: steps skipped because the loss or a gradient was not finite.
    :param seed: the seed :func:`fit` was given.
    :param model, model_args, model_kwargs: the model and the data it was conditioned on (used by
        :func:`pyro_lwflow.arviz.to_arviz` and :func:`pyro_lwflow.io.save`).
    """

    guide: AutoLWFlow
    draws: WeightedDraws
    losses: list[float] = field(default_factory=list)
    ess: float = math.nan
    num_likelihood_evals: int = 0
    wall_time: float = 0.0
    num_skipped_steps: int = 0
    seed: int | None = None
    model: Callable | None = None
    model_args: tuple = ()
    model_kwargs: dict = field(default_factory=dict)

    @property
    def log_evidence(self) -> float:
        """Importance-sampling estimate of ``log p(data)`` from the draws."""
        return self.draws.with_beta(1.0).log_evidence

    @property
    def log_evidence_stderr(self) -> float:
        return self.draws.with_beta(1.0).log_evidence_stderr

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``{site: (num_samples, *site_shape)}`` draws from the fitted guide."""
        return self.guide.sample_posterior(num_samples)


def fit(
    model: Callable,
    *args,
    guide: AutoLWFlow | None = None,
    num_components: int | str = 1,
    num_steps: int = 2000,
    num_prior_samples: int = 100_000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    lr_decay: float = 0.1,
    clip_norm: float = 10.0,
    seed: int | None = 0,
    progress: bool = True,
    model_kwargs: dict | None = None,
    loss: LikelihoodWeightedKL | None = None,
    executor: Executor | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> FitResult:
    """Fit a likelihood-weighted flow to ``model``'s posterior given its data ``*args``.

    :param model: a Pyro model; ``model(*args, **model_kwargs)`` conditions it on the data.
    :param guide: an :class:`AutoLWFlow` to train; by default a fresh one with
        ``num_components`` components.
    :param num_steps: gradient steps.
    :param num_prior_samples: prior draws ``N`` weighted by the likelihood.
    :param batch_size: draws per step.
    :param lr: Adam learning rate; it decays geometrically to ``lr · lr_decay`` at the end.
    :param clip_norm: clip on the global gradient norm.
    :param seed: seeds Pyro, torch and NumPy (``pyro.set_rng_seed``); ``None`` leaves them.
    :param progress: show a tqdm bar with the loss and ESS.
    :param loss: a configured :class:`LikelihoodWeightedKL` (overrides ``num_prior_samples``
        and ``batch_size``).
    :param executor, cache_dir: evaluate the likelihood in seeded chunks on this
        :class:`concurrent.futures.Executor` (e.g. ``distributed.Client(...).get_executor()``), one
        ``.npz`` per chunk in ``cache_dir`` so a rerun resumes; see :mod:`pyro_lwflow.evaluation`
        (with ``loss=``, set them on the loss instead).
    :param device: train and sample the guide there (e.g. ``"cuda"``); the draws stay on the CPU.
        Applies to a guide that has not seen the model yet.
    """
    start = time.perf_counter()
    model_kwargs = model_kwargs or {}
    if seed is not None:
        pyro.set_rng_seed(seed)
    if guide is None:
        guide = AutoLWFlow(model, num_components=num_components)
    if device is not None and guide.prototype_trace is None:
        guide.device = torch.device(device)
    if guide.prototype_trace is None:
        pyro.clear_param_store()  # a fresh guide must not pick up stale values by name
    loss = loss or LikelihoodWeightedKL(num_prior_samples, batch_size, progress=progress, executor=executor,
                                        cache_dir=cache_dir)
    draws = loss.prepare(model, guide, *args, **model_kwargs)
    result = FitResult(
        guide, draws, ess=draws.ess, seed=seed, model=model, model_args=args, model_kwargs=dict(model_kwargs)
    )
    params = _guide_params(loss, model, guide, args, model_kwargs)
    optim = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optim, lr_decay ** (1.0 / max(num_steps, 1)))
    with tqdm(range(num_steps), disable=not progress, desc="lwflow", unit="step") as bar:
        for step in bar:
            optim.zero_grad(set_to_none=True)
            value = loss.loss_and_grads(model, guide, *args, **model_kwargs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if not (math.isfinite(value) and torch.isfinite(grad_norm)):
                result.num_skipped_steps += 1  # never apply a non-finite step
                continue
            optim.step()
            schedule.step()
            result.losses.append(value)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{value:.3f}", ess=f"{draws.ess:.0f}")
    guide.refit_mixture_weights(loss.draws)
    result.draws = loss.draws
    result.num_likelihood_evals = loss.num_likelihood_evals
    result.wall_time = time.perf_counter() - start
    return result


def _guide_params(loss, model, guide, args, kwargs) -> list[torch.Tensor]:
    """The unconstrained parameters the loss touches (as :class:`pyro.infer.SVI` finds them)."""
    with poutine.trace(param_only=True) as capture:
        loss.loss(model, guide, *args, **kwargs)
    return [site["value"].unconstrained() for site in capture.trace.nodes.values()]
