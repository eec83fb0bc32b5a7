"""The paper's Gaussian-mixture targets made amortized: the data set moves the modes.

For a target ``f = Σₖ wₖ N(μₖ, Σₖ)`` of ``paper_targets.json`` the model draws
``θ ~ Uniform(-12, 12)^d`` and observes ``x ∈ R^d`` with
``x | θ ~ Σₖ wₖ N(θ − μₖ, Σₖ)``, so the posterior for a data set ``x`` is the paper's target
shifted by ``x``, truncated to the prior box: ``p(θ | x) ∝ Σₖ wₖ N(θ; x + μₖ, Σₖ)``. One amortized
guide must place every mode for every ``x``. ``model.truth(x)`` is that exact posterior (a
:class:`~pyro_lwflow.truth.BoxTruth`: exact draws, log density, mode components).

Use::

    from pyro_lwflow import amortize, models
    model = models.load("amortized_targets:three_mode_2d")
    amortized = amortize(model, num_simulations=20_000, num_components=3)
    amortized.condition(torch.tensor([1.0, -2.0])).sample(1000)["theta"]
    model.truth(torch.tensor([1.0, -2.0])).sample(1000)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_lwflow.truth import BoxTruth

SPEC = json.loads((Path(__file__).with_name("paper_targets.json")).read_text())
LOW, HIGH = SPEC["prior"]["low"], SPEC["prior"]["high"]


def _make_model(name: str):
    spec = SPEC["targets"][name]
    weights = torch.tensor(spec["weights"])
    means = torch.tensor(spec["means"])
    covariances = torch.tensor(spec["covariances"])
    dim = spec["dim"]

    def model(x: torch.Tensor | None = None):
        x = torch.zeros(dim) if x is None else x  # a template data set: amortize() and simulations need only its shape
        theta = pyro.sample("theta", dist.Uniform(LOW, HIGH).expand([dim]).to_event(1))
        components = dist.MultivariateNormal(theta.unsqueeze(-2) - means, covariances)
        mixing = dist.Categorical(weights.expand(theta.shape[:-1] + weights.shape))
        pyro.sample("x", dist.MixtureSameFamily(mixing, components), obs=x)

    def truth(x: torch.Tensor) -> BoxTruth:
        """The exact posterior for data set ``x`` ``(d,)``."""
        comps = dist.MultivariateNormal(torch.as_tensor(x, dtype=means.dtype) + means, covariances)
        density = dist.MixtureSameFamily(dist.Categorical(weights), comps)
        return BoxTruth(f"{name} | x", density, lambda th: comps.log_prob(th.unsqueeze(-2)) + weights.log(),
                        weights, LOW, HIGH)

    model.__name__ = model.__qualname__ = name
    model.__doc__ = (f"The paper's `{name}` target, amortized: Uniform({LOW}, {HIGH})^{dim} prior on `theta`, a data "
                     f"set `x` ({dim},) that shifts every mode by x.")
    model.truth = truth
    model.dim = dim
    return model


two_mode_2d = _make_model("two_mode_2d")
three_mode_2d = _make_model("three_mode_2d")
three_mode_3d = _make_model("three_mode_3d")

MODELS = {m.__name__: m for m in (two_mode_2d, three_mode_2d, three_mode_3d)}
