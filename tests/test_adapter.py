import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL
from pyro_lwflow.adapter import PriorAdapter

from .toy_models import example_y, factor_model, scale_model


def _adapter(model, *args):
    guide = AutoLWFlow(model)
    guide.setup(*args)
    return PriorAdapter(model, guide.prototype_trace, args)


def _manual_log_lik(model, args, values):
    trace = poutine.trace(poutine.condition(model, values)).get_trace(*args)
    trace.compute_log_prob()
    return sum(s["log_prob"].sum() for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"]
               and s["name"] not in values)


def test_log_likelihood_and_prior_match_a_plain_trace():
    y = example_y(10)[:, 0]
    adapter = _adapter(scale_model, y)
    draws = adapter.sample(50)
    assert draws.latents.shape == (50, 2) and draws.log_likelihood.dtype == torch.float64
    values = adapter.unpack(draws.latents)
    assert (values["scale"] > 0).all()
    for i in range(5):
        v = {k: x[i] for k, x in values.items()}
        expected = _manual_log_lik(scale_model, (y,), v)
        assert math.isclose(draws.log_likelihood[i], float(expected), rel_tol=1e-4, abs_tol=1e-3)
        # prior density of the unconstrained point: N(loc) * LogNormal(scale) * |d scale / d log scale|
        lp = dist.Normal(0, 3.0).log_prob(v["loc"]) + dist.Normal(0, 1.0).log_prob(v["scale"].log())
        assert math.isclose(draws.log_prior[i], float(lp), rel_tol=1e-4, abs_tol=1e-3)
    assert torch.equal(draws.log_prior, draws.log_proposal)


def test_factor_counts_as_likelihood():
    target = torch.tensor([1.0, -2.0])
    draws = _adapter(factor_model, target).sample(100)
    theta = torch.sigmoid(draws.latents.double()) * 10 - 5
    expected = dist.Normal(target.double(), 1.0).to_event(1).log_prob(theta)
    assert torch.allclose(draws.log_likelihood, expected, atol=1e-4)


def test_subsampled_plate_scales_the_likelihood():
    y = torch.randn(100)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample=torch.arange(10)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[:10])

    draws = _adapter(model, y).sample(20)
    mu = draws.latents[:, 0].double()
    expected = 10 * dist.Normal(mu[:, None], 1.0).log_prob(y[:10].double()).sum(-1)
    assert torch.allclose(draws.log_likelihood, expected, rtol=1e-4)


def test_non_vectorisable_model_falls_back_with_a_warning_and_right_values():
    def model(target):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        # float() and a Python sum break vectorisation: one scalar for the whole batch
        pyro.factor("loglik", torch.tensor(-float(((theta - target) ** 2).sum())))

    target = torch.tensor([0.5, 0.5])
    with pytest.warns(UserWarning, match="one draw at a time"):
        draws = _adapter(model, target).sample(30)
    expected = -((draws.latents.double() - target) ** 2).sum(-1)
    assert torch.allclose(draws.log_likelihood, expected, atol=1e-4)


def test_evaluate_reproduces_the_draws():
    y = example_y(10)[:, 0]
    adapter = _adapter(scale_model, y)
    draws = adapter.sample(40)
    log_lik, log_prior = adapter.evaluate(draws.latents)
    assert torch.allclose(log_lik, draws.log_likelihood, atol=1e-3)
    assert torch.allclose(log_prior, draws.log_prior, atol=1e-3)


def test_memory_is_chunked():
    target = torch.zeros(2)
    guide = AutoLWFlow(factor_model)
    guide.setup(target)
    adapter = PriorAdapter(factor_model, guide.prototype_trace, (target,), chunk_size=1000)
    draws = adapter.sample(3500)
    assert len(draws) == 3500 and draws.latents.dtype == torch.float32


# -- bad input ----------------------------------------------------------------------------


def test_no_observed_site():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed site"):
        _adapter(model)


def test_discrete_latent_names_the_site():
    def model():
        k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
        pyro.sample("y", dist.Normal(k.float(), 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="'k' is discrete"):
        _adapter(model)


def test_improper_prior_names_the_site():
    def model():
        x = pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="'x' has an improper prior"):
        _adapter(model)


def test_wrong_data_shape_names_the_site():
    def model(y):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("obs_y", dist.Normal(theta, 1.0).to_event(1), obs=y)

    with pytest.raises(ValueError, match="obs_y"):
        LikelihoodWeightedKL(num_prior_samples=10).prepare(model, AutoLWFlow(model), torch.zeros(3))


def test_num_components_must_be_positive():
    with pytest.raises(ValueError, match="num_components"):
        AutoLWFlow(factor_model, num_components=0)


def _nan_model(theta_nan_below):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        ll = torch.where(x < theta_nan_below, torch.full_like(x, math.nan), -0.5 * x**2)
        pyro.factor("loglik", ll)

    return model


def test_nan_likelihoods_are_dropped_with_a_count():
    model = _nan_model(0.0)
    loss = LikelihoodWeightedKL(num_prior_samples=1000)
    with pytest.warns(UserWarning, match=r"Dropped \d+ of 1000 draws"):
        draws = loss.prepare(model, AutoLWFlow(model))
    assert 400 < len(draws) < 600 and torch.isfinite(draws.log_likelihood).all()


def test_all_nan_is_an_error():
    model = _nan_model(math.inf)
    with pytest.raises(ValueError, match="NaN or \\+inf for all"):
        LikelihoodWeightedKL(num_prior_samples=100).prepare(model, AutoLWFlow(model))


def test_zero_likelihood_everywhere_is_an_error():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("loglik", torch.full_like(x, -math.inf))

    with pytest.raises(ValueError, match="likelihood is zero"):
        LikelihoodWeightedKL(num_prior_samples=100).prepare(model, AutoLWFlow(model))


def test_weights_that_underflow_float32_still_work():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("loglik", -1e5 + dist.Normal(0.5, 0.3).log_prob(x))

    draws = LikelihoodWeightedKL(num_prior_samples=5000).prepare(model, AutoLWFlow(model))
    assert torch.isfinite(draws.weights).all() and abs(float(draws.weights.sum()) - 1) < 1e-9
    assert draws.ess > 500
    assert math.isclose(draws.log_evidence, -1e5 + math.log(0.5), rel_tol=1e-5)


def test_tiny_ess_warns_with_advice():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
        pyro.factor("loglik", dist.Normal(0.0, 0.05).expand([3]).to_event(1).log_prob(x))

    with pytest.warns(UserWarning, match="effective sample size of only .*num_prior_samples"):
        LikelihoodWeightedKL(num_prior_samples=2000).prepare(model, AutoLWFlow(model))
