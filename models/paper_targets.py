"""The five posterior targets of arXiv:2512.04954 (sections 3.2 and 4.2) as Pyro models.

Each model has an independent Uniform(-12, 12) prior on every coordinate of ``theta`` and adds
the target density as its log-likelihood with ``pyro.factor``, so the posterior is the target
truncated to the prior box. Each model function carries ``.truth``: the exact posterior, with
a sampler, its log density and its mixture components (a :class:`~pyro_lwflow.truth.BoxTruth`;
its evidence is estimated on first use, not at import). The numbers come from
``paper_targets.json`` beside this file (a copy of the project's benchmark spec).

Use::

    from pyro_lwflow import models, fit
    model = models.load("paper_targets:three_mode_2d")
    result = fit(model, num_components=3)
    result.sample(1000)["theta"]; model.truth.sample(1000)
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


def _gaussian_mixture(name: str, spec: dict) -> BoxTruth:
    weights = torch.tensor(spec["weights"])
    comps = dist.MultivariateNormal(torch.tensor(spec["means"]), torch.tensor(spec["covariances"]))
    density = dist.MixtureSameFamily(dist.Categorical(weights), comps)
    return BoxTruth(
        name, density, lambda th: comps.log_prob(th.unsqueeze(-2)) + weights.log(), weights, LOW, HIGH
    )


class _Product(dist.TorchDistribution):
    """Independent 1-D factors stacked into a ``(d,)`` event."""

    arg_constraints: dict = {}

    def __init__(self, factors: list[dist.Distribution]):
        self.factors = factors
        super().__init__(torch.Size(), torch.Size([len(factors)]))

    def sample(self, sample_shape=()):
        return torch.stack([f.sample(sample_shape) for f in self.factors], -1)

    def log_prob(self, value):
        return sum(f.log_prob(value[..., i]) for i, f in enumerate(self.factors))


def _product(name: str, spec: dict) -> BoxTruth:
    t_spec, g_spec, l_spec = spec["factors"]
    weights = torch.tensor(t_spec["weights"])
    t_comps = dist.StudentT(t_spec["df"], torch.tensor(t_spec["locs"]), t_spec["scale"])
    factors = [
        dist.MixtureSameFamily(dist.Categorical(weights), t_comps),
        dist.Gumbel(g_spec["loc"], g_spec["scale"]),
        dist.Laplace(l_spec["loc"], l_spec["scale"]),
    ]
    # the modes all lie along theta_1, so the mixture components of f1 assign draws to modes
    components = lambda th: t_comps.log_prob(th[..., :1]) + weights.log()  # noqa: E731
    return BoxTruth(name, _Product(factors), components, weights, LOW, HIGH)


def _target(name: str) -> BoxTruth:
    spec = SPEC["targets"][name]
    return (_gaussian_mixture if spec["kind"] == "gaussian_mixture" else _product)(name, spec)


def _make_model(name: str):
    truth = _target(name)

    def model():
        theta = pyro.sample("theta", dist.Uniform(LOW, HIGH).expand([truth.dim]).to_event(1))
        pyro.factor("likelihood", truth.likelihood(theta))

    model.__name__ = model.__qualname__ = name
    model.__doc__ = f"The paper's `{name}` target: Uniform({LOW}, {HIGH})^{truth.dim} prior, density as likelihood."
    model.truth = truth
    return model


single_mode_2d = _make_model("single_mode_2d")
two_mode_2d = _make_model("two_mode_2d")
three_mode_2d = _make_model("three_mode_2d")
three_mode_3d = _make_model("three_mode_3d")
non_gaussian_3d = _make_model("non_gaussian_3d")

MODELS = {m.__name__: m for m in (single_mode_2d, two_mode_2d, three_mode_2d, three_mode_3d, non_gaussian_3d)}
