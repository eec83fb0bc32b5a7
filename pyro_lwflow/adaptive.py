"""Adaptive importance rounds: pooled draws from several proposals, and likelihood tempering.

Draws from every round are kept and weighted against the mixture of all proposals used so far
(the "deterministic mixture" or balance-heuristic weights of Veach & Guibas 1995 / Owen & Zhou
2000), so no likelihood evaluation is wasted and the weights stay unbiased:

    log wᵢ = β log Lᵢ + log p(θᵢ) − log Σ_r (n_r / N) q_r(θᵢ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.distributions import Distribution

from .draws import WeightedDraws

__all__ = ["DrawPool", "Proposal", "choose_beta"]


@dataclass
class Proposal:
    """One round's proposal: ``(1 − α) q_flow + α prior`` (``flow=None``: the prior alone).

    :param flow: a frozen guide distribution over packed latents, or ``None``.
    :param defensive: the prior's share ``α`` (keeps weights bounded where the flow is thin).
    :param count: draws taken from it.
    :param device: where ``flow`` evaluates.
    """

    flow: Distribution | None
    defensive: float
    count: int
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def log_prob(self, latents: torch.Tensor, log_prior: torch.Tensor, chunk: int = 200_000) -> torch.Tensor:
        """``(N,)`` float64 log density at packed latents whose prior log density is ``log_prior``."""
        if self.flow is None:
            return log_prior
        # the flow lives on the guide's device; draws stay on the CPU
        log_flow = torch.cat([self.flow.log_prob(c.to(self.device)).double().cpu() for c in latents.split(chunk)])
        log_flow = torch.nan_to_num(log_flow, nan=-math.inf)
        if self.defensive <= 0:
            return log_flow
        return torch.logaddexp(log_flow + math.log1p(-self.defensive), log_prior + math.log(self.defensive))


class DrawPool:
    """All likelihood-evaluated draws so far, with each proposal's density at each of them."""

    def __init__(self, first: WeightedDraws, proposal: Proposal | None = None) -> None:
        """Start from ``first``, drawn from ``proposal`` (default: the prior, so ``first`` are prior
        draws); ``first.log_proposal`` is that proposal's density at them."""
        self.latents = first.latents
        self.log_likelihood = first.log_likelihood
        self.log_prior = first.log_prior
        self.source = first.source
        self.proposals = [proposal or Proposal(None, 1.0, len(first))]
        self.log_q = first.log_proposal[:, None].clone()  # (N, R)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def add(self, proposal: Proposal, latents: torch.Tensor, log_likelihood: torch.Tensor, log_prior: torch.Tensor):
        """Pool a new round's draws, evaluating every proposal where it has not been yet."""
        new_cols = proposal.log_prob(self.latents, self.log_prior)  # new proposal at old draws
        new_rows = torch.stack([p.log_prob(latents, log_prior) for p in [*self.proposals, proposal]], -1)
        self.log_q = torch.cat([torch.cat([self.log_q, new_cols[:, None]], -1), new_rows])
        self.latents = torch.cat([self.latents, latents])
        self.log_likelihood = torch.cat([self.log_likelihood, log_likelihood])
        self.log_prior = torch.cat([self.log_prior, log_prior])
        self.source = torch.cat([self.source, torch.full((len(latents),), len(self.proposals), dtype=torch.long)])
        self.proposals.append(proposal)

    def own_draws(self, index: int, beta: float = 1.0) -> WeightedDraws:
        """Proposal ``index``'s own draws, weighted against it alone (how well it did)."""
        keep = self.source == index
        return WeightedDraws(self.latents[keep], self.log_likelihood[keep], self.log_prior[keep],
                             self.log_q[keep, index], self.source[keep], beta)

    def log_evidence(self, beta: float = 1.0) -> tuple[float, float]:
        """``(log Ẑ, stderr)`` at ``beta``: each round's own estimate against its own proposal,
        combined with inverse-variance weights.

        Not the pooled weights' estimate: a proposal trained on earlier draws is denser at exactly
        those draws than elsewhere, so pooled weights undervalue them and bias ``log Ẑ`` low
        (measured: −0.036 nats, 14 standard errors, on a tight 7-D regression). Each round's own
        estimate is unbiased given the rounds before it. Rounds whose own stderr is ``inf``
        (degenerate weights) get no weight; if every round's is, the stderr is ``inf``.
        """
        estimates = [self.own_draws(i, beta) for i in range(len(self.proposals))]
        rows = [(d.log_evidence, d.log_evidence_stderr) for d in estimates if len(d)]
        usable = [(z, se) for z, se in rows if math.isfinite(se) and math.isfinite(z)]
        if not usable:
            pooled = self.draws(beta)
            return pooled.log_evidence, math.inf
        log_z = torch.tensor([z for z, _ in usable], dtype=torch.float64)
        precision = torch.tensor([1.0 / max(se, 1e-12) ** 2 for _, se in usable], dtype=torch.float64)
        weights = precision / precision.sum()
        return float(torch.logsumexp(log_z + weights.log(), 0)), float(precision.sum().rsqrt())

    def draws(self, beta: float = 1.0) -> WeightedDraws:
        """The pooled draws, weighted at likelihood temperature ``beta`` against the proposal mixture."""
        counts = torch.tensor([p.count for p in self.proposals], dtype=torch.float64)
        log_mix = torch.logsumexp(self.log_q + (counts / counts.sum()).log(), -1)
        return WeightedDraws(self.latents, self.log_likelihood, self.log_prior, log_mix, self.source, beta)


def choose_beta(draws: WeightedDraws, target_ess: float, floor: float = 0.0, iters: int = 40) -> float:
    """The largest temperature ``β ∈ [floor, 1]`` whose weights keep an ESS of ``target_ess``.

    For draws from the prior ESS falls as β rises (the tempered posterior narrows), so bisection
    finds it. If no β keeps the target (draws from a proposal near the posterior, too few of them),
    the β of the largest ESS on a grid is returned.
    """
    if draws.with_beta(1.0).ess >= target_ess:
        return 1.0
    lo, hi = floor, 1.0
    if draws.with_beta(lo).ess < target_ess:
        grid = torch.linspace(floor, 1.0, 21).tolist()
        return max(grid, key=lambda b: draws.with_beta(b).ess)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if draws.with_beta(mid).ess >= target_ess else (lo, mid)
    return lo
