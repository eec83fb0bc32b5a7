import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL

from .toy_models import example_y, factor_model, scale_model


def _trained_guide(model, *args, k=2, steps=60):
    guide = AutoLWFlow(model, num_components=k, num_transforms=2, hidden_dims=(16,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), LikelihoodWeightedKL(num_prior_samples=5000, batch_size=256))
    for _ in range(steps):
        svi.step(*args)
    return guide


def test_svi_trains_the_param_store_parameters():
    target = torch.tensor([1.0, -1.0])
    guide = AutoLWFlow(factor_model, num_components=2, num_transforms=2, hidden_dims=(16,))
    loss = LikelihoodWeightedKL(num_prior_samples=5000, batch_size=256)
    svi = SVI(factor_model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)

    def cross_entropy():  # on every draw, not a noisy minibatch
        with torch.no_grad():
            return float(-(loss.draws.weights.float() * guide.latent_log_prob(loss.draws.latents)).sum())

    svi.evaluate_loss(target)
    first = cross_entropy()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for _ in range(100):
        svi.step(target)
    assert any(not torch.equal(before[k], v) for k, v in pyro.get_param_store().items() if k in before)
    assert any("transform" in k for k in pyro.get_param_store().keys())
    assert cross_entropy() < first


def test_log_density_integrates_to_one_on_a_constrained_box():
    guide = _trained_guide(factor_model, torch.tensor([1.0, -2.0]))
    grid = torch.linspace(-5 + 1e-3, 5 - 1e-3, 400)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    theta = torch.stack([xx, yy], -1).reshape(-1, 2)
    with torch.no_grad():
        density = guide.log_density({"theta": theta}).exp()
    cell = (grid[1] - grid[0]) ** 2
    assert abs(float(density.sum() * cell) - 1.0) < 0.02


def test_log_density_agrees_with_the_samples():
    """Histogram of guide draws of a positive site matches exp(log_density)."""
    y = example_y(10)[:, 0]
    guide = _trained_guide(scale_model, y, k=1)
    draws = guide.sample_posterior(40_000)
    x = torch.stack([draws["loc"], draws["scale"]], -1)
    with torch.no_grad():
        log_q = guide.log_density({"loc": x[:, 0], "scale": x[:, 1]})
    # importance identity E_q[g / q] = ∫ g = 1 for a density g inside q's bulk (low variance);
    # a missing Jacobian of the positive site's exp map would be off by about E[scale]
    g = dist.Normal(x.mean(0), x.std(0) / 2).to_event(1)
    estimate = float(torch.exp(g.log_prob(x).double() - log_q.double()).mean())
    assert abs(estimate - 1.0) < 0.03


def test_predictive_median_and_quantiles():
    target = torch.tensor([1.0, -2.0])
    guide = _trained_guide(factor_model, target, steps=150)
    samples = Predictive(factor_model, guide=guide, num_samples=2000, parallel=True)(target)["theta"]
    assert samples.shape == (2000, 2) and (samples.abs() < 5).all()
    median = guide.median(target)["theta"]
    q = guide.quantiles([0.1, 0.9], target)["theta"]
    assert q.shape == (2, 2) and (q[0] < median).all() and (median < q[1]).all()
    assert torch.allclose(median, target, atol=0.3)


def test_initialisation_puts_one_component_per_mode():
    def model():
        x = pyro.sample("x", dist.Uniform(-10.0, 10.0).expand([2]).to_event(1))
        mix = dist.MixtureSameFamily(
            dist.Categorical(torch.tensor([0.3, 0.7])),
            dist.Normal(torch.tensor([[-5.0, 0.0], [5.0, 0.0]]), 0.5).to_event(1),
        )
        pyro.factor("lik", mix.log_prob(x))

    guide = AutoLWFlow(model, num_components=2)
    LikelihoodWeightedKL(num_prior_samples=50_000).prepare(model, guide)
    with torch.no_grad():  # the component means, carried to θ by the flow (the identity so far)
        locs = torch.sigmoid(guide.transform(guide.component_loc)) * 20 - 10
    order = locs[:, 0].argsort()
    assert torch.allclose(locs[order], torch.tensor([[-5.0, 0.0], [5.0, 0.0]]), atol=0.3)
    weights = torch.softmax(guide.mixture_logits.detach(), 0)[order]
    assert torch.allclose(weights, torch.tensor([0.3, 0.7]), atol=0.05)


def test_auto_components_are_chosen_and_scored():
    def model():
        x = pyro.sample("x", dist.Uniform(-10.0, 10.0).expand([2]).to_event(1))
        mix = dist.MixtureSameFamily(
            dist.Categorical(torch.ones(3)),
            dist.Normal(torch.tensor([[-5.0, -5.0], [5.0, 0.0], [0.0, 5.0]]), 0.6).to_event(1),
        )
        pyro.factor("lik", mix.log_prob(x))

    guide = AutoLWFlow(model, num_components="auto", max_components=5)
    LikelihoodWeightedKL(num_prior_samples=50_000).prepare(model, guide)
    assert guide.mixture_logits.shape == (3,)
    assert {1, 2, 3, 4, 5} >= set(guide.component_scores) >= {1, 2, 3}
    assert min(guide.component_scores, key=guide.component_scores.get) == 3


def test_log_density_names_missing_sites():
    y = example_y(10)[:, 0]
    guide = _trained_guide(scale_model, y, k=1, steps=1)
    with pytest.raises(KeyError, match="'scale'"):
        guide.log_density({"loc": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="fit it first"):
        AutoLWFlow(scale_model).sample_posterior(3)


def test_one_dimensional_latent():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(10) + 2
    guide = _trained_guide(model, y, k=1, steps=200)
    draws = guide.sample_posterior(20_000)["mu"]
    precision = 1 / 25 + 10
    assert math.isclose(float(draws.mean()), float(y.sum()) / precision, abs_tol=0.05)
    assert math.isclose(float(draws.var()), 1 / precision, rel_tol=0.15)
