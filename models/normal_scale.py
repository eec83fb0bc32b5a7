"""An ordinary data model: unknown mean and scale of Normal data, with a constrained latent.

``mu ~ Normal(0, 10)``, ``sigma ~ HalfNormal(5)``, ``y_i ~ Normal(mu, sigma)`` over a plate.
``sigma`` lives on (0, ∞): the guide works on ``log sigma`` and maps back.

Use::

    from pyro_lwflow import models, fit
    model = models.load("normal_scale")
    result = fit(model, model.example_data())
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


def model(y: torch.Tensor | None = None, num_data: int = 50):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", num_data if y is None else len(y)):
        return pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def example_data(num_data: int = 50, mu: float = 1.5, sigma: float = 0.7, seed: int = 0) -> torch.Tensor:
    """``(num_data,)`` synthetic observations drawn with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return mu + sigma * torch.randn(num_data, generator=gen)


model.example_data = example_data
