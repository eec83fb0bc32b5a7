"""Finding the posterior's modes in weighted draws and placing mixture components on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .draws import WeightedDraws

__all__ = ["GaussianMixtureFit", "fit_gaussian_mixture", "kmeans_plus_plus", "select_num_components"]


@dataclass
class GaussianMixtureFit:
    """A full-covariance Gaussian mixture fitted by EM.

    :param weights: ``(K,)`` mixture weights.
    :param means: ``(K, D)`` component means.
    :param covariances: ``(K, D, D)`` component covariances.
    :param log_likelihood: total log-likelihood of the points it was fitted to.
    :param bic: Bayesian information criterion (lower is better).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    log_likelihood: float
    bic: float

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    def standardized(self, loc: torch.Tensor, scale: torch.Tensor) -> GaussianMixtureFit:
        """The same mixture in the coordinates ``(x − loc) / scale`` (``loc``, ``scale``: ``(D,)``)."""
        return replace(self, means=(self.means - loc) / scale,
                       covariances=self.covariances / (scale[:, None] * scale[None, :]))


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``(M, D)`` points → ``(k, D)`` centres."""
    first = torch.randint(x.shape[0], (1,), generator=generator)
    centres = [x[first[0]]]
    d2 = ((x - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        nxt = torch.multinomial(probs, 1, generator=generator)[0]
        centres.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    return torch.stack(centres)


def _component_log_probs(x, weights, means, covariances):
    mvn = torch.distributions.MultivariateNormal(means, covariance_matrix=covariances, validate_args=False)
    return mvn.log_prob(x[:, None, :]) + weights.log()  # (M, K)


def fit_gaussian_mixture(
    x: torch.Tensor,
    k: int,
    num_iters: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    num_restarts: int = 3,
) -> GaussianMixtureFit:
    """EM for a ``k``-component full-covariance Gaussian mixture, the best of ``num_restarts``
    k-means++ seedings (one seeding can merge two modes and split a third).

    :param x: ``(M, D)`` points (draws resampled by weight).
    """
    restarts = [_em(x, k, num_iters, tol, generator) for _ in range(num_restarts if k > 1 else 1)]
    return max(restarts, key=lambda f: f.log_likelihood)


def _em(x: torch.Tensor, k: int, num_iters: int, tol: float, generator: torch.Generator | None) -> GaussianMixtureFit:
    x = x.double()
    m, d = x.shape
    reg = 1e-6 * x.var(0).mean().clamp_min(1e-12) * torch.eye(d, dtype=x.dtype)
    means = kmeans_plus_plus(x, k, generator)
    # a few Lloyd steps give EM a sensible start
    for _ in range(10):
        assign = torch.cdist(x, means).argmin(-1)
        means = torch.stack([x[assign == j].mean(0) if (assign == j).any() else means[j] for j in range(k)])
    resp = torch.nn.functional.one_hot(torch.cdist(x, means).argmin(-1), k).double()
    previous = -math.inf
    for _ in range(num_iters):
        nk = resp.sum(0) + 1e-10
        weights = nk / m
        means = (resp.T @ x) / nk[:, None]
        diff = x[:, None, :] - means  # (M, K, D)
        covariances = torch.einsum("mk,mki,mkj->kij", resp, diff, diff) / nk[:, None, None] + reg
        log_joint = _component_log_probs(x, weights, means, covariances)
        total = torch.logsumexp(log_joint, -1)
        resp = torch.exp(log_joint - total[:, None])
        current = float(total.sum())
        if abs(current - previous) <= tol * abs(current):
            break
        previous = current
    num_params = (k - 1) + k * d + k * d * (d + 1) / 2
    bic = -2 * current + num_params * math.log(m)
    return GaussianMixtureFit(weights, means, covariances, current, bic)


def select_num_components(
    x: torch.Tensor,
    max_components: int = 8,
    generator: torch.Generator | None = None,
    dip: float = 0.8,
) -> tuple[GaussianMixtureFit, dict[int, float]]:
    """Estimate the number of modes: BIC over ``k = 1 … max_components``, then merge.

    The scan stops early once BIC has worsened for two ``k`` in a row past its best.

    BIC counts Gaussian components, not modes: a skewed or heavy-tailed mode takes several.
    Two components are merged when the fitted density has no dip between their means (its
    minimum on the segment stays above ``dip`` × the smaller end value), and EM is rerun with
    the merged count, until every pair is separated by a dip.

    :returns: the final fit and ``{k: bic}`` for every candidate tried.
    """
    fits: dict[int, GaussianMixtureFit] = {}
    for k in range(1, max_components + 1):
        fits[k] = fit_gaussian_mixture(x, k, generator=generator)
        best_k = min(fits, key=lambda j: fits[j].bic)
        if k >= best_k + 2:  # BIC got worse twice in a row: larger k will not win
            break
    scores = {k: f.bic for k, f in fits.items()}
    best = fits[min(scores, key=scores.get)]
    while best.num_components > 1:
        merged = _count_separated_modes(best, dip)
        if merged == best.num_components:
            break
        best = fits[merged]
    return best, scores


def _count_separated_modes(fit: GaussianMixtureFit, dip: float) -> int:
    """Number of groups of components left after joining every pair with no density dip."""
    k = fit.num_components
    t = torch.linspace(0, 1, 41, dtype=fit.means.dtype)[:, None]
    group = list(range(k))

    def root(i):
        while group[i] != i:
            i = group[i]
        return i

    for i in range(k):
        for j in range(i + 1, k):
            segment = fit.means[i] + t * (fit.means[j] - fit.means[i])  # (41, D)
            density = torch.logsumexp(_component_log_probs(segment, fit.weights, fit.means, fit.covariances), -1)
            ends = torch.minimum(density[0], density[-1])
            if density.min() >= ends + torch.log(torch.tensor(dip, dtype=density.dtype)):
                group[root(i)] = root(j)
    return len({root(i) for i in range(k)})


def resample_points(draws: WeightedDraws, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(M, D)`` float64 latents drawn in proportion to their weights.

    ``M = min(num, ESS)``: more resampled points than the draws' effective sample size would
    only repeat draws and make model selection overconfident.
    """
    num = max(min(num, int(draws.ess)), 2)
    return draws.latents[draws.resample_indices(num, generator)].double()
