"""models/sbi_tasks.py: shapes, vectorised simulation, and likelihoods checked independently (no sbibm)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro_lwflow.models import sbi_tasks
from pyro_lwflow.models.sbi_tasks import SLCPLikelihood, TwoMoonsLikelihood

from pyro_lwflow import models

DIMS = {"two_moons": (2, 2), "slcp": (5, 8), "gaussian_linear": (10, 10)}


def _simulate(model, num: int):
    with pyro.plate("particles", num, dim=-1):
        trace = poutine.trace(poutine.uncondition(model)).get_trace()
    return trace.nodes["theta"]["value"], trace.nodes["x"]["value"], trace


def test_the_tasks_are_listed_and_load_by_name():
    assert {f"sbi_tasks:{t}" for t in DIMS} <= set(models.names())
    for name, (d_theta, d_x) in DIMS.items():
        model = models.load(f"sbi_tasks:{name}")
        assert (model.sbibm_task, model.dim_theta, model.dim_x) == (name, d_theta, d_x)


@pytest.mark.parametrize("name", DIMS)
def test_shapes_conditioned_unconditioned_and_under_a_plate(name):
    pyro.set_rng_seed(0)
    model = sbi_tasks.MODELS[name]
    d_theta, d_x = DIMS[name]
    trace = poutine.trace(model).get_trace()  # conditioned on the template zeros
    assert trace.nodes["theta"]["value"].shape == (d_theta,)
    assert trace.nodes["x"]["is_observed"] and trace.nodes["x"]["value"].shape == (d_x,)
    one = poutine.trace(poutine.uncondition(model)).get_trace()
    assert one.nodes["x"]["value"].shape == (d_x,) and not torch.equal(one.nodes["x"]["value"], torch.zeros(d_x))
    theta, x, many = _simulate(model, 1000)
    assert theta.shape == (1000, d_theta) and x.shape == (1000, d_x)
    assert x.std(0).min() > 0  # distinct draws, not one broadcast
    many.compute_log_prob()
    assert many.nodes["x"]["log_prob"].shape == (1000,) and many.nodes["x"]["log_prob"].isfinite().all()
    # conditioned on one observation under the particle plate: one likelihood per particle
    with pyro.plate("particles", 50, dim=-1):
        cond = poutine.trace(model).get_trace(x[0])
    cond.compute_log_prob()
    assert cond.nodes["x"]["log_prob"].shape == (50,)


def test_priors_are_sbibms():
    pyro.set_rng_seed(1)
    theta, _, _ = _simulate(sbi_tasks.two_moons, 20_000)
    assert theta.min() >= -1 and theta.max() <= 1 and abs(theta.var(0).mean() - 1 / 3) < 0.01
    theta, _, _ = _simulate(sbi_tasks.slcp, 20_000)
    assert theta.min() >= -3 and theta.max() <= 3 and abs(theta.var(0).mean() - 3.0) < 0.05
    theta, x, _ = _simulate(sbi_tasks.gaussian_linear, 20_000)
    assert abs(theta.var(0).mean() - 0.1) < 0.003 and abs(x.var(0).mean() - 0.2) < 0.006


def test_gaussian_linear_log_prob_is_the_multivariate_normal():
    pyro.set_rng_seed(2)
    theta, x, trace = _simulate(sbi_tasks.gaussian_linear, 200)
    ours = trace.nodes["x"]["fn"].log_prob(x)
    ref = torch.distributions.MultivariateNormal(theta, 0.1 * torch.eye(10)).log_prob(x)
    assert torch.allclose(ours, ref, atol=1e-4)
    # and the prior density is N(0, 0.1 I)
    prior = trace.nodes["theta"]["fn"].log_prob(theta)
    ref_prior = torch.distributions.MultivariateNormal(torch.zeros(10), 0.1 * torch.eye(10)).log_prob(theta)
    assert torch.allclose(prior, ref_prior, atol=1e-4)


def test_slcp_log_prob_is_four_independent_multivariate_normals():
    pyro.set_rng_seed(3)
    theta, x, trace = _simulate(sbi_tasks.slcp, 200)
    ours = trace.nodes["x"]["fn"].log_prob(x).double()
    th, xx = theta.double(), x.double()
    ref = torch.zeros(200, dtype=torch.float64)
    for n in range(200):  # one draw at a time, the covariance written out by hand
        s1, s2, rho = th[n, 2] ** 2, th[n, 3] ** 2, math.tanh(th[n, 4])
        cov = torch.tensor([[s1**2 + 1e-6, rho * s1 * s2], [rho * s1 * s2, s2**2 + 1e-6]], dtype=torch.float64)
        mvn = torch.distributions.MultivariateNormal(th[n, :2], cov)
        ref[n] = sum(mvn.log_prob(xx[n, 2 * j : 2 * j + 2]) for j in range(4))
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-2)


def test_slcp_simulation_has_the_flattened_draw_by_draw_moments():
    pyro.set_rng_seed(4)
    theta = torch.tensor([0.7, -0.5, 1.1, -0.9, 0.8])
    x = SLCPLikelihood(theta).sample((40_000,))
    pairs = x.reshape(-1, 4, 2).reshape(-1, 2)  # (x_j1, x_j2) are adjacent entries
    s1, s2, rho = 1.1**2, 0.9**2, math.tanh(0.8)
    cov = torch.tensor([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]])
    assert torch.allclose(pairs.mean(0), theta[:2], atol=0.02)
    assert torch.allclose(torch.cov(pairs.T), cov, rtol=0.03, atol=0.01)
    # the four draws are independent of each other
    assert torch.corrcoef(x.T)[0, 2].abs() < 0.03


def test_two_moons_simulations_have_finite_density_and_lie_on_the_moon():
    pyro.set_rng_seed(5)
    theta = torch.tensor([0.3, -0.6])
    like = TwoMoonsLikelihood(theta)
    x = like.sample((20_000,))
    lp = like.log_prob(x)
    assert lp.isfinite().all()
    # the half circle: radius ~ N(0.1, 0.01) around (0.25, 0) + shift, on the right of its centre
    shift = torch.tensor([-abs(0.3 - 0.6) / math.sqrt(2), (-0.3 - 0.6) / math.sqrt(2)])
    p = x - shift - torch.tensor([0.25, 0.0])
    r = p.norm(dim=-1)
    assert abs(r.mean() - 0.1) < 1e-3 and abs(r.std() - 0.01) < 5e-4 and (p[:, 0] > 0).all()
    # points on the left half of the circle have no density
    assert like.log_prob(shift + torch.tensor([0.25 - 0.1, 0.0])).item() == -math.inf


def test_two_moons_density_integrates_to_one_and_matches_a_histogram():
    theta = torch.tensor([-0.4, 0.2])
    like = TwoMoonsLikelihood(theta.double())
    shift = like.theta.new_tensor([-abs(-0.4 + 0.2) / math.sqrt(2), (0.4 + 0.2) / math.sqrt(2)])
    centre = shift + like.theta.new_tensor([0.25, 0.0])
    h = 0.0005  # the moon is 0.01 thick: a 0.5e-3 grid resolves it
    g1 = torch.arange(-0.01, 0.16, h, dtype=torch.float64) + centre[0] + h / 2
    g2 = torch.arange(-0.16, 0.16, h, dtype=torch.float64) + centre[1] + h / 2
    grid = torch.stack(torch.meshgrid(g1, g2, indexing="ij"), -1)
    density = like.log_prob(grid).exp()
    mass = density.sum().item() * h * h
    assert abs(mass - 1.0) < 2e-3, mass  # measured: |mass − 1| ≈ 1e-8
    # a coarse histogram of simulations against the density integrated over the same cells
    pyro.set_rng_seed(6)
    x = TwoMoonsLikelihood(theta).sample((200_000,)).double()
    k = 20  # 20 × 20 grid cells of the fine grid per histogram cell
    cell_mass = density.reshape(len(g1) // k, k, len(g2) // k, k).sum((1, 3)) * h * h
    idx1 = ((x[:, 0] - (g1[0] - h / 2)) / (k * h)).floor().long()
    idx2 = ((x[:, 1] - (g2[0] - h / 2)) / (k * h)).floor().long()
    counts = torch.zeros_like(cell_mass)
    counts.index_put_((idx1, idx2), torch.ones(len(x), dtype=torch.float64), accumulate=True)
    freq = counts / len(x)
    big = cell_mass > 0.01
    assert big.sum() > 10
    assert torch.allclose(freq[big], cell_mass[big], rtol=0.1), (freq[big] / cell_mass[big]).aminmax()


def test_two_moons_log_prob_is_vectorised_over_theta():
    pyro.set_rng_seed(7)
    theta = torch.rand(5, 2) * 2 - 1
    x = TwoMoonsLikelihood(theta).sample((3,))
    assert x.shape == (3, 5, 2)
    batched = TwoMoonsLikelihood(theta).log_prob(x)
    one_by_one = torch.stack([torch.stack([TwoMoonsLikelihood(theta[j]).log_prob(x[i, j]) for j in range(5)])
                              for i in range(3)])
    assert batched.shape == (3, 5) and torch.allclose(batched, one_by_one)
    assert TwoMoonsLikelihood(theta[0]).expand((4,)).sample().shape == (4, 2)
