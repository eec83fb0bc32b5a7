"""Weight checks and importance-sampling diagnostics: ESS, Pareto k̂, evidence."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import torch

from .draws import WeightedDraws

__all__ = ["check_weights", "pareto_k", "psis_log_weights"]


def check_weights(draws: WeightedDraws, min_ess: float = 100.0) -> WeightedDraws:
    """Drop draws whose log-likelihood is NaN or +inf, and check the rest can be trusted.

    :raises ValueError: if no draw is left, or the likelihood is zero (−inf) for every draw.
    :warns: with the count of dropped draws, and when the ESS is below ``min_ess``.
    """
    ll = draws.log_likelihood
    bad = torch.isnan(ll) | (ll == float("inf")) | torch.isnan(draws.log_prior) | torch.isnan(draws.log_proposal)
    if bad.all():
        raise ValueError(
            f"The log-likelihood is NaN or +inf for all {len(draws)} draws; check the model's "
            "observed sites and pyro.factor terms for values outside their support."
        )
    if bad.any():
        warnings.warn(
            f"Dropped {int(bad.sum())} of {len(draws)} draws whose log-likelihood is NaN or +inf.",
            stacklevel=3,
        )
        draws = draws.subset(~bad)
    if torch.isneginf(draws.log_weights).all():
        raise ValueError(
            f"The likelihood is zero (log-likelihood −inf) for all {len(draws)} draws, so there is "
            "nothing to learn from. Check that the data are inside the likelihood's support and that "
            "the prior covers the parameter values that could have produced them."
        )
    ess = draws.ess
    if ess < min_ess:
        warnings.warn(
            f"The weighted draws have an effective sample size of only {ess:.1f} (of {len(draws)}), "
            "too few to trust the fit. Use more draws (num_prior_samples of LikelihoodWeightedKL, initial_draws of "
            "Schedule), a prior closer "
            "to the posterior, or adaptive rounds (Schedule(num_rounds='auto')).",
            stacklevel=3,
        )
    return draws


def psis_log_weights(log_weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pareto-smoothed normalised log weights and the Pareto shape k̂ (ArviZ ``psislw``).

    :param log_weights: ``(N,)`` unnormalised log importance weights.
    :returns: ``((N,) normalised smoothed log weights, k̂)``; k̂ > 0.7 means the estimates are
        unreliable.
    """
    lw = log_weights.detach().double().cpu().numpy()
    finite = np.isfinite(lw)
    out = np.full_like(lw, -np.inf)
    with warnings.catch_warnings(), np.errstate(over="ignore", under="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow inside psislw is harmless
        smoothed, k = az.psislw(lw[finite].copy())
    out[finite] = smoothed
    return torch.from_numpy(out), float(np.asarray(k))


def pareto_k(draws: WeightedDraws) -> float:
    """Pareto shape k̂ of the draws' importance weights (< 0.5 good, > 0.7 unreliable)."""
    return psis_log_weights(draws.log_weights)[1]
