"""ArviZ export: every group with the right shapes and values, ArviZ's tools on it, netCDF round trip."""

import json

import arviz as az
import matplotlib.pyplot
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_lwflow
from pyro_lwflow import Schedule, fit
from pyro_lwflow.arviz import to_arviz

from .toy_models import conjugate_normal, example_y, factor_model, scale_model

CHAINS, DRAWS = 4, 100


def small_fit(model, *args, **kwargs):
    """A fit of a few seconds (one round where fit() has adaptive rounds)."""
    kwargs.setdefault("num_components", 1)
    return fit(model, *args, schedule=Schedule.one_shot(10_000, num_steps=50), batch_size=256, progress=False,
               **kwargs)


@pytest.fixture(scope="module")
def scale_fit():
    y = torch.tensor([0.3, 1.1, -0.4, 0.8, 0.5, 1.4])
    pyro.set_rng_seed(0)
    return small_fit(scale_model, y), y


def test_groups_shapes_and_attrs(scale_fit):
    result, y = scale_fit
    idata = to_arviz(result, num_samples=CHAINS * DRAWS + 3, num_chains=CHAINS)
    assert set(idata.groups()) == {
        "posterior", "sample_stats", "log_likelihood", "prior", "sample_stats_prior", "observed_data"
    }
    n = len(result.draws)
    for name in ("loc", "scale"):
        assert idata.posterior[name].shape == (CHAINS, DRAWS)
        assert idata.prior[name].shape == (1, n)
    assert (idata.posterior["scale"] > 0).all() and (idata.prior["scale"] > 0).all()
    assert idata.log_likelihood["y"].shape == (CHAINS, DRAWS, len(y))
    assert set(idata.sample_stats.data_vars) == {"log_q", "lp", "log_weight"}
    assert all(v.shape == (CHAINS, DRAWS) for v in idata.sample_stats.data_vars.values())
    assert set(idata.sample_stats_prior.data_vars) == {
        "log_likelihood", "log_prior", "log_proposal", "log_weight", "psis_log_weight", "source"
    }
    assert all(v.shape == (1, n) for v in idata.sample_stats_prior.data_vars.values())
    np.testing.assert_allclose(idata.observed_data["y"].values, y.numpy())
    for attrs in (idata.attrs, idata.posterior.attrs):
        assert attrs["pyro_lwflow_version"] == pyro_lwflow.__version__
        assert attrs["log_evidence"] == pytest.approx(result.log_evidence)
        assert attrs["ess"] == pytest.approx(result.ess)
        assert attrs["num_likelihood_evals"] == result.num_likelihood_evals
        assert attrs["seed"] == 0 and 0 < attrs["guide_ess"] <= CHAINS * DRAWS
        assert json.loads(attrs["settings"])["num_components"] == 1


def test_values_match_the_model_and_the_guide(scale_fit):
    result, y = scale_fit
    idata = to_arviz(result, num_samples=CHAINS * DRAWS, num_chains=CHAINS)
    loc = torch.as_tensor(idata.posterior["loc"].values).reshape(-1)
    scale = torch.as_tensor(idata.posterior["scale"].values).reshape(-1)
    pointwise = dist.Normal(loc[:, None], scale[:, None]).log_prob(y)
    np.testing.assert_allclose(idata.log_likelihood["y"].values.reshape(-1, len(y)), pointwise, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        log_q = result.guide.log_density({"loc": loc, "scale": scale})
    np.testing.assert_allclose(idata.sample_stats["log_q"].values.reshape(-1), log_q, rtol=1e-5, atol=1e-4)
    # prior draws: the unconstrained latents mapped back (scale = exp(u)), weights as in the draws
    np.testing.assert_allclose(idata.prior["scale"].values[0], result.draws.latents[:, 1].exp(), rtol=1e-5)
    np.testing.assert_allclose(idata.sample_stats_prior["log_weight"].values[0], result.draws.log_weights)
    psis = np.exp(idata.sample_stats_prior["psis_log_weight"].values[0])
    assert psis.sum() == pytest.approx(1.0)


def test_same_seed_same_draws(scale_fit):
    result, _ = scale_fit
    a = to_arviz(result, num_samples=200, seed=5)
    b = to_arviz(result, num_samples=200, seed=5)
    np.testing.assert_array_equal(a.posterior["loc"].values, b.posterior["loc"].values)


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto distribution:UserWarning")
@pytest.mark.filterwarnings("ignore:For one or more samples the posterior variance:UserWarning")
def test_arviz_tools_run(scale_fit):
    result, y = scale_fit
    idata = to_arviz(result, num_samples=CHAINS * DRAWS, num_chains=CHAINS)
    summary = az.summary(idata)
    assert list(summary.index) == ["loc", "scale"] and (summary["r_hat"] < 1.1).all()
    loo = az.loo(idata, pointwise=True)
    assert loo.n_data_points == len(y) and np.isfinite(loo.elpd_loo)
    assert np.isfinite(az.waic(idata).elpd_waic)
    axes = az.plot_pair(idata, var_names=["loc", "scale"])
    matplotlib.pyplot.close(np.ravel(axes)[0].figure)


def test_netcdf_round_trip(scale_fit, tmp_path):
    result, _ = scale_fit
    idata = to_arviz(result, num_samples=CHAINS * DRAWS, num_chains=CHAINS)
    path = tmp_path / "posterior.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, value in idata[group].data_vars.items():
            np.testing.assert_array_equal(back[group][name].values, value.values)
    assert back.attrs["settings"] == idata.attrs["settings"]
    assert back.posterior.attrs["log_evidence"] == pytest.approx(idata.attrs["log_evidence"])
    back.close()


def test_factor_and_vector_sites():
    """A pyro.factor likelihood gives one value per draw and no observed data; a vector-valued
    observed site in a plate gives one value per data point (its event summed)."""
    target = torch.tensor([1.0, -0.5])
    idata = to_arviz(small_fit(factor_model, target), num_samples=CHAINS * DRAWS, num_chains=CHAINS)
    assert idata.posterior["theta"].shape == (CHAINS, DRAWS, 2)
    assert idata.log_likelihood["loglik"].shape == (CHAINS, DRAWS)
    assert "observed_data" not in idata.groups()
    theta = torch.as_tensor(idata.posterior["theta"].values)
    expected = dist.Normal(target, 1.0).to_event(1).log_prob(theta)
    np.testing.assert_allclose(idata.log_likelihood["loglik"].values, expected, rtol=1e-5, atol=1e-5)

    y = example_y(4)
    idata = to_arviz(small_fit(conjugate_normal, y), num_samples=CHAINS * DRAWS, num_chains=CHAINS)
    assert idata.log_likelihood["y"].shape == (CHAINS, DRAWS, 4)
    assert idata.observed_data["y"].shape == (4, 2)


def test_needs_enough_samples(scale_fit):
    with pytest.raises(ValueError, match="num_samples >= num_chains"):
        to_arviz(scale_fit[0], num_samples=3, num_chains=4)


def scale_model_scalar(y):
    """scale_model written with Python floats: it cannot be traced for many draws at once."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(float(loc), float(scale)), obs=y)


def test_unvectorisable_model_is_traced_draw_by_draw(scale_fit):
    result, y = scale_fit
    with pytest.warns(UserWarning, match="one draw at a time"):
        idata = to_arviz(result, num_samples=40, num_chains=2, model=scale_model_scalar, max_prior_draws=50)
    loc = torch.as_tensor(idata.posterior["loc"].values).reshape(-1, 1)
    scale = torch.as_tensor(idata.posterior["scale"].values).reshape(-1, 1)
    expected = dist.Normal(loc, scale).log_prob(y)
    np.testing.assert_allclose(idata.log_likelihood["y"].values.reshape(-1, len(y)), expected, rtol=1e-5, atol=1e-5)
    assert idata.prior["loc"].shape == (1, 50)
