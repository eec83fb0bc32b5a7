"""The bundled example models and their exact posteriors (``.truth``), checked independently."""

import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

from pyro_lwflow import metrics, models
from pyro_lwflow.model_files import BUNDLED_MODELS, bundled_models, load_model

SHARED_SPEC = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "paper_targets.json"
SPEC = json.loads((BUNDLED_MODELS / "paper_targets.json").read_text())
TARGETS = ["single_mode_2d", "two_mode_2d", "three_mode_2d", "three_mode_3d", "non_gaussian_3d"]
MIXTURES = [t for t in TARGETS if SPEC["targets"][t]["kind"] == "gaussian_mixture"]


@pytest.mark.skipif(not SHARED_SPEC.exists(), reason="the project's shared/ spec is not beside this checkout")
def test_repo_copy_of_the_spec_matches_shared():
    assert json.loads((BUNDLED_MODELS / "paper_targets.json").read_text()) == json.loads(SHARED_SPEC.read_text())


def test_bundled_models_are_listed():
    names = set(bundled_models())
    assert {f"paper_targets.py:{t}" for t in TARGETS} | {"normal_scale.py:model"} <= names


def _prior_log_likelihood(model, num_draws: int) -> torch.Tensor:
    """``(num_draws,)`` the model's own log-likelihood at draws from its own prior."""
    with pyro.plate("particles", num_draws, dim=-1):
        trace = poutine.trace(model).get_trace()
    site = trace.nodes["likelihood"]
    return site["fn"].log_prob(site["value"]).double()


@pytest.mark.parametrize("name", TARGETS)
def test_truth_evidence_matches_monte_carlo_over_the_prior(name):
    """``truth.log_evidence`` against ``log E_prior[L]`` estimated by running the model itself."""
    model = models.load(f"paper_targets:{name}")
    likelihood = _prior_log_likelihood(model, 400_000).exp()
    estimate = likelihood.mean()
    stderr = float(likelihood.std() / math.sqrt(len(likelihood)) / estimate)  # of log Ẑ, by the delta method
    assert stderr < 0.05
    assert abs(math.log(estimate) - model.truth.log_evidence) < 4 * stderr


@pytest.mark.parametrize("name", TARGETS)
def test_truth_log_prob_is_normalised_on_the_box(name):
    truth = models.load(f"paper_targets:{name}").truth
    x = truth.sample(4000, seed=0)
    assert x.shape == (4000, truth.dim) and (x.abs() <= 12).all()
    # ∫_box exp(log_prob) = 1, by importance sampling from the uniform prior
    u = torch.rand(400_000, truth.dim) * 24 - 12
    density = truth.log_prob(u).double().exp() * 24**truth.dim
    assert abs(float(density.mean()) - 1) < 4 * float(density.std()) / math.sqrt(len(u))


@pytest.mark.parametrize("name", MIXTURES)
def test_truth_draws_have_the_mixtures_moments(name):
    """Exact draws against the mean and covariance of the spec's mixture (box truncation < 1e-4)."""
    spec = SPEC["targets"][name]
    w = torch.tensor(spec["weights"], dtype=torch.float64)
    mu = torch.tensor(spec["means"], dtype=torch.float64)
    cov = torch.tensor(spec["covariances"], dtype=torch.float64)
    mean = w @ mu
    second = torch.einsum("k,kij->ij", w, cov + mu.unsqueeze(-1) * mu.unsqueeze(-2))
    x = models.load(f"paper_targets:{name}").truth.sample(40_000, seed=3).double()
    n = len(x)
    assert torch.all((x.mean(0) - mean).abs() < 4 * x.std(0) / math.sqrt(n))
    products = x.unsqueeze(-1) * x.unsqueeze(-2)
    assert torch.all((products.mean(0) - second).abs() < 4 * products.std(0) / math.sqrt(n))


def test_mixture_fractions_of_exact_draws_match_the_weights():
    truth = models.load("paper_targets:three_mode_2d").truth
    x = truth.sample(20000, seed=1)
    assert metrics.mode_weight_error(truth.component_log_probs, truth.weights, x) < 0.015


def test_truth_is_built_lazily():
    """Importing a model file draws nothing: the box mass is estimated on first use, then cached."""
    truth = models.load("paper_targets:two_mode_2d").truth
    truth.__dict__.pop("box_mass", None)
    state = torch.get_rng_state()
    first = truth.log_evidence
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as found
    assert "box_mass" in truth.__dict__ and truth.log_evidence == first


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.py")
    (tmp_path / "m.py").write_text("def other():\n    pass\n")
    with pytest.raises(AttributeError, match="no model function 'model'.*other"):
        load_model(tmp_path / "m.py")
