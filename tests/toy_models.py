"""Small Pyro models shared by the tests."""

import pyro
import pyro.distributions as dist
import torch

PRIOR_SCALE = 2.0


def conjugate_normal(y):
    """theta ~ N(0, 2² I₂), y_i ~ N(theta, I₂): posterior N(m, s² I) in closed form."""
    theta = pyro.sample("theta", dist.Normal(0.0, PRIOR_SCALE).expand([2]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)


def conjugate_posterior(y):
    """(mean (2,), variance) of the exact posterior of :func:`conjugate_normal`."""
    precision = 1.0 / PRIOR_SCALE**2 + y.shape[0]
    return y.sum(0) / precision, 1.0 / precision


def scale_model(y):
    """A constrained latent (positive scale) and an unconstrained one, with a data plate."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(loc, scale), obs=y)


def factor_model(target):
    """Uniform box prior and the likelihood as a pyro.factor."""
    theta = pyro.sample("theta", dist.Uniform(-5.0, 5.0).expand([2]).to_event(1))
    pyro.factor("loglik", dist.Normal(target, 1.0).to_event(1).log_prob(theta))


def example_y(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([0.7, -1.2]) + torch.randn(n, 2, generator=gen)


def numpy_factor_model(target):
    """A black-box NumPy log-likelihood (one float per draw): traced draw by draw, not vectorised.

    Module level, so a process pool can pickle it by reference.
    """
    import numpy as np

    theta = pyro.sample("theta", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    value = -0.5 * float(np.sum((theta.detach().numpy() - np.asarray(target)) ** 2))
    pyro.factor("loglik", torch.tensor(value))


def skewed_model():
    """Uniform(-10, 10)² box prior; a Gumbel(-2, 1.5) likelihood on θ₁ and a Laplace(2, 1) one on
    θ₂ (as pyro.factor), so the posterior is that product, truncated (mass < 1e-4) to the box."""
    theta = pyro.sample("theta", dist.Uniform(-10.0, 10.0).expand([2]).to_event(1))
    pyro.factor("gumbel", dist.Gumbel(-2.0, 1.5).log_prob(theta[..., 0]))
    pyro.factor("laplace", dist.Laplace(2.0, 1.0).log_prob(theta[..., 1]))


def skewed_posterior_sample(n, seed=1):
    """``(n, 2)`` exact draws of :func:`skewed_model`'s posterior (by inversion, truncated by rejection)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(2 * n, 2, generator=gen)
    gumbel = -2.0 - 1.5 * torch.log(-torch.log(u[:, 0]))
    laplace = 2.0 - torch.sign(u[:, 1] - 0.5) * torch.log1p(-2 * (u[:, 1] - 0.5).abs())
    theta = torch.stack([gumbel, laplace], -1)
    return theta[(theta.abs() < 10.0).all(-1)][:n]
