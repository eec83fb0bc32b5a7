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
from .adaptive import Blend, DrawPool, Proposal, choose_beta
from .diagnostics import check_weights, pareto_k, psis_log_weights
from .draws import WeightedDraws
from .guide import AutoLWFlow
from .loss import LikelihoodWeightedKL
from .schedule import RoundSummary, Schedule
from .starts import find_optima, is_differentiable, start_proposal
from .tracing import as_model_data

__all__ = ["FitResult", "fit"]

EMA_DECAY = 0.99  # of the parameter average training leaves behind (see _train)
HELD_OUT = 0.1  # share of the draws a warm round holds out to stop on
CHECK_EVERY = 25  # steps between held-out checks
ROUND_ESS_FACTOR = 2.0  # a tempered round draws this many times round_ess / efficiency, so β can rise
FIRST_PART = 1 / 8  # share of its plan a round draws first (at least 1,000 draws; see _Run.draw_from_guide)
MIN_PART = 250  # fewest draws a later part of a round takes
COLLAPSED = 0.5  # a tempered round ends early once its draws propose under this share of its planned efficiency
AHEAD_ESS = 300.0  # effective draws the look-ahead part of a tempered proposal is fitted on (see _tempered_proposal)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :param guide: the trained :class:`AutoLWFlow`.
    :param draws: every likelihood-evaluated draw, weighted for the posterior (β = 1) against the mixture of
        all proposals (:meth:`~pyro_lwflow.adaptive.DrawPool.draws`).
    :param losses: per-step minibatch cross-entropy ``−E_post[log q]`` (nats).
    :param ess: effective sample size of those weights.
    :param num_likelihood_evals: model likelihood evaluations spent.
    :param num_gradient_evals: log-joint gradient evaluations spent (by the gradient start).
    :param wall_time: seconds spent in :func:`fit` (drawing and training).
    :param num_skipped_steps: steps skipped because the loss or a gradient was not finite.
    :param seed: the seed :func:`fit` was given.
    :param schedule: the :class:`~pyro_lwflow.schedule.Schedule` it ran.
    :param model, model_args, model_kwargs: the model and the data it was conditioned on (used by
        :func:`pyro_lwflow.arviz.to_arviz` and :func:`pyro_lwflow.io.save`).
    :param rounds: one :class:`~pyro_lwflow.schedule.RoundSummary` per round.
    :param log_evidence: importance-sampling estimate of ``log p(data)`` (nats): each round's draws
        against their own proposal, combined (:meth:`~pyro_lwflow.adaptive.DrawPool.log_evidence`).
    :param log_evidence_stderr: its standard error; ``inf`` when no round's weights can support one
        (:attr:`~pyro_lwflow.draws.WeightedDraws.log_evidence_stderr`).
    """

    guide: AutoLWFlow
    draws: WeightedDraws
    losses: list[float] = field(default_factory=list)
    ess: float = math.nan
    num_likelihood_evals: int = 0
    num_gradient_evals: int = 0
    wall_time: float = 0.0
    num_skipped_steps: int = 0
    seed: int | None = None
    schedule: Schedule | None = None
    model: Callable | None = None
    model_args: tuple = ()
    model_kwargs: dict = field(default_factory=dict)
    rounds: list[RoundSummary] = field(default_factory=list)
    log_evidence: float = math.nan
    log_evidence_stderr: float = math.nan

    @property
    def num_evals(self) -> int:
        """Model evaluations of both kinds (likelihood and gradient)."""
        return self.num_likelihood_evals + self.num_gradient_evals


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
    schedule: Schedule | None = None,
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
    callback: Callable[[AutoLWFlow, RoundSummary], None] | None = None,
    start=None,
) -> FitResult:
    """Fit a likelihood-weighted flow to ``model``'s posterior given its data ``*args``.

    The :class:`~pyro_lwflow.schedule.Schedule` says how the model evaluations are spent. By
    default: when the log-likelihood is differentiable in torch, L-BFGS climbs from many prior
    draws and round 0 draws from heavy-tailed Gaussians at the optima it finds (mixed with the
    prior); otherwise round 0 draws from the prior. Each round then trains the guide on every
    draw so far (weighted against the mixture of all proposals used, so no evaluation is
    wasted), tempering the likelihood (``L^β``) while the weights are too uneven, and the next
    round draws from the trained guide, as many as its efficiency says are needed. The fit stops
    once the pooled weights at β = 1 have ``schedule.target_ess`` effective draws and Pareto
    k̂ < 0.7, or when ``schedule.budget`` is spent. ``Schedule.one_shot(N)`` is the paper's
    method: ``N`` prior draws, one training.

    :param model: a Pyro model; ``model(*args, **model_kwargs)`` conditions it on the data.
    :param guide: an :class:`AutoLWFlow` to train (its own ``num_components`` is used); by
        default a fresh one with ``num_components`` (``"auto"``: counted from the draws each round).
    :param schedule: the plan (default ``Schedule()``).
    :param batch_size: draws per gradient step.
    :param lr: Adam learning rate; each round it decays geometrically to ``lr · lr_decay``.
    :param clip_norm: clip on the global gradient norm.
    :param seed: the fit runs on torch's RNG seeded with this, and the caller's RNG state is given
        back afterwards, so the same seed gives the same fit whatever ran before and the executor;
        ``None`` draws from the caller's stream instead (seed it with ``pyro.set_rng_seed``).
    :param progress: a progress bar of the calls spent against the budget, with β and the ESS.
    :param loss: a configured :class:`LikelihoodWeightedKL` (its ``batch_size``, estimator,
        chunking and executor are used; the draws come from the schedule).
    :param executor, cache_dir: evaluate the likelihood in seeded chunks on this
        :class:`concurrent.futures.Executor` (e.g. ``distributed.Client(...).get_executor()``), one
        ``.npz`` per chunk of prior draws in ``cache_dir`` so a rerun resumes; see
        :mod:`pyro_lwflow.evaluation` (with ``loss=``, set them on the loss instead).
    :param device: train and sample the guide there (e.g. ``"cuda"``); the draws stay on the CPU.
        Applies to a guide that has not seen the model yet.
    :param callback: called after each round as ``callback(guide, summary)``.
    :param start: round 0 draws from this instead of the optima or the prior: a distribution over
        the packed unconstrained latents, or an object with one as ``.latent_dist`` (an amortized
        guide's answer for these data, ``amortized.condition(x)``), mixed with the prior
        (``schedule.defensive``).
    :returns: a :class:`FitResult`; ``result.rounds`` has one :class:`RoundSummary` per round.
    """
    began = time.perf_counter()
    schedule = schedule or Schedule()
    args, model_kwargs = as_model_data(tuple(args)), as_model_data(dict(model_kwargs or {}))
    with _seeded(seed):
        guide = guide if guide is not None else AutoLWFlow(model, num_components=num_components)
        if device is not None and guide.prototype_trace is None:
            guide.device = torch.device(device)
        if guide.prototype_trace is None:
            _forget_params(guide)  # a fresh guide must not pick up stale values of an earlier one by name
            guide.setup(*args, **model_kwargs)
        loss = loss or LikelihoodWeightedKL(batch_size=batch_size, progress=progress, executor=executor,
                                            cache_dir=cache_dir)
        adapter = loss.make_adapter(model, guide.prototype_trace, args, model_kwargs)
        run = _Run(schedule, adapter, guide, loss, progress, start)
        result = FitResult(guide, None, seed=seed, schedule=schedule, model=model, model_args=args,
                           model_kwargs=model_kwargs)
        try:
            run.start(min_ess=loss.min_ess)
            for r in range(schedule.num_rounds if schedule.num_rounds != "auto" else schedule.max_rounds):
                round_start = time.perf_counter()
                if r > 0:
                    run.draw_from_guide()
                beta, final = run.next_beta()
                trained = run.train(model, args, model_kwargs, result, beta, lr, lr_decay, clip_norm, seed, r)
                summary = run.summary(r, beta, trained, time.perf_counter() - round_start)
                result.rounds.append(summary)
                if callback is not None:
                    callback(guide, summary)
                if final or not run.plan_next_round():
                    break
        finally:
            run.close()
        if run.beta >= 1.0 and run.trained_once:
            # the modes' masses from each round's own weights: the pooled ones undervalue the draws the later proposals
            # trained on (DrawPool.draws_by_round); the flow trains on the pooled ones, whose ESS is larger
            guide.refit_mixture_weights(run.pool.draws_by_round(1.0))
        result.draws = run.pool.draws(1.0)
        result.ess = result.draws.ess
        result.log_evidence, result.log_evidence_stderr = run.pool.log_evidence(1.0)
        result.num_likelihood_evals = run.likelihood_evals
        result.num_gradient_evals = run.gradient_evals
        result.wall_time = time.perf_counter() - began
        _warn_if_unfinished(result, run.beta, schedule)
        return result


class _Run:
    """The state of one fit: the pool of draws, the temperature, the calls spent, the next round's size."""

    def __init__(self, schedule: Schedule, adapter: PriorAdapter, guide: AutoLWFlow, loss: LikelihoodWeightedKL,
                 progress: bool, start=None) -> None:
        self.schedule, self.adapter, self.guide, self.loss = schedule, adapter, guide, loss
        self.given_start = getattr(start, "latent_dist", start)
        self.auto = schedule.num_rounds == "auto"
        self.one_shot = schedule.num_rounds == 1
        self.likelihood_evals = self.gradient_evals = 0
        self.beta = 0.0
        self.trained_once = False
        self.next_draws = 0
        self.last_round_efficiency = math.nan
        self.guide_efficiency = math.nan  # of the last round drawn from the guide
        self.efficiencies: list[float] = []  # of every round drawn from the guide
        self.source = "prior"
        self.next_proposal = None  # what the next round draws from, when not the guide alone
        self.tempered = False  # whether the flow trained at β < 1 since it last started afresh at β = 1
        self.counted_at_one = False  # whether the modes were counted at β = 1 on enough draws (then kept)
        self.summarized_calls, self.summarized_ess = 0, 0.0  # at the last round's summary (calls per ESS gained)
        self.round_ess = schedule.round_ess  # raised to the mode count's needs from gradient optima (see start)
        self.bar = tqdm(total=schedule.budget, disable=not progress, unit="call", desc="lwflow fit",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} calls [{elapsed}{postfix}]")

    @property
    def spent(self) -> int:
        return self.likelihood_evals + self.gradient_evals

    def _count(self, likelihood: int = 0, gradient: int = 0) -> None:
        self.likelihood_evals += likelihood
        self.gradient_evals += gradient
        self.bar.update(likelihood + gradient)

    def close(self) -> None:
        self.bar.close()

    # -- round 0 ---------------------------------------------------------------------------

    def start(self, min_ess: float) -> None:
        """Round 0's draws: from the given start, else from the optima of the log joint where it has a
        gradient, else from the prior."""
        schedule, dim = self.schedule, self.guide.latent_dim
        proposal = None
        if self.given_start is not None:
            proposal = self.given_start
        elif schedule.starts != "prior":
            proposal = self._gradient_start()
        n = schedule.first_round_draws(dim, from_optima=proposal is not None)
        if proposal is None:
            draws = self.adapter.sample(n, progress=False)
            self._count(likelihood=self.adapter.num_evaluated)
            self.pool = DrawPool(check_weights(draws, min_ess if self.one_shot else 0.0))
        else:
            self.source = "optima" if self.given_start is None else "start"
            proposal = Proposal(proposal, schedule.defensive, n)
            latents, log_lik, log_prior = self._draw(proposal, n)
            draws = WeightedDraws(latents, log_lik, log_prior, proposal.log_prob(latents, log_prior))
            self.pool = DrawPool(draws, proposal)
        self.mode_weight_tolerance = schedule.mode_weight_tolerance(from_optima=self.source == "optima")
        if self.source != "prior" and self.guide.num_components == "auto":
            # from optima (or a given start), enough effective draws to count modes on before training at
            # β = 1 (a 20-D flow first trained on round 0's 7,000 ends worse); from the prior, tempered
            # rounds of that size (3,250 at 10-D, 11,500 at 20-D) cost more calls than the count needs,
            # which waits for the pooled draws to hold that many
            self.round_ess = max(self.round_ess, min(modes.mode_ess(dim), schedule.target_ess))
        self.last_round_efficiency = self._own_efficiency(0, 1.0)

    def _gradient_start(self):
        """The start proposal at the optima L-BFGS finds, or ``None`` (prior start)."""
        schedule, tracer, dim = self.schedule, self.adapter.tracer, self.guide.latent_dim
        num_starts = schedule.starts_for(dim)
        with torch.random.fork_rng(devices=[]):
            prior_latents = tracer.prior_latents(max(4 * num_starts, 2_000))
        if not is_differentiable(tracer, prior_latents):
            if schedule.starts == "gradient":
                raise ValueError(
                    "Schedule(starts='gradient') needs a log-likelihood that is differentiable in torch, but this "
                    "model's has no finite gradient (a NumPy black box, or .item() or float() on a latent). Use "
                    "starts='auto' or 'prior'."
                )
            return None
        self.bar.set_postfix_str("finding modes by L-BFGS")
        optima, count = find_optima(tracer, prior_latents, num_starts)
        self._count(gradient=count)
        if not optima:
            if schedule.starts == "gradient":
                warnings.warn("L-BFGS found no optimum of the log joint (it diverged from every start); "
                              "starting from the prior instead.", stacklevel=4)
            return None
        return start_proposal(optima)

    # -- later rounds ------------------------------------------------------------------------

    def _draw(self, proposal: Proposal, num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``num`` from ``(1 − defensive) · proposal + defensive · prior`` and evaluate them."""
        defensive = proposal.defensive
        num_prior = int(torch.distributions.Binomial(num, torch.tensor(defensive)).sample()) if defensive > 0 else 0
        with torch.no_grad():
            latents = proposal.flow.sample((num - num_prior,)).float().cpu()
        log_lik, log_prior = self.adapter.evaluate(latents)
        self._count(likelihood=num - num_prior)
        parts = [(latents, log_lik, log_prior)]
        if num_prior:
            prior = self.adapter.sample(num_prior)
            self._count(likelihood=self.adapter.num_evaluated)
            parts.append((prior.latents, prior.log_likelihood, prior.log_prior))
        latents, log_lik, log_prior = (torch.cat(x) for x in zip(*parts, strict=True))
        bad = torch.isnan(log_lik) | (log_lik == math.inf) | torch.isnan(log_prior) | ~torch.isfinite(latents).all(-1)
        if bad.any():
            warnings.warn(f"{int(bad.sum())} of {num} new draws have a NaN or +inf log density; their weight is set "
                          "to 0.", stacklevel=4)
            log_lik = torch.where(bad, torch.full_like(log_lik, -math.inf), log_lik)
            log_prior = torch.where(torch.isnan(log_prior), torch.full_like(log_prior, -math.inf), log_prior)
            latents = torch.nan_to_num(latents, nan=0.0, posinf=0.0, neginf=0.0)
        return latents, log_lik, log_prior

    def draw_from_guide(self) -> None:
        """Draw the planned round from the guide (or the tempered blend), in parts, ending at the first
        part after which the round is done (:meth:`_round_done`): its size is planned from the last
        guide's efficiency, and the guide just trained is usually better (after a collapsed round, far
        better). Parts are an eighth of the plan (at least 1,000 draws); a tempered round's last is only
        what it still lacks at its effective draws per draw so far (at least ``MIN_PART``). A tempered round
        whose draws so far propose at under ``COLLAPSED`` times the efficiency it was planned for ends
        early: its proposal missed where the tempered posterior is, and the draws that found it are
        worth more to the next training than the rest of the plan."""
        flow = self.next_proposal if self.next_proposal is not None else self.guide.frozen_posterior()
        planned = self.next_draws
        step = min(max(math.ceil(planned * FIRST_PART), 1_000), planned) if self.auto else planned
        proposal = Proposal(flow, self.schedule.defensive, step, self.guide.component_loc.device)
        self.pool.add(proposal, *self._draw(proposal, step))
        drawn = step
        while drawn < planned and not self._round_done():
            part = step  # at β = 1 whole parts: the draws past target_ess are the final training's (single_mode_2d,
            # seeds 0/1/2: W1 1.14/1.16/1.15× the floor with whole parts, 1.78/1.67/1.30× with rate-sized ones)
            if self.beta < 1.0:
                have, need = self._own_ess(), self.tempered_round_ess
                if have / drawn < COLLAPSED * need / planned:
                    break  # it proposes far below the plan: retrain on what its draws found rather than draw on
                part = math.ceil((need - have) * drawn / have) if have > 0 else step
            part = min(max(part, MIN_PART), step, planned - drawn)
            self.pool.extend(*self._draw(proposal, part))
            drawn += part
        self.source = "guide"
        self.last_round_efficiency = self.guide_efficiency = self._own_efficiency(len(self.pool.proposals) - 1,
                                                                                  self.beta)
        self.efficiencies.append(self.guide_efficiency)

    def _own_ess(self) -> float:
        """Effective draws of the round being drawn, against its own proposal at its β."""
        return float(self.pool.own_draws(len(self.pool.proposals) - 1, self.beta).ess)

    @property
    def tempered_round_ess(self) -> float:
        """Own effective draws a tempered round is planned for (and stops at)."""
        return ROUND_ESS_FACTOR * self.round_ess

    def _round_done(self) -> bool:
        """Whether the round drawn so far is enough: at β = 1 the stopping rule holds; below it, the
        round's own draws at its β hold :attr:`tempered_round_ess`."""
        if self.beta >= 1.0:
            return self._can_stop()
        return self._own_ess() >= self.tempered_round_ess

    def _can_stop(self) -> bool:
        """Whether the pooled draws at β = 1 meet the stopping rule (ESS, k̂, mode weights)."""
        at_one = self.pool.draws(1.0)
        if at_one.ess < self.schedule.target_ess:  # the cheap test first: the others evaluate the guide on every draw
            return False
        return at_one.ess >= self._needed_ess(at_one) and pareto_k(at_one) < 0.7

    def _own_efficiency(self, index: int, beta: float) -> float:
        """ESS per draw of round ``index``'s draws at ``beta``, weighted against their own proposal."""
        own = self.pool.own_draws(index, beta)
        return own.ess / len(own) if len(own) else math.nan

    def next_beta(self) -> tuple[float, bool]:
        """The temperature to train at, and whether this is the last round (the stopping rule holds)."""
        if self.one_shot:
            self.beta = 1.0
            return 1.0, True
        # keep β from falling while the draws at it are healthy; if the guide ran off (the draws at the
        # current β have collapsed), step back to the largest β they support, so training recovers
        floor = self.beta if self.pool.draws(self.beta).ess >= self.round_ess / 4 else 0.0
        beta = choose_beta(self.pool.draws(), self.round_ess, floor=floor)
        if self.source == "guide" and beta > self.beta:
            # the pooled draws cannot see mass where none of them is (a funnel's neck, which the
            # tempered posterior moves into as β rises); the last round's own draws, from a proposal
            # fitted at the current β, set how far β may step (the conditional ESS of SMC)
            own = self.pool.own_draws(len(self.pool.proposals) - 1, self.beta)
            cess = max(choose_beta(own, self.schedule.step_ess * own.ess, floor=self.beta), self.beta)
            beta = min(beta, cess)
        self.beta = beta
        if not self.auto or beta < 1.0:
            return beta, False
        return beta, self._can_stop()

    def _needed_ess(self, at_one: WeightedDraws) -> float:
        """Effective draws at β = 1 the stop needs: ``target_ess``, or more while a mixture weight's
        standard error exceeds ``Schedule.mode_weight_stderr`` (its variance falls as 1 / ESS)."""
        tol = self.mode_weight_tolerance
        if tol is None or self.guide.num_components == 1 or len(at_one) == 0:
            return self.schedule.target_ess
        if not self.trained_once:
            return math.inf  # no components placed yet, so no mode weights to judge: train first
        stderr = float(self.guide.mixture_weight_stderr(at_one).max())
        return max(self.schedule.target_ess, at_one.ess * (stderr / tol) ** 2)

    def train(self, model, args, kwargs, result, beta, lr, lr_decay, clip_norm, seed, r) -> int:
        """Place the components and train at ``beta``; returns the steps taken."""
        guide, loss = self.guide, self.loss
        draws = self.pool.draws(beta)
        mode_ess = min(modes.mode_ess(guide.latent_dim), self.schedule.target_ess)
        # the training at β = 1 starts afresh on the modes once the draws there can carry a fresh flow (a 20-D
        # flow restarted on 4,600 effective draws proposes at an efficiency of 0.08); until then it trains warm
        enough_at_one = beta == 1.0 and draws.ess >= mode_ess
        restart = self.tempered and enough_at_one
        restarted = modes.place_components(guide, self.pool, beta, seed=(seed or 0) + r, mode_ess=mode_ess,
                                           restart=restart, recount=not self.counted_at_one)
        self.counted_at_one = self.counted_at_one or enough_at_one
        self.tempered = beta < 1.0 or (self.tempered and not restart)
        warm = self.trained_once and not restarted
        tempered = beta < 1.0 and not self.one_shot
        held_out = None
        if warm or tempered:  # hold out a tenth of the draws: a warm round stops when its loss stops falling
            mask = torch.rand(len(draws)) < HELD_OUT
            held_out = draws.subset(mask)
            train_draws = draws.subset(~mask)
        else:
            train_draws = draws
        loss.set_draws(train_draws, model_args=(args, kwargs))
        steps = self.schedule.warm_steps if warm else self.schedule.num_steps
        status = f"β={beta:.3g} ESS={draws.ess:,.0f} training"
        self.bar.set_postfix_str(status)
        report = None if self.bar.disable else self._training_report(status, steps)
        taken = _train(loss, model, guide, args, kwargs, result, steps, lr, lr_decay, clip_norm,
                       held_out if warm else None, progress=False, report=report)
        guide.refit_mixture_weights(draws)
        self.trained_once = True
        self.next_proposal = self._tempered_proposal(train_draws, held_out, seed, r) if tempered else None
        return taken

    def _tempered_proposal(self, train_draws: WeightedDraws, held_out: WeightedDraws, seed, r) -> Blend:
        """What a tempered round draws from: the trained flow and a Student-t mixture fitted to the same
        draws, weighted by how well each fits the held-out draws, plus a share ``schedule.explore`` of
        a Student-t mixture fitted to the pooled draws at a higher temperature (where they keep
        ``AHEAD_ESS`` effective draws).

        The t mixture contracts to wherever the tempered posterior went, by any factor, in one round;
        the flow shapes it once it has the draws to. The look-ahead part draws where the posterior is
        going, which the pooled draws cannot see yet: a data-dominated posterior with an unknown noise
        scale narrows into a funnel's neck as β rises (small noise, coefficients near their fit), and
        without it no draw lands there until the weights collapse.
        """
        guide, device = self.guide, self.guide.component_loc.device
        seed = (seed or 0) + r
        moments = modes.moment_proposal(train_draws, seed=seed, device=device)
        blend = Blend.fitted([guide.frozen_posterior(), moments], held_out, device=device)
        share = self.schedule.explore
        if share <= 0:
            return blend
        pool = self.pool.draws()
        ahead = pool.with_beta(choose_beta(pool, AHEAD_ESS, floor=self.beta))
        ahead = modes.moment_proposal(ahead, seed=seed, device=device)
        weights = torch.cat([(1 - share) * blend.weights, torch.tensor([share], dtype=torch.float64)])
        return Blend([*blend.components, ahead], weights)

    def _training_report(self, status: str, steps: int) -> Callable[[int, float, float | None], None]:
        """What :func:`_train` calls every ``CHECK_EVERY`` steps: the step count and the loss on the bar."""
        def report(step: int, running: float, held_out: float | None) -> None:
            loss = f"loss {running:.4g}" if held_out is None else f"held-out {held_out:.4g}"
            self.bar.set_postfix_str(f"{status} step {step}/{steps} {loss}")
        return report

    def summary(self, r: int, beta: float, steps: int, seconds: float) -> RoundSummary:
        at_one = self.pool.draws(1.0)
        log_z, log_z_stderr = self.pool.log_evidence(1.0)
        ess = float(at_one.ess)
        gained = ess - self.summarized_ess
        calls_per_ess = (self.spent - self.summarized_calls) / gained if gained > 0 else math.inf
        total_calls_per_ess = self.spent / ess if ess > 0 else math.inf
        self.summarized_calls, self.summarized_ess = self.spent, ess
        summary = RoundSummary(
            round=r, beta=beta, num_draws=self.pool.proposals[-1].count, num_likelihood_evals=self.likelihood_evals,
            num_gradient_evals=self.gradient_evals, pool_size=len(self.pool), ess=at_one.ess,
            pareto_k=pareto_k(at_one), ess_at_beta=self.pool.draws(beta).ess, efficiency=self.last_round_efficiency,
            log_evidence=log_z, log_evidence_stderr=log_z_stderr,
            num_components=int(self.guide.mixture_logits.shape[0]), num_steps=steps, seconds=seconds,
            source=self.source, calls_per_ess=calls_per_ess, total_calls_per_ess=total_calls_per_ess,
        )
        self.bar.set_postfix_str(f"round {r} β={beta:.3g} ESS={summary.ess:,.0f} k̂={summary.pareto_k:.2f}")
        return summary

    def plan_next_round(self) -> bool:
        """Size the next round from the guide's efficiency; ``False`` when the budget is spent."""
        schedule = self.schedule
        efficiency = self.guide_efficiency if math.isfinite(self.guide_efficiency) else 0.8
        if self.efficiencies:  # a collapsed round says its proposal was wrong at that β, not that the next,
            # fitted on its draws at a β they support, will be: size it by the rounds so far
            usual = torch.tensor([e for e in self.efficiencies if math.isfinite(e)] or [0.8]).median()
            efficiency = max(efficiency, 0.5 * float(usual))
        efficiency = min(max(efficiency, 0.01), 1.0)
        if self.beta < 1.0:
            need = self.tempered_round_ess
        else:
            at_one = self.pool.draws(1.0)
            need = max(self._needed_ess(at_one) - at_one.ess, self.round_ess) * 1.1  # with the guide just trained
        smallest = min(schedule.first_round_draws(self.guide.latent_dim, from_optima=False) // 4, schedule.max_draws)
        num = int(min(max(need / (1 - schedule.defensive) / efficiency, smallest), schedule.max_draws))
        if not self.auto:
            self.next_draws = num
            return True
        left = schedule.budget - self.spent
        if left < smallest:
            return False
        self.next_draws = min(num, left)
        return True


def _warn_if_unfinished(result: FitResult, beta: float, schedule: Schedule) -> None:
    if beta < 1.0:
        warnings.warn(
            f"Stopped at likelihood temperature β = {beta:.3g} < 1 after {result.num_evals:,} model evaluations "
            f"(budget {schedule.budget:,}), so the guide fits a tempered posterior. Raise the budget "
            "(fit(..., schedule=Schedule(budget=...))), or start from gradient optima if the model allows it.",
            stacklevel=3,
        )
    elif schedule.num_rounds != 1 and result.rounds and result.rounds[-1].pareto_k > 0.7:
        warnings.warn(
            f"The importance weights are unreliable (Pareto k̂ = {result.rounds[-1].pareto_k:.2f} > 0.7): the "
            "evidence and reweighted draws may be off, and log_evidence_stderr is inf. Raise the budget "
            "(Schedule(budget=...)), train longer (Schedule(num_steps=..., warm_steps=...)), or use a larger flow "
            "(AutoLWFlow(num_transforms=..., hidden_dims=...)).",
            stacklevel=3,
        )


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


def _train(loss, model, guide, args, kwargs, result, num_steps, lr, lr_decay, clip_norm,
           held_out: WeightedDraws | None = None, progress: bool = False,
           report: Callable[[int, float, float | None], None] | None = None) -> int:
    """Up to ``num_steps`` of Adam on the loss, skipping any step whose loss or gradient is not
    finite; with ``held_out`` draws, stop once their weighted loss has not improved for two checks
    (every ``CHECK_EVERY`` steps). Returns the steps taken.

    ``report(steps, running_loss, held_out_loss)`` is called every ``CHECK_EVERY`` steps (for a
    progress display): the steps so far, the mean minibatch loss of the last ``CHECK_EVERY`` finite
    steps (``nan`` if none) and the held-out loss of this check (``None`` without held-out draws).
    It costs no model evaluation and touches no random stream.

    The parameters left behind are an exponential moving average of the iterates (Polyak–Ruppert
    averaging, horizon ~``1 / (1 − EMA_DECAY)`` steps): it cancels most of the minibatch noise the
    last steps leave in the flow.
    """
    params = _guide_params(loss, model, guide, args, kwargs)
    optim = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optim, lr_decay ** (1.0 / max(num_steps, 1)))
    average = [p.detach().clone() for p in params]
    best, stale, step = math.inf, 0, 0
    first_loss = len(result.losses)
    with tqdm(range(num_steps), disable=not progress, unit="step", leave=False) as bar:
        for step in bar:
            optim.zero_grad(set_to_none=True)
            value = loss.loss_and_grads(model, guide, *args, **kwargs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if not (math.isfinite(value) and torch.isfinite(grad_norm)):
                result.num_skipped_steps += 1  # never apply a non-finite step
                if report is not None and (step + 1) % CHECK_EVERY == 0:
                    report(step + 1, _running_loss(result.losses, first_loss), None)
                continue
            optim.step()
            schedule.step()
            with torch.no_grad():
                decay = min(EMA_DECAY, (1 + step) / (10 + step))  # a short memory at first
                torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - decay)
            result.losses.append(value)
            if (step + 1) % CHECK_EVERY == 0:
                current = None
                if held_out is not None:
                    current = _held_out_loss(guide, held_out)
                    best, stale = (current, 0) if current < best - 1e-3 else (best, stale + 1)
                if report is not None:
                    report(step + 1, _running_loss(result.losses, first_loss), current)
                if stale >= 2:
                    break
    with torch.no_grad():
        for p, a in zip(params, average, strict=True):
            p.copy_(a)
    return step + 1


def _running_loss(losses: list[float], first: int) -> float:
    """Mean of the last ``CHECK_EVERY`` losses recorded since index ``first`` (``nan`` if none)."""
    recent = losses[max(first, len(losses) - CHECK_EVERY):]
    return sum(recent) / len(recent) if recent else math.nan


@torch.no_grad()
def _held_out_loss(guide: AutoLWFlow, draws: WeightedDraws) -> float:
    """``−Σ w̄ᵢ log q(θᵢ)`` on held-out draws (nats)."""
    w = draws.weights
    keep = w > 0
    log_q = torch.cat([guide.latent_log_prob(c.to(guide.component_loc)).double().cpu()
                       for c in draws.latents[keep].split(50_000)])
    return float(-(w[keep] * torch.nan_to_num(log_q, nan=-1e30, neginf=-1e30)).sum())


def _guide_params(loss, model, guide, args, kwargs) -> list[torch.Tensor]:
    """The unconstrained parameters the loss touches (as :class:`pyro.infer.SVI` finds them)."""
    with poutine.trace(param_only=True) as capture:
        loss.loss(model, guide, *args, **kwargs)
    return [site["value"].unconstrained() for site in capture.trace.nodes.values()]
