"""The five posterior targets of arXiv:2512.04954 (sections 3.2 and 4.2) as Pyro models.

Each model has an independent Uniform(-12, 12) prior on every coordinate of ``theta`` and adds
the target density as its log-likelihood with ``pyro.factor``, so the posterior is the target
truncated to the prior box. Each model function carries ``.truth``: the exact posterior, with
a sampler, its log density and its mixture components. The numbers come from
``paper_targets.json`` beside this file (a copy of the project's benchmark spec).

Use::

    from pyro_lwflow import fit, load_model
    model = load_model("models/paper_targets.py:three_mode_2d")
    result = fit(model, num_components=3)
    result.sample(1000)["theta"]; model.truth.sample(1000)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

SPEC = json.loads((Path(__file__).with_name("paper_targets.json")).read_text())
LOW, HIGH = SPEC["prior"]["low"], SPEC["prior"]["high"]


class Target:
    """An exact posterior: a density ``f`` on R^d truncated to the prior box ``[LOW, HIGH]^d``.

    :param name: target name in the spec.
    :param components: ``(K,)`` list of per-mode distributions (batch over θ of shape ``(..., d)``).
    :param weights: ``(K,)`` mode weights.
    :param component_log_prob: ``theta (..., d) → (..., K)`` log of weight × component density.
    """

    def __init__(self, name: str, dim: int, density: dist.Distribution, component_log_prob, weights):
        self.name = name
        self.dim = dim
        self.density = density  # untruncated, event shape (dim,)
        self._component_log_prob = component_log_prob
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.num_modes = len(weights)
        gen_state = torch.get_rng_state()
        torch.manual_seed(12345)
        self.box_mass = float(self._inside(density.sample((2_000_000,))).double().mean())
        torch.set_rng_state(gen_state)

    @staticmethod
    def _inside(theta: torch.Tensor) -> torch.Tensor:
        return ((theta >= LOW) & (theta <= HIGH)).all(-1)

    def likelihood(self, theta: torch.Tensor) -> torch.Tensor:
        """``(...)`` log of the untruncated density at ``theta (..., d)``: the model's log-likelihood."""
        return self.density.log_prob(theta)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """``(...)`` exact log posterior density (normalised on the box, −inf outside)."""
        lp = self.density.log_prob(theta) - math.log(self.box_mass)
        return torch.where(self._inside(theta), lp, torch.full_like(lp, -math.inf))

    def sample(self, num_samples: int, seed: int | None = None) -> torch.Tensor:
        """``(num_samples, d)`` exact posterior draws (rejection to the box)."""
        state = torch.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        out, have = [], 0
        while have < num_samples:
            x = self.density.sample((int(1.01 * (num_samples - have)) + 16,))
            x = x[self._inside(x)]
            out.append(x)
            have += len(x)
        if seed is not None:
            torch.set_rng_state(state)
        return torch.cat(out)[:num_samples]

    def component_log_probs(self, theta: torch.Tensor) -> torch.Tensor:
        """``(..., K)`` log(weight × density) of each mode, for mode-assignment metrics."""
        return self._component_log_prob(theta)

    @property
    def log_evidence(self) -> float:
        """Exact ``log Z = log ∫ prior × likelihood`` of the model."""
        return math.log(self.box_mass) - self.dim * math.log(HIGH - LOW)


def _gaussian_mixture(name: str, spec: dict) -> Target:
    weights = torch.tensor(spec["weights"])
    comps = dist.MultivariateNormal(torch.tensor(spec["means"]), torch.tensor(spec["covariances"]))
    density = dist.MixtureSameFamily(dist.Categorical(weights), comps)
    return Target(
        name, spec["dim"], density, lambda th: comps.log_prob(th.unsqueeze(-2)) + weights.log(), weights
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


def _product(name: str, spec: dict) -> Target:
    t_spec, g_spec, l_spec = spec["factors"]
    weights = torch.tensor(t_spec["weights"])
    t_comps = dist.StudentT(t_spec["df"], torch.tensor(t_spec["locs"]), t_spec["scale"])
    factors = [
        dist.MixtureSameFamily(dist.Categorical(weights), t_comps),
        dist.Gumbel(g_spec["loc"], g_spec["scale"]),
        dist.Laplace(l_spec["loc"], l_spec["scale"]),
    ]
    # the modes all lie along theta_1, so the mixture components of f1 assign draws to modes
    return Target(
        name,
        spec["dim"],
        _Product(factors),
        lambda th: t_comps.log_prob(th[..., :1]) + weights.log(),
        weights,
    )


def _target(name: str) -> Target:
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
