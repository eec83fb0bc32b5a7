"""Tempering from the prior to a data-dominated posterior without gradients (issue 19, item 1)."""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_lwflow import AutoLWFlow, Schedule, fit, models
from pyro_lwflow.adaptive import Blend
from pyro_lwflow.draws import WeightedDraws
from pyro_lwflow.modes import moment_proposal


def regression_posterior(x: torch.Tensor, y: torch.Tensor, prior_sd: float = 10.0, grid: int = 4_001):
    """Exact posterior mean and sd and log evidence of ``models.real_models.linear_regression``
    (coefficients ``~ Normal(0, prior_sd)``, ``sigma ~ HalfNormal(1)``): the coefficients integrated
    out in closed form for each ``sigma``, then ``log sigma`` by quadrature on a fine grid.

    :returns: ``(mean, sd, log_evidence)``: mean and sd ``(P + 1,)`` (the coefficients, then
        ``sigma``), and ``log p(y | x)`` in nats.
    """
    x, y = x.double(), y.double()
    n, p = x.shape
    u = torch.linspace(-6.0, 2.0, grid, dtype=torch.float64)  # log sigma
    var = torch.exp(2 * u)[:, None, None]
    precision = x.T @ x / var + torch.eye(p, dtype=torch.float64) / prior_sd**2  # (G, P, P)
    chol = torch.linalg.cholesky(precision)
    rhs = (x.T @ y)[None, :, None] / var
    mean = torch.cholesky_solve(rhs, chol)[..., 0]  # (G, P)
    log_marginal = (
        -0.5 * n * torch.log(2 * math.pi * var[:, 0, 0]) - (y @ y) / (2 * var[:, 0, 0])
        + 0.5 * (rhs[..., 0] * mean).sum(-1) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        - p * math.log(prior_sd)
    )
    log_post = log_marginal + dist.HalfNormal(1.0).log_prob(torch.exp(u)).double() + u  # in log sigma
    log_evidence = float(torch.logsumexp(log_post, 0) + math.log(float(u[1] - u[0])))
    w = torch.softmax(log_post, 0)
    cov = torch.cholesky_inverse(chol)
    coef_mean = w @ mean
    coef_var = w @ (torch.diagonal(cov, dim1=-2, dim2=-1) + (mean - coef_mean) ** 2)
    sigma = torch.exp(u)
    sigma_mean = w @ sigma
    sigma_var = w @ (sigma - sigma_mean) ** 2
    sd = torch.cat([coef_var, sigma_var[None]]).sqrt()
    return torch.cat([coef_mean, sigma_mean[None]]), sd, log_evidence


def test_the_closed_form_matches_a_conjugate_limit():
    """With a flat-ish prior and sigma pinned by many points, the mean is least squares."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2_000, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(2_000, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0], dtype=torch.float64) + 0.5 * noise
    mean, sd, _ = regression_posterior(x, y, prior_sd=1e3)
    ls = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    assert torch.allclose(mean[:2], ls, atol=1e-6)
    assert abs(float(mean[2]) - 0.5) < 0.02 and float(sd[2]) < 0.01


def test_a_blend_is_a_normalised_mixture_of_its_components():
    wide = dist.MultivariateNormal(torch.zeros(2), 4.0 * torch.eye(2))
    narrow = dist.MultivariateNormal(torch.ones(2), 0.25 * torch.eye(2))
    blend = Blend([wide, narrow], torch.tensor([0.3, 0.7]))
    torch.manual_seed(0)
    x = blend.sample((40_000,))
    assert x.shape == (40_000, 2) and blend.sample().shape == (2,)
    # importance check of normalisation against the wide Gaussian: E_wide[blend / wide] = 1
    z = wide.sample((200_000,))
    assert float(torch.exp(blend.log_prob(z) - wide.log_prob(z).double()).mean()) == pytest.approx(1.0, abs=0.03)
    near = ((x - 1.0).norm(dim=-1) < 0.5).double().mean()
    assert float(near) > 0.7 * (1 - math.exp(-0.5)) * 0.9  # the narrow component's share is there


def test_blend_weights_follow_the_held_out_fit():
    torch.manual_seed(0)
    target = dist.MultivariateNormal(torch.ones(3), 0.04 * torch.eye(3))
    good = dist.MultivariateNormal(torch.ones(3), 0.05 * torch.eye(3))
    bad = dist.MultivariateNormal(-torch.ones(3), torch.eye(3))
    z = target.sample((2_000,))
    zeros = torch.zeros(2_000, dtype=torch.float64)
    draws = WeightedDraws(z, zeros, target.log_prob(z).double(), target.log_prob(z).double())  # equal weights
    blend = Blend.fitted([bad, good], draws, floor=0.05)
    assert blend.weights[0] == pytest.approx(0.05, abs=1e-3) and blend.weights[1] == pytest.approx(0.95, abs=1e-3)


def test_the_moment_proposal_follows_a_narrow_tilted_target():
    """One fit takes the proposal from anywhere to a target 10⁻³ wide and correlated (no flow needed)."""
    torch.manual_seed(0)
    cov = 1e-6 * torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    target = dist.MultivariateNormal(torch.tensor([3.0, -2.0]), cov)
    z = target.sample((3_000,))
    zeros = torch.zeros(3_000, dtype=torch.float64)
    draws = WeightedDraws(z, zeros, target.log_prob(z).double(), target.log_prob(z).double())
    proposal = moment_proposal(draws, seed=0)
    fresh = proposal.sample((20_000,))
    log_w = target.log_prob(fresh).double() - proposal.log_prob(fresh).double()
    w = torch.softmax(log_w, 0)
    assert float(1 / (w * w).sum()) / 20_000 > 0.5  # importance efficiency of a t(5) on a Gaussian


@pytest.mark.slow
def test_the_tight_regression_reaches_its_posterior_from_the_prior():
    """Issue 19, item 1: ``real_models.linear_regression`` (6 coefficients ~ Normal(0, 10) and
    sigma ~ HalfNormal(1), 100 points with noise 0.1: posterior sds ~10⁻³ of the prior's, and on the
    way a funnel in (sigma, coefficients)) without gradients: β reaches 1, means within 0.1 sd, sds
    within 10 %, the evidence within its error bar, against the closed form."""
    model = models.load("real_models:linear_regression")
    x, y = model.example_data()
    guide = AutoLWFlow(model, num_components=1, num_transforms=2, hidden_dims=(32,), marginal_bins=None)
    schedule = Schedule(starts="prior", budget=400_000, target_ess=5_000, num_steps=300, warm_steps=150)
    result = fit(model, x, y, guide=guide, schedule=schedule, progress=False, seed=0)
    assert result.num_gradient_evals == 0 and result.rounds[0].source == "prior" and result.rounds[0].beta < 0.01
    assert result.num_evals <= schedule.budget
    assert result.rounds[-1].beta == 1.0 and result.pareto_k < 0.7
    mean, sd, log_evidence = regression_posterior(x, y)
    draws = result.sample(20_000)
    fitted = torch.cat([draws["beta"], draws["sigma"][:, None]], -1).double()
    assert ((fitted.mean(0) - mean).abs() / sd).max() < 0.1
    ratio = fitted.std(0) / sd
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio
    assert abs(result.log_evidence - log_evidence) < 4 * result.log_evidence_stderr + 0.01
