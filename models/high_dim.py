"""Higher-dimensional benchmark targets (our own, seeded): separated Gaussian mixtures in
d = 5, 10 and 20 with unequal weights and correlated covariances, and a curved "banana".

Like ``paper_targets.py``: a Uniform(-12, 12)^d prior on ``theta`` and the target density as the
log-likelihood via ``pyro.factor``, so the posterior is the target truncated to the box; each model
carries ``.truth`` (exact sampler, log density, mode components, evidence).

How the mixtures are made (``_mixture(dim, num_modes, seed)``): means uniform in [-7, 7]^d, redrawn
until every pair is at least 8 apart; weights ∝ 1, 2, …, K (unequal); covariance
``Q diag(s) Qᵀ`` with ``Q`` a random rotation and ``s`` uniform in [0.3, 1.2], so every mode is
correlated with standard deviations between 0.55 and 1.1.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyro_lwflow.truth import BoxTruth

LOW, HIGH = -12.0, 12.0


def _mixture(name: str, dim: int, num_modes: int, seed: int) -> BoxTruth:
    gen = torch.Generator().manual_seed(seed)
    while True:
        means = torch.rand(num_modes, dim, generator=gen) * 14 - 7
        gaps = torch.cdist(means, means) + torch.eye(num_modes) * 1e9
        if gaps.min() >= 8.0:
            break
    weights = torch.arange(1, num_modes + 1, dtype=torch.float32)
    weights = weights / weights.sum()
    covs = []
    for _ in range(num_modes):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        s = torch.rand(dim, generator=gen) * 0.9 + 0.3
        covs.append(q @ torch.diag(s) @ q.T)
    comps = dist.MultivariateNormal(means, torch.stack(covs))
    density = dist.MixtureSameFamily(dist.Categorical(weights), comps)
    return BoxTruth(name, density, lambda th: comps.log_prob(th.unsqueeze(-2)) + weights.log(), weights, LOW, HIGH)


class _Banana(dist.TorchDistribution):
    """A Gaussian ``N(0, diag(scales²))`` with coordinate 2 bent: ``θ₂ = x₂ + b (x₁² − s₁²)``.

    The map has unit Jacobian, so the density is the Gaussian's at the un-bent point.
    """

    arg_constraints: dict = {}

    def __init__(self, scales: torch.Tensor, bend: float):
        self.base = dist.Normal(torch.zeros_like(scales), scales).to_event(1)
        self.scales, self.bend = scales, bend
        super().__init__(torch.Size(), scales.shape)

    def _unbend(self, theta):
        x = theta.clone()
        x[..., 1] = theta[..., 1] - self.bend * (theta[..., 0] ** 2 - self.scales[0] ** 2)
        return x

    def sample(self, sample_shape=()):
        x = self.base.sample(sample_shape)
        x[..., 1] = x[..., 1] + self.bend * (x[..., 0] ** 2 - self.scales[0] ** 2)
        return x

    def log_prob(self, value):
        return self.base.log_prob(self._unbend(value))


def _banana(name: str, dim: int) -> BoxTruth:
    scales = torch.full((dim,), 1.0)
    scales[0] = 2.5
    density = _Banana(scales, bend=0.3)
    return BoxTruth(name, density, lambda th: density.log_prob(th).unsqueeze(-1), [1.0], LOW, HIGH)


def _make_model(truth: BoxTruth):
    def model():
        theta = pyro.sample("theta", dist.Uniform(LOW, HIGH).expand([truth.dim]).to_event(1))
        pyro.factor("likelihood", truth.likelihood(theta))

    model.__name__ = model.__qualname__ = truth.name
    model.__doc__ = f"`{truth.name}`: Uniform({LOW}, {HIGH})^{truth.dim} prior, target density as likelihood."
    model.truth = truth
    return model


gmm_5d = _make_model(_mixture("gmm_5d", 5, 4, seed=5))
gmm_10d = _make_model(_mixture("gmm_10d", 10, 3, seed=10))
gmm_20d = _make_model(_mixture("gmm_20d", 20, 2, seed=20))
banana_5d = _make_model(_banana("banana_5d", 5))

MODELS = {m.__name__: m for m in (gmm_5d, gmm_10d, gmm_20d, banana_5d)}
