"""Seeded end-to-end fits that assert measured quality (a few seconds each)."""

import math

import pytest
import torch

from pyro_lwflow import AutoLWFlow, Schedule, fit, metrics
from pyro_lwflow.model_files import load_model

from .toy_models import conjugate_normal, conjugate_posterior, example_y, skewed_model, skewed_posterior_sample

pytestmark = pytest.mark.slow


def test_conjugate_normal_mean_and_variance():
    y = example_y(20)
    result = fit(conjugate_normal, y, num_components=1, schedule=Schedule.one_shot(200_000, num_steps=500),
                 batch_size=512, progress=False)
    mean, var = conjugate_posterior(y)
    theta = result.sample(40_000)["theta"]
    assert torch.allclose(theta.mean(0), mean, atol=0.02)
    assert torch.allclose(theta.var(0), torch.full((2,), var), rtol=0.1)
    # the evidence of a conjugate model is known in closed form too
    cov = torch.eye(2 * len(y)) + 4.0 * torch.kron(torch.ones(len(y), len(y)), torch.eye(2))
    exact = torch.distributions.MultivariateNormal(torch.zeros(2 * len(y)), cov).log_prob(y.reshape(-1))
    assert math.isclose(result.log_evidence, float(exact), abs_tol=5 * result.log_evidence_stderr + 0.01)
    assert result.num_likelihood_evals == 200_000 and result.wall_time > 0 and len(result.losses) == 500


def _skewed_fit(marginal_bins, seed):
    guide = AutoLWFlow(skewed_model, num_components=1, num_transforms=2, hidden_dims=(16,), marginal_bins=marginal_bins)
    fit(skewed_model, guide=guide, schedule=Schedule.one_shot(100_000, num_steps=600), batch_size=512, lr=5e-3,
        progress=False, seed=seed)
    exact = skewed_posterior_sample(20_000)
    gumbel, laplace = torch.distributions.Gumbel(-2.0, 1.5), torch.distributions.Laplace(2.0, 1.0)
    log_p = gumbel.log_prob(exact[:, 0]) + laplace.log_prob(exact[:, 1])
    with torch.no_grad():
        kl = metrics.kl_divergence(log_p, guide.log_density({"theta": exact}))
        return kl, metrics.w1_avg(exact, guide.sample_posterior(20_000)["theta"])


@pytest.mark.parametrize("seed", [0, 1])
def test_marginal_spline_shapes_skewed_and_cusped_marginals(seed):
    """A Gumbel × Laplace posterior: affine couplings alone cannot bend a coordinate's own
    marginal. Measured (seeds 0–2, 600 steps): with the spline KL 0.007–0.009 and w1 0.031–0.042
    (noise floor 0.017); without it KL 0.028–0.032 and w1 0.081–0.099."""
    kl, w1 = _skewed_fit(16, seed)
    kl_plain, w1_plain = _skewed_fit(None, seed)
    assert kl < 0.015 and w1 < 0.06
    assert kl_plain > 2 * kl and w1_plain > 1.5 * w1


def _two_mode_fit(k):
    model = load_model("models/paper_targets.py:two_mode_2d")
    guide = AutoLWFlow(model, num_components=k, num_transforms=4, hidden_dims=(32, 32))
    result = fit(model, guide=guide, schedule=Schedule.one_shot(200_000, num_steps=600), batch_size=512,
                 lr=5e-3, progress=False)
    exact = model.truth.sample(20_000, seed=1)
    approx = result.sample(20_000)["theta"]
    return metrics.w1_avg(exact, approx), metrics.bridge_mass(model.truth.log_prob, exact, approx)


def test_two_mode_mixture_base_removes_the_bridge():
    """Bounds: the noise floor of w1_avg here is 0.032 and the truth's own bridge mass 0.001; a
    600-step fit on 2·10⁵ draws (ESS ≈ 9,000) reaches w1 ≈ 0.055 and bridge ≈ 0.0015 (seeds 0, 1),
    so 0.09 and 0.004 leave room for seed noise but fail a fit that loses or bridges a mode
    (one component: w1 ≈ 0.11, bridge ≈ 0.019)."""
    w1_two, bridge_two = _two_mode_fit(2)
    w1_one, bridge_one = _two_mode_fit(1)
    assert w1_two < 0.09
    assert bridge_two < 0.004
    assert bridge_one > 3 * bridge_two
