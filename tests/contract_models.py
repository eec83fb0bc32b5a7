"""One small Pyro model per model shape, for the contract matrix (tests/test_contract.py).

Module level, so a process pool can pickle them and ``lwflow fit tests/contract_models.py:NAME``
loads them; each has ``.example_data()`` returning its positional arguments as one object.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import torch

_GEN = torch.Generator().manual_seed(0)
Y10 = 1.0 + torch.randn(10, generator=_GEN)


def _with_data(data):
    def attach(fn):
        fn.example_data = lambda: data
        return fn

    return attach


@_with_data(Y10)
def scalar(y):
    """A scalar latent: mu ~ N(0, 2²), y_i ~ N(mu, 1)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@_with_data(torch.randn(8, 3, generator=_GEN))
def vector(y):
    """A vector latent (to_event): theta ~ N(0, 2² I₃), y_i ~ N(theta, I₃)."""
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


@_with_data(SCHOOLS_Y)
def eight_schools(y):
    """Eight schools, non-centred: a latent inside a plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, SCHOOLS_SIGMA), obs=y)


@_with_data(torch.randn(3, 4, generator=_GEN))
def nested_plates(y):
    """Nested plates: group effects (3) and item effects (3 × 4)."""
    with pyro.plate("group", 3, dim=-2):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("item", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(g, 0.5))
            pyro.sample("y", dist.Normal(z, 0.5), obs=y)


_L = torch.linalg.cholesky(torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]]))
CONSTRAINED_DATA = (
    (torch.randn(12, 3, generator=_GEN) @ _L.T) * 1.5,
    torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
    torch.tensor([0, 2, 2, 1, 2, 0, 2]),
)


@_with_data(CONSTRAINED_DATA)
def constrained(data):
    """Positive, unit-interval, simplex and correlation-Cholesky latent sites."""
    x, flips, labels = data
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    corr = pyro.sample("corr", dist.LKJCholesky(3, 1.0))
    scale_tril = scale.unsqueeze(-1).unsqueeze(-1) * corr
    with pyro.plate("rows", x.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), scale_tril=scale_tril), obs=x)
    with pyro.plate("flip", len(flips)):
        pyro.sample("flips", dist.Bernoulli(p), obs=flips)
    with pyro.plate("label", len(labels)):
        pyro.sample("labels", dist.Categorical(w), obs=labels)


@_with_data(Y10)
def deterministic(y):
    """A pyro.deterministic site: mu = 1 + 2 · mu_raw."""
    mu_raw = pyro.sample("mu_raw", dist.Normal(0.0, 1.0))
    mu = pyro.deterministic("mu", 1.0 + 2.0 * mu_raw)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@_with_data(torch.tensor([0.5, -1.0]))
def factor_only(target):
    """The whole likelihood as a pyro.factor, under a box prior."""
    theta = pyro.sample("theta", dist.Uniform(-4.0, 4.0).expand([2]).to_event(1))
    pyro.factor("loglik", dist.Normal(target, 0.7).to_event(1).log_prob(theta))


@_with_data(Y10)
def keyword_arguments(y=None, noise=1.0):
    """Data and a setting passed by keyword (fit(model, model_kwargs={"y": y, "noise": 1.0}))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, noise), obs=y)


@_with_data(Y10.numpy().astype(np.float64))
def numpy_data(y):
    """Data given as a NumPy array (float64)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@_with_data([float(v) for v in Y10])
def list_data(y):
    """Data given as a Python list of floats."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y100 = 1.0 + torch.randn(100, generator=_GEN)


@_with_data(Y100)
def subsampled(y):
    """An observed site in a randomly subsampled plate: refused with a clear error."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y), subsample_size=10) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


FITTED = ["scalar", "vector", "eight_schools", "nested_plates", "constrained", "deterministic", "factor_only",
          "keyword_arguments", "numpy_data", "list_data"]
