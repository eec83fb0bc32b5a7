"""Real-shaped models: regressions, a time series and a hierarchical model, with synthetic data.

These are the shapes a user brings, not mixtures: data-dominated posteriors far narrower than
their priors, positive scales, a latent inside a plate. Each model function carries
``.example_data()``, which returns its positional arguments as a tuple (a fixed seed).

=============================  =================================================================
model                          what it is
=============================  =================================================================
``linear_regression``          6 coefficients ~ Normal(0, 10), ``sigma ~ HalfNormal(1)``, 100
                               points with noise 0.1: posterior sds ~10⁻³ of the prior's
``logistic_regression``        intercept and 4 coefficients ~ Normal(0, 5), 200 Bernoulli points
``ar_model``                   AR(5): ``y_t = c + Σ φ_k y_{t−k} + σ ε_t``, ``c ~ Normal(0, 10)``,
                               ``φ ~ Normal(0, 1)``, ``σ ~ HalfCauchy(1)``, 200 points
``eight_schools_centered``     Rubin's eight schools, ``theta_j ~ Normal(mu, tau)`` (a funnel)
``eight_schools_noncentered``  the same with ``theta_j = mu + tau · eta_j``
=============================  =================================================================

Use::

    from pyro_lwflow import models, fit
    model = models.load("real_models:linear_regression")
    result = fit(model, *model.example_data())
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


def _with_data(make):
    def attach(fn):
        fn.example_data = make
        return fn

    return attach


def _regression_data(num_data: int, num_features: int, noise: float | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_data, num_features, generator=gen)
    coef = 2.0 * torch.randn(num_features, generator=gen)
    mean = x @ coef
    if noise is None:  # logistic
        return x, torch.bernoulli(torch.sigmoid(0.5 + mean), generator=gen)
    return x, mean + noise * torch.randn(num_data, generator=gen)


@_with_data(lambda: _regression_data(100, 6, noise=0.1, seed=0))
def linear_regression(x: torch.Tensor, y: torch.Tensor):
    """``y ~ Normal(x @ beta, sigma)``: ``x`` ``(N, 6)``, ``y`` ``(N,)``."""
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), sigma), obs=y)


@_with_data(lambda: _regression_data(200, 4, noise=None, seed=1))
def logistic_regression(x: torch.Tensor, y: torch.Tensor):
    """``y ~ Bernoulli(logits = alpha + x @ beta)``: ``x`` ``(N, 4)``, ``y`` ``(N,)`` in {0, 1}."""
    alpha = pyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        logits = alpha + (x * beta).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def _ar_data(num_data: int = 200, seed: int = 2) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    phi = torch.tensor([0.5, -0.3, 0.2, 0.1, -0.1])
    y = torch.zeros(num_data + 50)
    noise = 0.5 * torch.randn(num_data + 50, generator=gen)
    for t in range(len(phi), len(y)):
        y[t] = 1.0 + (phi * y[t - len(phi) : t].flip(0)).sum() + noise[t]
    return (y[50:],)


@_with_data(_ar_data)
def ar_model(y: torch.Tensor, order: int = 5):
    """AR(``order``) on ``y`` ``(T,)``, conditioned on its first ``order`` values."""
    lags = torch.stack([y[order - k - 1 : len(y) - k - 1] for k in range(order)], -1)  # (T − p, p)
    c = pyro.sample("c", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 1.0).expand([order]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    with pyro.plate("time", len(y) - order):
        mean = c + (lags * phi).sum(-1)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y[order:])


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


@_with_data(lambda: (SCHOOLS_Y, SCHOOLS_SIGMA))
def eight_schools_centered(y: torch.Tensor, sigma: torch.Tensor):
    """``theta_j ~ Normal(mu, tau)``, ``y_j ~ Normal(theta_j, sigma_j)``; ``mu ~ Normal(0, 5)``,
    ``tau ~ HalfCauchy(5)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


@_with_data(lambda: (SCHOOLS_Y, SCHOOLS_SIGMA))
def eight_schools_noncentered(y: torch.Tensor, sigma: torch.Tensor):
    """The same model with ``theta_j = mu + tau · eta_j``, ``eta_j ~ Normal(0, 1)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


MODELS = {m.__name__: m for m in (linear_regression, logistic_regression, ar_model, eight_schools_centered,
                                  eight_schools_noncentered)}
