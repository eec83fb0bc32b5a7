import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL

from .toy_models import factor_model


def test_draws_are_cached_and_redrawn_when_the_data_change():
    loss = LikelihoodWeightedKL(num_prior_samples=2000, batch_size=64)
    guide = AutoLWFlow(factor_model)
    svi = SVI(factor_model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    a = torch.tensor([1.0, 1.0])
    svi.step(a)
    first = loss.draws
    svi.step(a.clone())
    assert loss.draws is first and loss.num_likelihood_evals == 2000
    svi.step(torch.tensor([2.0, 1.0]))
    assert loss.draws is not first and loss.num_likelihood_evals == 4000


@pytest.mark.parametrize("estimator", ["resample", "weighted"])
def test_both_estimators_are_unbiased_for_the_full_loss(estimator):
    target = torch.tensor([1.0, -1.0])
    guide = AutoLWFlow(factor_model, num_components=2)
    loss = LikelihoodWeightedKL(num_prior_samples=5000, batch_size=2000, estimator=estimator)
    draws = loss.prepare(factor_model, guide, target)
    with torch.no_grad():
        exact = -float((draws.weights * guide.latent_log_prob(draws.latents).double()).sum())
        estimates = torch.tensor([loss.loss(factor_model, guide, target) for _ in range(200)])
    assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / 200**0.5 + 1e-3


def test_bad_estimator_name():
    with pytest.raises(ValueError, match="estimator"):
        LikelihoodWeightedKL(estimator="importance")


def test_numpy_arguments_do_not_force_a_redraw():
    import numpy as np

    def model(target):
        theta = pyro.sample("theta", pyro.distributions.Normal(0.0, 3.0).expand([2]).to_event(1))
        pyro.factor("lik", pyro.distributions.Normal(torch.as_tensor(target), 1.0).to_event(1).log_prob(theta))

    loss = LikelihoodWeightedKL(num_prior_samples=1000, batch_size=64)
    svi = SVI(model, AutoLWFlow(model), pyro.optim.Adam({"lr": 1e-3}), loss)
    target = np.array([1.0, 0.0], dtype=np.float32)
    svi.step(target)
    svi.step(target.copy())
    assert loss.num_likelihood_evals == 1000
    svi.step(target + 1)
    assert loss.num_likelihood_evals == 2000
