"""Calibration of an amortized posterior on held-out simulations: SBC ranks and expected coverage.

For simulations ``(θ*ₛ, xₛ)`` from the prior predictive and ``L`` draws of ``q(θ | xₛ)`` each:

- **simulation-based calibration** (Talts et al. 2018, https://arxiv.org/abs/1804.06788): the rank
  of θ*ₛ among the draws, per coordinate, is uniform on ``0..L`` for every coordinate when ``q`` is
  the posterior; a ∪-shaped histogram means ``q`` is too narrow, a ∩-shape too wide, a slope biased.
- **expected coverage** (highest-density regions, as in sbi's ``run_tarp``/coverage checks and
  Hermans et al. 2022): θ*ₛ lies in ``q``'s level-``α`` highest-density region for a share ``α`` of
  the simulations; a curve below the diagonal means over-confident.

:func:`sbc_ranks` and :func:`coverage_curve` take plain arrays, so they serve any amortized method
(sbi's too); :func:`calibrate` runs both on an :class:`~pyro_lwflow.amortized.AmortizedLWFlow`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats

from .fit import _seeded

__all__ = ["Calibration", "calibrate", "coverage_curve", "sbc_ranks"]


def sbc_ranks(true: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``(S, D)`` ranks in ``0..L``: how many of the ``L`` draws ``(L, S, D)`` fall below each true value ``(S, D)``."""
    return (draws < true.unsqueeze(0)).sum(0)


def coverage_curve(log_q_true: torch.Tensor, log_q_draws: torch.Tensor,
                   levels: torch.Tensor) -> torch.Tensor:
    """Empirical coverage of the highest-density regions at ``levels`` ``(K,)``.

    :param log_q_true: ``(S,)`` ``log q(θ*ₛ | xₛ)``.
    :param log_q_draws: ``(L, S)`` ``log q`` at the draws of each ``q(· | xₛ)``.
    :returns: ``(K,)``: the share of simulations whose θ* lies inside the level-``α`` region, i.e.
        whose density is exceeded by at most a share ``α`` of the draws.
    """
    outside = (log_q_draws > log_q_true.unsqueeze(0)).double().mean(0)  # (S,) share of draws denser than θ*
    return (outside.unsqueeze(0) < levels.double().unsqueeze(1)).double().mean(1)


@dataclass
class Calibration:
    """SBC ranks and expected coverage on ``S`` held-out simulations.

    :param ranks: ``(S, D)`` SBC ranks in ``0..num_draws``, per packed latent coordinate.
    :param num_draws: draws per simulation ``L``.
    :param levels: ``(K,)`` credible levels; :param coverage: ``(K,)`` empirical coverage at them.
    :param names: a label per coordinate (``site[i]``).
    """

    ranks: torch.Tensor
    num_draws: int
    levels: torch.Tensor
    coverage: torch.Tensor
    names: list[str] = field(default_factory=list)

    def p_values(self, bins: int = 10) -> np.ndarray:
        """``(D,)`` χ² test p-values of rank uniformity, one per coordinate (``bins`` equal bins)."""
        edges = np.linspace(0, self.num_draws + 1, bins + 1)
        out = []
        for column in self.ranks.T.cpu().numpy():
            counts, _ = np.histogram(column, bins=edges)
            out.append(stats.chisquare(counts).pvalue)
        return np.asarray(out)

    @property
    def max_coverage_error(self) -> float:
        """Largest ``|coverage(α) − α|`` over the levels."""
        return float((self.coverage - self.levels.double()).abs().max())

    def plot(self, bins: int = 20) -> Figure:
        """Rank histograms (with the 99 % band of a uniform histogram) and the coverage curve."""
        d = self.ranks.shape[1]
        cols = min(d, 4) + 1
        rows = -(-d // (cols - 1))
        fig = Figure(figsize=(3.0 * cols, 2.6 * rows), layout="constrained")
        s = self.ranks.shape[0]
        low, high = stats.binom.ppf([0.005, 0.995], s, 1.0 / bins)
        for i in range(d):
            ax = fig.add_subplot(rows, cols, (i // (cols - 1)) * cols + i % (cols - 1) + 1)
            ax.axhspan(low, high, color="0.85", zorder=0)
            ax.hist(self.ranks[:, i].cpu().numpy(), bins=np.linspace(0, self.num_draws + 1, bins + 1), color="C0")
            ax.set_title(self.names[i] if self.names else f"coordinate {i}", fontsize=9)
            ax.set_yticks([])
        ax = fig.add_subplot(1, cols, cols)
        ax.plot([0, 1], [0, 1], color="0.5", ls="--")
        ax.plot(self.levels.numpy(), self.coverage.numpy(), color="C1")
        ax.set_xlabel("credible level")
        ax.set_ylabel("empirical coverage")
        ax.set_title("expected coverage", fontsize=9)
        return fig


@torch.no_grad()
def calibrate(amortized, num_simulations: int = 500, num_draws: int = 99, num_levels: int = 21,
              seed: int | None = 0) -> Calibration:
    """SBC ranks and expected coverage of an :class:`~pyro_lwflow.amortized.AmortizedLWFlow` on
    ``num_simulations`` fresh prior-predictive simulations, ``num_draws`` draws each.

    Ranks are taken per coordinate of the packed unconstrained latents (monotone maps of each
    constrained scalar site, so the same ranks); coverage uses ``q``'s own density.
    """
    with _seeded(seed):
        true, data = amortized.simulate(num_simulations)
        q = amortized.latent_dist(data)
        draws = q.sample((num_draws,))  # (L, S, D)
        log_q_draws = q.log_prob(draws)
        log_q_true = q.log_prob(true)
    levels = torch.linspace(0, 1, num_levels)
    names = [f"{site.name}[{i}]" if site.size > 1 else site.name for site in amortized.layout for i in range(site.size)]
    return Calibration(sbc_ranks(true, draws), num_draws, levels, coverage_curve(log_q_true, log_q_draws, levels),
                       names)
