"""The weighted-draws structure: one home for latents, likelihoods and importance weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["WeightedDraws"]

MIN_EVIDENCE_ESS = 10.0  # below this ESS the evidence has no error bar (log_evidence_stderr is inf)


@dataclass
class WeightedDraws:
    """Draws θᵢ in the guide's packed unconstrained space with their log densities.

    The importance weight of draw i under likelihood temperature β is

        log wᵢ = β · log_likelihoodᵢ + log_priorᵢ − log_proposalᵢ,

    so prior draws (``log_proposal == log_prior``) are weighted by their likelihood alone.
    Every density is taken in the unconstrained space (Jacobians included), so the ratio
    is the same as in the constrained space.

    :param latents: ``(N, D)`` float32 packed unconstrained latents.
    :param log_likelihood: ``(N,)`` float64, summed log-prob of every observed site.
    :param log_prior: ``(N,)`` float64 log prior density of the unconstrained latents.
    :param log_proposal: ``(N,)`` float64 log density of the distribution the draws came from.
    :param source: ``(N,)`` int64 provenance: the round (0 = prior) each draw came from.
    :param beta: likelihood temperature in ``[0, 1]``; ``1`` is the posterior.
    """

    latents: torch.Tensor
    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_proposal: torch.Tensor
    source: torch.Tensor = field(default=None)  # type: ignore[assignment]
    beta: float = 1.0

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if self.source is None:
            self.source = torch.zeros(n, dtype=torch.long)
        for name in ("log_likelihood", "log_prior", "log_proposal", "source"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"WeightedDraws.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected ({n},) to match latents of shape {tuple(self.latents.shape)}"
                )

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def dim(self) -> int:
        return self.latents.shape[1]

    @property
    def log_weights(self) -> torch.Tensor:
        """``(N,)`` float64 unnormalised log importance weights at temperature ``beta``; draws with
        zero likelihood get weight zero at every β, including β = 0."""
        # a zero likelihood stays zero at every temperature, β = 0 included (the limit β → 0⁺):
        # 0 · (−inf) must never reach a weight
        tempered = torch.where(torch.isneginf(self.log_likelihood), -math.inf, self.beta * self.log_likelihood)
        return tempered + self.log_prior - self.log_proposal

    @property
    def weights(self) -> torch.Tensor:
        """``(N,)`` float64 self-normalised weights, summing to one."""
        return torch.softmax(self.log_weights, dim=0)

    @property
    def ess(self) -> float:
        """Kish effective sample size ``1 / Σ w̄ᵢ²`` of the self-normalised weights."""
        w = self.weights
        return float(1.0 / (w * w).sum())

    @property
    def log_evidence(self) -> float:
        """Importance-sampling estimate of ``log Z_β = log E_proposal[w]``."""
        return float(torch.logsumexp(self.log_weights, 0) - math.log(len(self)))

    @property
    def log_evidence_stderr(self) -> float:
        """Standard error of :attr:`log_evidence`: the delta method (``sqrt(var(w) / N) / mean(w)``)
        where the weights support it, and not a small number where they do not.

        With Pareto k̂ > 0.7 or an ESS below 10 the weights' tail decides the estimate and no error
        bar can be read off them: ``inf``. With 0.5 < k̂ ≤ 0.7 the weights' variance is infinite and
        the delta method is too small; the gap between the raw and the Pareto-smoothed estimate is
        added to it (nats).
        """
        from .diagnostics import psis_log_weights  # diagnostics imports this module

        lw = self.log_weights
        w = torch.exp(lw - lw.max())
        stderr = float(w.std() / (w.mean() * math.sqrt(len(self))))
        if self.ess < MIN_EVIDENCE_ESS:
            return math.inf
        smoothed, k = psis_log_weights(lw)
        if k > 0.7:
            return math.inf
        if k > 0.5:
            # smoothing changes only the tail, then normalises: a body draw (the lightest) gives the offset
            finite = torch.isfinite(lw)
            j = torch.nonzero(finite)[lw[finite].argmin()]
            log_z_psis = float(lw[j] - smoothed[j]) - math.log(len(self))
            stderr += abs(self.log_evidence - log_z_psis)
        return stderr

    def with_beta(self, beta: float) -> WeightedDraws:
        """The same draws weighted at likelihood temperature ``beta``."""
        return WeightedDraws(
            self.latents, self.log_likelihood, self.log_prior, self.log_proposal, self.source, beta
        )

    def resample_indices(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(num,)`` indices drawn with replacement in proportion to the weights."""
        cdf = torch.cumsum(self.weights, 0)
        u = torch.rand(num, dtype=cdf.dtype, generator=generator) * cdf[-1]
        return torch.searchsorted(cdf, u).clamp_(max=len(self) - 1)

    def subset(self, keep: torch.Tensor) -> WeightedDraws:
        """The draws selected by a boolean mask or index tensor."""
        return WeightedDraws(
            self.latents[keep],
            self.log_likelihood[keep],
            self.log_prior[keep],
            self.log_proposal[keep],
            self.source[keep],
            self.beta,
        )

    @staticmethod
    def concat(parts: list[WeightedDraws]) -> WeightedDraws:
        """Stack draws from several calls (all at the temperature of the first)."""
        if not parts:
            raise ValueError("WeightedDraws.concat needs at least one set of draws")
        return WeightedDraws(
            torch.cat([p.latents for p in parts]),
            torch.cat([p.log_likelihood for p in parts]),
            torch.cat([p.log_prior for p in parts]),
            torch.cat([p.log_proposal for p in parts]),
            torch.cat([p.source for p in parts]),
            parts[0].beta,
        )
