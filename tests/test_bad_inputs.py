"""Inputs users really hit: a clear error naming the site and the fix, or correct handling with a
warning that counts what was done — never silent nonsense."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL, Schedule, fit
from pyro_lwflow.evaluation import ChunkFailedError
from pyro_lwflow.tracing import ModelStructureError

QUICK = {"schedule": Schedule.one_shot(2000, num_steps=20), "num_components": 1, "batch_size": 128, "progress": False}


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_nan_in_the_data_names_the_site():
    y = torch.tensor([0.3, math.nan, 1.2, math.nan, -0.4])
    with pytest.raises(ValueError, match=r"data observed at site 'y' hold 2 NaN and 0 infinite values \(of 5\)"):
        fit(normal_model, y, **QUICK)
    y[1] = math.inf
    with pytest.raises(ValueError, match=r"site 'y' hold 1 NaN and 1 infinite"):
        fit(normal_model, np.asarray(y), **QUICK)  # NumPy data: the same check


def test_data_a_model_builds_as_a_list_is_named():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.sample("y", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=[0.1, 0.2, 0.3])

    with pytest.raises(ValueError, match=r"site 'y' is a list, not a tensor; pass obs=torch.as_tensor"):
        fit(model, **QUICK)


def test_data_passed_as_lists_and_numpy_fit_like_tensors():
    y = torch.tensor([0.3, 0.9, 1.2, 0.1, -0.4])
    as_tensor = fit(normal_model, y, seed=1, **QUICK)
    for data in (y.tolist(), y.numpy().astype(np.float64)):
        other = fit(normal_model, data, seed=1, **QUICK)
        assert torch.allclose(other.draws.log_weights, as_tensor.draws.log_weights, atol=1e-4)
        assert isinstance(other.model_args[0], torch.Tensor)


# -- a likelihood that raises for part of the prior ---------------------------------------------


def crashing_simulator(target):
    """A NumPy black box that raises wherever theta₁ < -1 (about 31 % of the N(0, 2²) prior)."""
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    t = theta.detach().numpy()
    if t[0] < -1.0:
        raise FloatingPointError(f"solver diverged at theta = {t.round(2).tolist()}")
    pyro.factor("loglik", torch.tensor(-0.5 * float(np.sum((t - np.asarray(target)) ** 2))))


def test_draws_a_black_box_raises_on_are_dropped_with_a_count_and_the_message():
    target = torch.tensor([1.0, 0.5])
    loss = LikelihoodWeightedKL(num_prior_samples=600, chunk_size=200)
    with pytest.warns(UserWarning) as record:
        draws = loss.prepare(crashing_simulator, AutoLWFlow(crashing_simulator, num_components=1), target)
    messages = [str(w.message) for w in record]
    raised = next(m for m in messages if m.startswith("The model raised"))
    count = int(raised.split()[4])
    assert 120 < count < 260 and "of 600 draws (first: FloatingPointError: solver diverged at theta" in raised
    assert any(m.startswith(f"Dropped {count} of 600 draws") for m in messages)
    assert len(draws) == 600 - count and (draws.latents[:, 0] >= -1.0).all()
    assert torch.isfinite(draws.log_weights).all()


def test_a_model_that_always_raises_stops_with_its_error():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        raise KeyError("no such parameter file")

    with pytest.raises(KeyError, match="no such parameter file"):
        fit(model, **QUICK)


def test_a_vectorised_chunk_that_raises_is_named_and_the_others_kept():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        if x.dim() and (x > 3.0).any():  # a whole vectorised chunk fails when one draw is out of range
            raise RuntimeError("out of the table's range")
        pyro.factor("loglik", -0.5 * x**2)

    guide = AutoLWFlow(model)
    guide.setup()
    loss = LikelihoodWeightedKL(num_prior_samples=20_000, chunk_size=2000, retries=0)
    with pytest.raises(ChunkFailedError, match=r"chunk \d+ \(draws \d+–\d+\) failed 1 time.*out of the table"):
        loss.prepare(model, guide)


# -- structure a fixed-dimension flow cannot represent ------------------------------------------


def test_a_support_that_depends_on_another_latent_is_refused():
    def model(y):
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        x = pyro.sample("x", dist.Uniform(0.0, sigma))
        pyro.sample("y", dist.Normal(x, 0.1), obs=y)

    with pytest.raises(ModelStructureError, match=r"support of latent site 'x' .* depends on another latent site"):
        fit(model, torch.tensor(0.5), **QUICK)


def test_latent_shapes_that_change_with_the_draws_are_refused():
    def model():
        rate = pyro.sample("rate", dist.Uniform(0.0, 1.0))
        k = 1 + int(3 * float(rate))  # the number of effects depends on a drawn value
        effects = pyro.sample("effects", dist.Normal(0.0, 1.0).expand([k]).to_event(1))
        pyro.factor("loglik", -effects.pow(2).sum(-1))

    with pytest.raises(ModelStructureError, match=r"'effects' has shape .*\(dynamic structure\)"):
        fit(model, **QUICK)


def test_a_site_that_only_some_draws_have_is_refused():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        if float(a) > 0:
            pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.factor("loglik", -a**2)

    pyro.set_rng_seed(3)
    with pytest.raises(ModelStructureError, match=r"dynamic structure"):
        fit(model, seed=None, **QUICK)


# -- a likelihood that is zero on most of the prior ---------------------------------------------


def ring(x_obs):
    """Uniform(-1, 1)² prior; the likelihood is zero off a ring of radius 0.5 ± 0.04 (~10 % of the box)."""
    theta = pyro.sample("theta", dist.Uniform(-1.0, 1.0).expand([2]).to_event(1))
    radius = theta.pow(2).sum(-1).sqrt()
    inside = (radius - 0.5).abs() < 0.04
    pyro.factor("loglik", torch.where(inside, -0.5 * ((theta[..., 0] - x_obs) / 0.2) ** 2, -math.inf))


@pytest.mark.parametrize("rounds", [1, "auto"])
def test_a_likelihood_zero_on_most_of_the_prior_fits(rounds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small budget: fit-quality advice
        schedule = Schedule(num_rounds=rounds, initial_draws=5000, num_steps=150, budget=20_000, starts="prior")
        result = fit(ring, torch.tensor(0.3), num_components=1, schedule=schedule, progress=False)
    prior = result.draws.source == 0
    assert 0.05 < float(torch.isfinite(result.draws.log_likelihood[prior]).float().mean()) < 0.25
    assert all(math.isfinite(r.ess) and r.ess > 100 for r in result.rounds)
    assert torch.isfinite(result.draws.weights).all() and math.isfinite(result.log_evidence)
    reweighted = result.reweighted_sample(2000)["theta"].norm(dim=-1)
    assert ((reweighted - 0.5).abs() < 0.04).all()  # zero likelihood, zero weight
    flow = result.sample(2000)["theta"].norm(dim=-1)
    assert float(((flow - 0.5).abs() < 0.08).float().mean()) > 0.8
