"""The Lotka–Volterra example (models/ode_models.py): a SciPy ODE behind pyro.factor, fitted without gradients."""

import importlib
import json
import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from pyro_lwflow import AutoLWFlow, Schedule, cli, fit, models
from pyro_lwflow.adapter import PriorAdapter
from pyro_lwflow.model_files import bundled_models
from pyro_lwflow.starts import is_differentiable

ode_models = importlib.import_module("pyro_lwflow.models.ode_models")
SMALL_FLOW = {"num_transforms": 2, "hidden_dims": (16,), "marginal_bins": None}
MODEL = ode_models.lotka_volterra
TRUE = np.array([ode_models.TRUE_PARAMS[s] for s in ode_models.SITES])


def _prior_params(n: int, seed: int = 0) -> np.ndarray:
    loc = np.array([ode_models.PRIOR_LOC[s] for s in ode_models.SITES])
    return np.exp(loc + ode_models.PRIOR_SCALE * np.random.default_rng(seed).standard_normal((n, 4)))


def _factor(values: dict[str, torch.Tensor], y: torch.Tensor, n: int | None) -> torch.Tensor:
    """The model's ``likelihood`` factor at given rates, traced under a particle plate of ``n`` (or once)."""
    conditioned = poutine.condition(MODEL, data=values)
    if n is None:
        trace = poutine.trace(conditioned).get_trace(y)
    else:
        with pyro.plate("particles", n, dim=-1):
            trace = poutine.trace(conditioned).get_trace(y)
    site = trace.nodes["likelihood"]
    return site["fn"].log_prob(site["value"])


def test_loadable_by_name_and_listed():
    assert models.load("ode_models:lotka_volterra") is MODEL
    assert "ode_models:lotka_volterra" in models.names()
    assert bundled_models()["ode_models.py:lotka_volterra"] is MODEL
    assert set(MODEL.true_params) == set(ode_models.SITES)


def test_example_data_is_fixed_positive_and_shaped():
    y = MODEL.example_data()
    assert y.shape == (len(ode_models.TIMES), 2) and y.dtype == torch.float32
    assert (y > 0).all() and torch.equal(y, MODEL.example_data())
    # the data follow the true trajectory within the noise: log residuals have sd ≈ NOISE
    resid = np.log(y.numpy()) - ode_models.solve(TRUE[None])[0]
    assert abs(resid.mean()) < 3 * ode_models.NOISE / math.sqrt(resid.size)
    assert 0.7 * ode_models.NOISE < resid.std() < 1.3 * ode_models.NOISE


def test_simulate_shapes_and_noise():
    params = _prior_params(5)
    assert MODEL.simulate(params, rng=1).shape == (5, len(ode_models.TIMES), 2)
    assert MODEL.simulate(params[0], rng=1).shape == (len(ode_models.TIMES), 2)
    many = MODEL.simulate(np.repeat(TRUE[None], 200, 0), rng=2)
    resid = np.log(many) - ode_models.solve(TRUE[None])
    assert abs(resid.std() - ode_models.NOISE) < 0.05 * ode_models.NOISE


def test_likelihood_is_finite_at_the_truth_and_peaks_near_it():
    y = MODEL.example_data().numpy()
    at_truth = ode_models.log_likelihood(TRUE[None], y)
    prior = ode_models.log_likelihood(_prior_params(500), y)
    assert at_truth.shape == (1,) and np.isfinite(at_truth).all()
    assert prior.shape == (500,) and not np.isnan(prior).any()
    assert at_truth[0] > prior.max()  # 500 prior draws are nowhere near a posterior this tight
    # a failed or impossible draw is a zero likelihood, not an error
    bad = ode_models.log_likelihood(np.array([[np.nan, 0.1, 1.0, 0.1], [-1.0, 0.1, 1.0, 0.1]]), y)
    assert np.all(bad == -np.inf)


def test_a_batch_of_draws_agrees_with_one_draw_at_a_time():
    y = MODEL.example_data()
    near = TRUE * np.exp(0.02 * np.random.default_rng(1).standard_normal((10, 4)))  # in the posterior
    params = np.concatenate([_prior_params(30), near])
    values = {s: torch.as_tensor(params[:, i], dtype=torch.float32) for i, s in enumerate(ode_models.SITES)}
    batch = _factor(values, y, len(params))
    assert batch.shape == (len(params),)
    single = torch.stack([_factor({s: v[i] for s, v in values.items()}, y, None) for i in range(len(params))])
    assert single.shape == (len(params),)
    # the stacked solve shares one step size: agreement to solver accuracy (float32 factor values)
    assert torch.allclose(batch.double(), single.double(), rtol=1e-5, atol=1e-2)
    direct = ode_models.log_likelihood(params.astype(np.float32).astype(np.float64), y.numpy())
    np.testing.assert_allclose(batch.double().numpy(), direct, rtol=1e-5, atol=1e-2)


def test_it_is_a_black_box_so_fit_takes_the_prior_path():
    y = MODEL.example_data()
    guide = AutoLWFlow(MODEL, num_components=1, **SMALL_FLOW)
    guide.setup(y)
    adapter = PriorAdapter(MODEL, guide.prototype_trace, (y,))
    latents = adapter.tracer.prior_latents(200)
    assert not is_differentiable(adapter.tracer, latents)
    assert adapter.tracer.vectorized  # all draws of a chunk reach SciPy in one call
    with pytest.raises(ValueError, match=r"starts='gradient'\) needs a log-likelihood that is differentiable"):
        fit(MODEL, y, num_components=1, schedule=Schedule(starts="gradient", num_steps=5), progress=False)
    # a gradient-based sampler cannot run it: the rates it hands the model require grad
    with pytest.raises(RuntimeError, match="requires grad"):
        _factor({s: torch.tensor(v, requires_grad=True) for s, v in ode_models.TRUE_PARAMS.items()}, y, None)


@pytest.mark.slow
def test_the_gradient_free_fit_matches_an_importance_sampling_reference():
    """Seeded: a small flow at a small ESS target, from the prior (the default for a black box), against
    an independent adaptive importance-sampling reference (ESS ≈ 15,000, Pareto k̂ < 0)."""
    y = MODEL.example_data()
    guide = AutoLWFlow(MODEL, num_components=1, **SMALL_FLOW)
    schedule = Schedule(budget=150_000, target_ess=3_000, num_steps=300, warm_steps=150)
    result = fit(MODEL, y, guide=guide, schedule=schedule, seed=0, progress=False)
    assert result.num_gradient_evals == 0 and result.rounds[0].source == "prior"
    assert result.rounds[-1].beta == 1.0 and result.pareto_k < 0.7 and result.num_evals <= schedule.budget
    ref = MODEL.reference_posterior(y, num_draws=20_000, stage_draws=5_000, seed=0)
    assert ref["ess"] > 5_000 and ref["pareto_k"] < 0.5
    draws = result.sample(20_000)
    mean = np.array([float(draws[s].mean()) for s in ode_models.SITES])
    sd = np.array([float(draws[s].std()) for s in ode_models.SITES])
    assert np.all(np.abs(mean - ref["mean"]) < 0.2 * ref["sd"]), (mean - ref["mean"]) / ref["sd"]
    assert np.all((sd / ref["sd"] > 0.85) & (sd / ref["sd"] < 1.15)), sd / ref["sd"]
    assert np.all(np.abs(TRUE - ref["mean"]) < 4 * ref["sd"])  # the data were simulated at the truth
    stderr = math.hypot(result.log_evidence_stderr, ref["log_evidence_stderr"])
    assert abs(result.log_evidence - ref["log_evidence"]) < 4 * stderr + 0.01


def test_lwflow_fit_runs_it_from_the_command_line(tmp_path, capsys):
    """Plumbing only (one small prior round); the example data come from ``.example_data()``."""
    out = tmp_path / "out"
    small = ["--steps", "30", "--initial-draws", "4000", "--batch-size", "256", "--num-samples", "400", "--quiet",
             "--rounds", "1", "--components", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown by the command (its own printer), not raised
        assert cli.main(["fit", "ode_models.py:lotka_volterra", "--out", str(out), *small]) == 0
    # one round of prior draws cannot reach a posterior this tight, and the command says so
    assert "effective sample size of only" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_gradient_evals"] == 0 and metrics["num_likelihood_evals"] == 4_000
    assert np.isfinite(metrics["log_evidence"])
    assert {"posterior.nc", "summary.csv", "pair_plot.png"} <= {p.name for p in out.iterdir()}
