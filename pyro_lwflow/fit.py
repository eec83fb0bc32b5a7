"""fit(): likelihood-weighted training of an AutoLWFlow in one call."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from . import modes
from .adapter import PriorAdapter
from .adaptive import DrawPool, Proposal, choose_beta
from .diagnostics import check_weights, pareto_k, psis_log_weights
from .draws import WeightedDraws
from .guide import AutoLWFlow
from .loss import LikelihoodWeightedKL
from .tracing import as_model_data

__all__ = ["FitResult", "fit"]

EMA_DECAY = 0.99  # of the parameter average training leaves behind (see _train)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :param guide: the trained :class:`AutoLWFlow`.
    :param draws: every likelihood-evaluated draw, weighted for the posterior (β = 1).
    :param losses: per-step minibatch cross-entropy ``−E_post[log q]`` (nats).
    :param ess: effective sample size of those weights.
    :param num_likelihood_evals: model likelihood evaluations spent.
    :param wall_time: seconds spent in :func:`fit` (drawing and training).
    :param num_skipped_steps: steps skipped because the loss or a gradient was not finite.
    :param seed: the seed :func:`fit` was given.
    :param model, model_args, model_kwargs: the model and the data it was conditioned on (used by
        :func:`pyro_lwflow.arviz.to_arviz` and :func:`pyro_lwflow.io.save`).
    :param rounds: per round: temperature ``beta``, ESS and Pareto k̂ of the pooled weights at
        β = 1, ``log_evidence`` ± ``log_evidence_stderr``, pooled ``num_draws``,
        ``num_components``, seconds.
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
    rounds: list[dict] = field(default_factory=list)

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

    @property
    def pareto_k(self) -> float:
        """Pareto k̂ of the final importance weights (< 0.5 good, 0.5–0.7 fair, > 0.7 unreliable)."""
        return pareto_k(self.draws.with_beta(1.0))

    @property
    def num_components(self) -> int:
        """Number of mixture components the guide ended with."""
        return int(self.guide.mixture_logits.shape[0])

    def reweighted_sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draws corrected for the flow's residual error: the likelihood-evaluated draws resampled
        by their PSIS-smoothed importance weights (posterior / proposal).

        :returns: ``{site: (num_samples, *site_shape)}`` constrained values.
        """
        draws = self.draws.with_beta(1.0)
        log_w, _ = psis_log_weights(draws.log_weights)
        idx = torch.multinomial(torch.exp(log_w - log_w.max()), num_samples, replacement=True, generator=generator)
        return self.guide.layout.unpack(draws.latents[idx].to(self.guide.component_loc))


def fit(
    model: Callable,
    *args,
    guide: AutoLWFlow | None = None,
    num_components: int | str = "auto",
    num_rounds: int | str = "auto",
    num_steps: int = 600,
    num_prior_samples: int = 100_000,
    samples_per_round: int | None = None,
    max_likelihood_evals: int = 1_000_000,
    max_rounds: int = 10,
    defensive: float = 0.1,
    ess_fraction: float = 0.25,
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

    Round 0 weights ``num_prior_samples`` prior draws by their likelihood and trains the guide
    on them. With ``num_rounds=1`` that is all: the paper's one-shot method. Otherwise each
    further round draws ``samples_per_round`` from the trained guide mixed with the prior
    (share ``defensive``), pools them with every earlier draw (weights against the mixture of
    all proposals, so no likelihood evaluation is wasted), and retrains. While the weights are
    too uneven, the likelihood is tempered (``L^β``, β the largest value keeping the ESS at
    ``ess_fraction × samples_per_round``) so every round sees the whole posterior's shape; β
    rises to 1. With ``num_rounds="auto"`` fitting stops once β = 1 and fresh draws confirm the
    fit (ESS at the target, Pareto k̂ < 0.7), or when ``max_likelihood_evals`` or ``max_rounds``
    is reached.

    :param model: a Pyro model; ``model(*args, **model_kwargs)`` conditions it on the data.
    :param guide: an :class:`AutoLWFlow` to train (its own ``num_components`` is used); by
        default a fresh one with ``num_components`` (``"auto"``: chosen from the draws and
        re-chosen each round).
    :param max_likelihood_evals: with ``num_rounds="auto"``, the most likelihood evaluations to
        spend, round 0's ``num_prior_samples`` included (capped to it).
    :param num_steps: gradient steps per round (each round after the first starts from the last flow);
        the round ends with the moving average of the iterates (decay 0.99), which cancels most
        of the last steps' minibatch noise.
    :param lr: Adam learning rate; each round it decays geometrically to ``lr · lr_decay``.
    :param clip_norm: clip on the global gradient norm.
    :param seed: the fit runs on torch's RNG seeded with this, and the caller's RNG state is given
        back afterwards, so the same seed gives the same fit whatever ran before and the executor;
        ``None`` draws from the caller's stream instead (seed it with ``pyro.set_rng_seed``).
    :param progress: show tqdm bars with the loss and ESS.
    :param loss: a configured :class:`LikelihoodWeightedKL` (its ``num_prior_samples``,
        ``batch_size``, estimator and chunking override the arguments here).
    :param executor, cache_dir: evaluate the likelihood in seeded chunks on this
        :class:`concurrent.futures.Executor` (e.g. ``distributed.Client(...).get_executor()``), one
        ``.npz`` per chunk in ``cache_dir`` so a rerun resumes; see :mod:`pyro_lwflow.evaluation`
        (with ``loss=``, set them on the loss instead).
    :param device: train and sample the guide there (e.g. ``"cuda"``); the draws stay on the CPU.
        Applies to a guide that has not seen the model yet.
    :returns: a :class:`FitResult`; ``result.rounds`` has one row of diagnostics per round.
    """
    start = time.perf_counter()
    model_kwargs = dict(model_kwargs or {})
    if num_rounds != "auto" and not (isinstance(num_rounds, int) and num_rounds >= 1):
        raise ValueError(f"num_rounds must be a positive integer or 'auto', got {num_rounds!r}")
    if not 0.0 <= defensive < 1.0:
        raise ValueError(f"defensive must be in [0, 1), got {defensive}")
    args, model_kwargs = as_model_data(tuple(args)), as_model_data(model_kwargs)
    with _seeded(seed):
        guide = guide if guide is not None else AutoLWFlow(model, num_components=num_components)
        if device is not None and guide.prototype_trace is None:
            guide.device = torch.device(device)
        if guide.prototype_trace is None:
            _forget_params(guide)  # a fresh guide must not pick up stale values of an earlier one by name
            guide.setup(*args, **model_kwargs)
        if num_rounds == "auto":  # the budget covers round 0's prior draws too
            num_prior_samples = min(num_prior_samples, max_likelihood_evals)
        loss = loss or LikelihoodWeightedKL(num_prior_samples, batch_size, progress=progress, executor=executor,
                                            cache_dir=cache_dir)
        one_shot = num_rounds == 1
        rounds_limit = max_rounds if num_rounds == "auto" else num_rounds
        per_round = samples_per_round or loss.num_prior_samples
        target_ess = ess_fraction * per_round

        adapter = loss.make_adapter(model, guide.prototype_trace, args, model_kwargs)
        prior = adapter.sample(loss.num_prior_samples, progress=progress)
        pool = DrawPool(check_weights(prior, loss.min_ess if one_shot else 0.0))
        evals = len(prior)
        result = FitResult(guide, pool.draws(), seed=seed, model=model, model_args=args, model_kwargs=model_kwargs)
        beta = 0.0
        for r in range(rounds_limit):
            round_start = time.perf_counter()
            if r > 0:
                evals += _draw_round(pool, adapter, guide, per_round, defensive)
            new_beta = 1.0 if one_shot else max(beta, choose_beta(pool.draws(), target_ess, floor=beta))
            confirmed = beta == 1.0 and new_beta == 1.0
            diag = _diagnostics(pool.draws(1.0))
            if num_rounds == "auto" and confirmed and diag["ess"] >= target_ess and diag["pareto_k"] < 0.7:
                guide.refit_mixture_weights(pool.draws(1.0))  # the fresh draws sharpen the mode weights
                result.rounds.append({"round": r, "beta": 1.0, "trained": False, **diag, **_sizes(pool, guide),
                                      "seconds": time.perf_counter() - round_start})
                break
            beta = new_beta
            draws = pool.draws(beta)
            loss.set_draws(draws, model_args=(args, model_kwargs))
            mode_ess = min(modes.mode_ess(guide.latent_dim), target_ess)
            modes.place_components(guide, pool, beta, seed=(seed or 0) + r, mode_ess=mode_ess)
            _train(loss, model, guide, args, model_kwargs, result, num_steps, lr, lr_decay, clip_norm,
                   progress, desc=f"round {r} (β={beta:.3g})")
            guide.refit_mixture_weights(draws)
            result.rounds.append({"round": r, "beta": beta, "trained": True, "ess_at_beta": draws.ess, **diag,
                                  **_sizes(pool, guide), "seconds": time.perf_counter() - round_start})
            if evals + per_round > max_likelihood_evals and num_rounds == "auto":
                break
        result.draws = pool.draws(1.0)
        result.ess = result.draws.ess
        result.num_likelihood_evals = evals
        result.wall_time = time.perf_counter() - start
        if beta < 1.0:
            warnings.warn(
                f"Stopped at likelihood temperature β = {beta:.3g} < 1 (after {evals} likelihood evaluations), so "
                "the guide fits a tempered posterior. Raise max_likelihood_evals or num_rounds, or samples_per_round.",
                stacklevel=2,
            )
        elif not one_shot and result.rounds[-1]["pareto_k"] > 0.7:
            warnings.warn(
                f"The importance weights are unreliable (Pareto k̂ = {result.rounds[-1]['pareto_k']:.2f} > 0.7): the "
                "evidence and reweighted draws may be off. Try more rounds (max_likelihood_evals), more num_steps, "
                "or a larger flow (num_transforms, hidden_dims).",
                stacklevel=2,
            )
        return result


@contextmanager
def _seeded(seed: int | None):
    """Run with torch's RNG seeded by ``seed`` and give the caller's RNG state back afterwards;
    ``None`` draws from (and advances) the caller's stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def _forget_params(guide: AutoLWFlow) -> None:
    """Remove the param store's entries under the guide's name, and only those."""
    store = pyro.get_param_store()
    prefix = guide._pyro_name
    for name in [k for k in store.keys() if k == prefix or k.startswith(prefix + ".")]:
        del store[name]


def _draw_round(pool: DrawPool, adapter: PriorAdapter, guide: AutoLWFlow, num: int, defensive: float) -> int:
    """Draw ``num`` from ``(1 − defensive) guide + defensive prior``, evaluate and pool them."""
    proposal = Proposal(guide.frozen_posterior(), defensive, num, guide.component_loc.device)
    num_prior = int(torch.distributions.Binomial(num, torch.tensor(defensive)).sample()) if defensive > 0 else 0
    with torch.no_grad():
        latents = proposal.flow.sample((num - num_prior,)).float().cpu()
    log_lik, log_prior = adapter.evaluate(latents)
    parts = [(latents, log_lik, log_prior)]
    if num_prior:
        prior = adapter.sample(num_prior)
        parts.append((prior.latents, prior.log_likelihood, prior.log_prior))
    latents, log_lik, log_prior = (torch.cat(x) for x in zip(*parts, strict=True))
    bad = torch.isnan(log_lik) | (log_lik == math.inf) | torch.isnan(log_prior)
    if bad.any():
        warnings.warn(f"{int(bad.sum())} of {num} new draws have a NaN or +inf log density; their weight is set to 0.",
                      stacklevel=3)
        log_lik = torch.where(bad, torch.full_like(log_lik, -math.inf), log_lik)
        log_prior = torch.where(torch.isnan(log_prior), torch.full_like(log_prior, -math.inf), log_prior)
    pool.add(proposal, latents, log_lik, log_prior)
    return num


def _diagnostics(draws: WeightedDraws) -> dict[str, float]:
    return {
        "ess": draws.ess,
        "pareto_k": pareto_k(draws),
        "log_evidence": draws.log_evidence,
        "log_evidence_stderr": draws.log_evidence_stderr,
    }


def _sizes(pool: DrawPool, guide: AutoLWFlow) -> dict[str, int]:
    return {"num_draws": len(pool), "num_components": int(guide.mixture_logits.shape[0])}


def _train(loss, model, guide, args, kwargs, result, num_steps, lr, lr_decay, clip_norm, progress, desc) -> None:
    """``num_steps`` of Adam on the loss, skipping any step whose loss or gradient is not finite.

    The parameters left behind are an exponential moving average of the iterates (Polyak–Ruppert
    averaging, horizon ~``1 / (1 − EMA_DECAY)`` steps): it cancels most of the minibatch noise the
    last steps leave in the flow.
    """
    params = _guide_params(loss, model, guide, args, kwargs)
    optim = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optim, lr_decay ** (1.0 / max(num_steps, 1)))
    average = [p.detach().clone() for p in params]
    ess = f"{loss.draws.ess:.0f}"
    with tqdm(range(num_steps), disable=not progress, desc=desc, unit="step") as bar:
        for step in bar:
            optim.zero_grad(set_to_none=True)
            value = loss.loss_and_grads(model, guide, *args, **kwargs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if not (math.isfinite(value) and torch.isfinite(grad_norm)):
                result.num_skipped_steps += 1  # never apply a non-finite step
                continue
            optim.step()
            schedule.step()
            with torch.no_grad():
                decay = min(EMA_DECAY, (1 + step) / (10 + step))  # a short memory at first
                torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - decay)
            result.losses.append(value)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{value:.3f}", ess=ess)
    with torch.no_grad():
        for p, a in zip(params, average, strict=True):
            p.copy_(a)


def _guide_params(loss, model, guide, args, kwargs) -> list[torch.Tensor]:
    """The unconstrained parameters the loss touches (as :class:`pyro.infer.SVI` finds them)."""
    with poutine.trace(param_only=True) as capture:
        loss.loss(model, guide, *args, **kwargs)
    return [site["value"].unconstrained() for site in capture.trace.nodes.values()]
