"""Finding the posterior's modes in weighted draws and placing the guide's mixture components on them.

The whole policy lives here: EM for Gaussian mixtures, counting modes (BIC, then merging components
with no density dip between them), how many effective draws a count needs, and when a fit's rounds
place the components (:func:`place_components`). The guide only offers its coordinate maps and
:meth:`~pyro_lwflow.AutoLWFlow.initialize` / :meth:`~pyro_lwflow.AutoLWFlow.reset`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch

from .adaptive import DrawPool, choose_beta
from .draws import WeightedDraws

if TYPE_CHECKING:
    from .guide import AutoLWFlow

__all__ = [
    "GaussianMixtureFit",
    "count_modes",
    "find_modes",
    "fit_gaussian_mixture",
    "kmeans_plus_plus",
    "mode_ess",
    "moment_proposal",
    "place_components",
    "select_num_components",
]

MODE_ESS = 2_000  # effective draws the mode count is estimated from, at least (see place_components)
MODE_ESS_PER_PARAMETER = 50  # ... and at least this many per parameter of one full-covariance component


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


def _resampled_model_units(guide: AutoLWFlow, draws: WeightedDraws, num_points: int,
                           gen: torch.Generator) -> torch.Tensor:
    """``(M, D)`` draws resampled by weight (:func:`resample_points`), in the guide's model units, on the CPU."""
    return guide.model_units(resample_points(draws, num_points, gen).to(guide.component_loc)).cpu()


@torch.no_grad()
def count_modes(guide: AutoLWFlow, draws: WeightedDraws, num_points: int = 5_000, seed: int = 0) -> int:
    """Estimate the number of posterior modes in the weighted draws.

    EM with k-means++ restarts for ``K = 1 … guide.max_components`` on ``num_points`` draws resampled
    by weight, in the guide's model units; ``K`` by BIC, then components with no density dip
    between them merged. The candidates' BIC is kept in ``guide.component_scores``.
    """
    y = _resampled_model_units(guide, draws, num_points, torch.Generator().manual_seed(seed))
    fit, guide.component_scores = select_num_components(y, guide.max_components, torch.Generator().manual_seed(seed))
    return fit.num_components


@torch.no_grad()
def find_modes(
    guide: AutoLWFlow, draws: WeightedDraws, num_points: int = 5_000, seed: int = 0, num_components: int | None = None
) -> GaussianMixtureFit:
    """A Gaussian mixture on the weighted draws, one component per mode, in the guide's flow coordinates.

    Resamples ``num_points`` draws in proportion to their weights and fits a mixture by EM
    (k-means++ seeding) with ``num_components`` components: by default the guide's own, or
    :func:`count_modes`'s estimate when that is ``"auto"``.
    """
    if num_components is None:
        auto = guide.num_components == "auto"
        num_components = count_modes(guide, draws, num_points, seed) if auto else guide.num_components
    gen = torch.Generator().manual_seed(seed)
    # EM before standardising: a per-coordinate rescaling would shrink the axis the modes are
    # spread along to the spread of the others, and separated modes would be found less often
    y = _resampled_model_units(guide, draws, num_points, gen)
    fit = fit_gaussian_mixture(y, num_components, generator=gen)
    return fit.standardized(guide.standardize.loc.cpu(), guide.standardize.scale.cpu())


@torch.no_grad()
def moment_proposal(draws: WeightedDraws, max_components: int = 8, seed: int = 0, df: float = 5.0,
                    num_points: int = 5_000, device: torch.device | None = None) -> dist.MixtureSameFamily:
    """A mixture of multivariate Student-t's (``df``) over packed latents ``(D,)``: a full-covariance
    Gaussian mixture fitted by EM to the weighted draws (resampled by weight), its number of
    components by BIC up to ``max_components``, with heavier tails.

    A density estimate, not a mode count: a skewed or funnel-shaped posterior takes several
    components. It follows a tempered posterior wherever it goes, whatever its scale and
    correlations (a posterior 10⁻³ of the prior's width, in one round). Its parameters live on ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = resample_points(draws, num_points, gen)
    fits: dict[int, GaussianMixtureFit] = {}
    for k in range(1, max_components + 1):
        if x.shape[0] < 20 * k * x.shape[1]:  # too few points for k full covariances
            break
        fits[k] = fit_gaussian_mixture(x, k, generator=gen, num_restarts=1)  # a density, not a mode count
        if k >= min(fits, key=lambda j: fits[j].bic) + 2:  # BIC got worse twice in a row
            break
    fit = fits[min(fits, key=lambda j: fits[j].bic)] if fits else fit_gaussian_mixture(x, 1, generator=gen)
    eye = torch.eye(fit.means.shape[-1], dtype=fit.covariances.dtype)
    cov = fit.covariances + 1e-9 * fit.covariances.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
    return dist.MixtureSameFamily(
        dist.Categorical(probs=fit.weights.float().to(device)),
        dist.MultivariateStudentT(torch.tensor(df, device=device), fit.means.float().to(device),
                                  torch.linalg.cholesky(cov).float().to(device)),
    )


def mode_ess(dim: int) -> float:
    """Effective draws to count modes on in ``dim`` dimensions: enough that EM's full-covariance
    components (``dim (dim + 3) / 2`` parameters each) do not split one mode into several."""
    return max(MODE_ESS, MODE_ESS_PER_PARAMETER * dim * (dim + 3) / 2)


def place_components(guide: AutoLWFlow, pool: DrawPool, beta: float, seed: int, mode_ess: float,
                     restart: bool = False, recount: bool = True) -> bool:
    """Start the mixture on the modes of the pooled draws at temperature ``beta`` (a round of fit).

    With ``"auto"``, the modes are counted each round on the sharpest draws that still have
    ``mode_ess`` effective draws (tempering flattens modes: at β ≈ 0.3 a Student-t mixture's
    modes melt into one plateau), and the flow restarts when the count changes, or when the draws
    have left the guide's standardised coordinates, or when ``restart`` (a fit that tempered its way
    to β = 1 starts its final training afresh, its components on the posterior's modes, as a fit from
    gradient optima does: a flow warm-started through the tempered posteriors keeps their bridges).
    Draws with under half of ``mode_ess`` keep the count as it is, and so does ``recount=False`` (a
    count made at β = 1 on ``mode_ess`` effective draws: counting again on as informative a sample
    only adds BIC's noise, and a changed count restarts the flow). Returns whether the flow
    (re)started from the identity.
    """
    draws = pool.draws(beta)
    k = None
    if guide.num_components == "auto" and guide.initialized and not recount:
        k = int(guide.mixture_logits.shape[0])
    elif guide.num_components == "auto":
        sharp = pool.draws(choose_beta(pool.draws(1.0), mode_ess, floor=beta))
        if sharp.ess >= mode_ess / 2 or not guide.initialized:
            k = count_modes(guide, sharp, seed=seed)
    if not guide.initialized:
        guide.initialize(draws, seed=seed, num_components=k)
    elif restart or _moved(guide, draws, seed):
        guide.reset(draws, seed=seed, num_components=k, restandardize=True)
    elif k is not None and k != guide.mixture_logits.shape[0]:
        guide.reset(draws, seed=seed, num_components=k)
    else:
        return False
    return True


def _moved(guide: AutoLWFlow, draws: WeightedDraws, seed: int, factor: float = 4.0) -> bool:
    """Whether the draws' spread left the guide's standardised coordinates: some coordinate's
    spread changed ``factor``-fold, or its centre moved by more than ``factor`` spreads (a tempered
    posterior narrowing on its way to a data-dominated one)."""
    y = _resampled_model_units(guide, draws, 2_000, torch.Generator().manual_seed(seed)).double()
    loc, scale = guide.standardize.loc.cpu().double(), guide.standardize.scale.cpu().double()
    ratio = y.std(0) / scale
    shift = (y.mean(0) - loc).abs() / scale
    return bool((ratio > factor).any() or (ratio < 1 / factor).any() or (shift > factor).any())
