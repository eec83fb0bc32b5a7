"""The schedule of a fit: budget, tempering to a tight posterior, gradient-informed starts, honest evidence."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lwflow import AutoLWFlow, RoundSummary, Schedule, WeightedDraws, fit
from pyro_lwflow.adapter import PriorAdapter
from pyro_lwflow.fit import MIN_PART, _Run
from pyro_lwflow.loss import LikelihoodWeightedKL
from pyro_lwflow.metrics import mode_weight_error
from pyro_lwflow.starts import find_optima, is_differentiable

from .test_adaptive import _box_mixture_model

SMALL_FLOW = {"num_transforms": 2, "hidden_dims": (16,), "marginal_bins": None}

# a tight regression: 3 coefficients with Normal(0, 10) priors, known noise 0.1, 50 points, so the
# posterior sds (~0.014) are ~1/700 of the prior's and the exact posterior is Gaussian
_GEN = torch.Generator().manual_seed(0)
X = torch.randn(50, 3, generator=_GEN)
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(50, generator=_GEN)


def tight_regression(x, y):
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), 0.1), obs=y)


def _exact_posterior():
    precision = X.T @ X / 0.01 + torch.eye(3) / 100.0
    cov = torch.linalg.inv(precision)
    return cov @ (X.T @ Y) / 0.01, cov.diagonal().sqrt()


def _exact_log_evidence() -> float:
    x = X.double()
    cov = 0.01 * torch.eye(50, dtype=torch.float64) + 100.0 * x @ x.T
    return float(dist.MultivariateNormal(torch.zeros(50, dtype=torch.float64), cov).log_prob(Y.double()))


def _check_regression(result):
    mean, sd = _exact_posterior()
    draws = result.sample(20_000)["beta"]
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.1
    ratio = draws.std(0) / sd
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio
    assert result.pareto_k < 0.7 and result.rounds[-1].beta == 1.0


@pytest.mark.slow
def test_gradient_start_lands_on_a_tight_posterior_at_beta_one():
    guide = AutoLWFlow(tight_regression, num_components=1, **SMALL_FLOW)
    schedule = Schedule(target_ess=5_000, num_steps=300, warm_steps=150)
    result = fit(tight_regression, X, Y, guide=guide, schedule=schedule, progress=False)
    assert result.rounds[0].source == "optima" and result.rounds[0].beta == 1.0
    assert 0 < result.num_gradient_evals < result.num_likelihood_evals < 50_000
    assert result.num_evals == result.num_gradient_evals + result.num_likelihood_evals
    _check_regression(result)
    # every round's own estimate combined: the pooled weights' estimate was 14 stderr low on a 7-D regression
    assert abs(result.log_evidence - _exact_log_evidence()) < 4 * result.log_evidence_stderr


def test_multistart_lbfgs_finds_both_modes_and_counts_its_gradients():
    model, truth = _box_mixture_model([[-5.0, 0.0], [5.0, 2.0]], 0.7, [0.3, 0.7])
    guide = AutoLWFlow(model).setup()
    adapter = PriorAdapter(model, guide.prototype_trace)
    prior = adapter.tracer.prior_latents(2_000)
    assert is_differentiable(adapter.tracer, prior)
    optima, count = find_optima(adapter.tracer, prior, num_starts=32)
    assert len(optima) == 2 and count >= 32
    found = torch.stack([adapter.unpack(o.loc[None].float())["theta"][0] for o in optima])
    found = found[found[:, 0].argsort()]
    # optima of the unconstrained log joint: the box's Jacobian pulls them a little toward the centre
    assert torch.allclose(found, torch.tensor([[-5.0, 0.0], [5.0, 2.0]]), atol=0.1)
    log_z = torch.tensor([o.laplace_log_evidence for o in optima])
    assert abs(float(torch.softmax(log_z, 0).max()) - 0.7) < 0.02  # the Laplace weights of Gaussian modes


@pytest.mark.slow
def test_the_gradient_start_keeps_both_modes_through_the_fit():
    model, truth = _box_mixture_model([[-5.0, 0.0], [5.0, 2.0]], 0.7, [0.3, 0.7])
    result = fit(model, schedule=Schedule(num_steps=200, warm_steps=100, target_ess=5_000), progress=False)
    assert result.rounds[0].source == "optima" and result.num_components == 2
    assert result.num_evals <= 30_000
    assert mode_weight_error(truth.component_log_probs, truth.weights, result.sample(10_000)["theta"]) < 0.02
    assert abs(result.log_evidence - truth.log_evidence) < 4 * result.log_evidence_stderr + 0.005


@pytest.mark.slow
def test_the_stop_waits_until_the_mode_weights_are_known():
    model, truth = _box_mixture_model([[-5.0, 0.0], [5.0, 2.0]], 0.7, [0.3, 0.7])
    schedule = Schedule(num_steps=200, warm_steps=100, target_ess=2_000, initial_draws=3_000, mode_weight_stderr=0.005)
    result = fit(model, schedule=schedule, progress=False)
    stderr = result.guide.mixture_weight_stderr(result.draws)
    assert result.num_components == 2 and float(stderr.max()) <= 0.005
    assert result.ess > 3 * schedule.target_ess  # 0.3 · 0.7 / 0.005² ≈ 8,400 iid draws would do it
    weights = torch.softmax(result.guide.mixture_logits.detach(), 0)
    order = torch.argsort(weights)
    assert ((weights[order] - torch.tensor([0.3, 0.7])).abs() < 4 * stderr[order]).all()  # honest errors
    without = fit(model, schedule=schedule.with_(mode_weight_stderr=None), progress=False)
    assert without.ess < 0.5 * result.ess


def test_the_automatic_mode_weight_tolerance_scales_with_the_target_on_the_gradient_path():
    assert Schedule().mode_weight_tolerance(from_optima=True) == pytest.approx(0.0025)
    assert Schedule(target_ess=5_000).mode_weight_tolerance(from_optima=True) == pytest.approx(0.005)
    assert Schedule().mode_weight_tolerance(from_optima=False) is None  # gradient-free: ESS alone
    assert Schedule(mode_weight_stderr=0.01).mode_weight_tolerance(from_optima=False) == 0.01
    assert Schedule(mode_weight_stderr=None).mode_weight_tolerance(from_optima=True) is None


def test_round_zero_is_a_thousand_draws_per_dimension():
    # from the prior at least 4,000 (round 0 only has to carry β to where the tempered rounds take over),
    # from gradient optima at least 10,000
    assert [Schedule().first_round_draws(d, from_optima=False) for d in (2, 10)] == [4_000, 10_000]
    assert [Schedule().first_round_draws(d, from_optima=True) for d in (2, 20)] == [10_000, 20_000]
    assert Schedule(initial_draws=3_000).first_round_draws(10, from_optima=False) == 3_000


def black_box(y):
    """A NumPy likelihood in a pyro.factor: no torch gradient."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    value = -0.5 * np.sum((y.numpy() - mu.detach().numpy()[..., None]) ** 2, axis=-1)
    pyro.factor("loglik", torch.as_tensor(value))


def test_a_black_box_keeps_the_gradient_free_path():
    y = torch.tensor([0.5, 1.0, 1.5])
    schedule = Schedule(num_steps=30, warm_steps=20, target_ess=2_000, initial_draws=4_000)
    result = fit(black_box, y, num_components=1, schedule=schedule, progress=False)
    assert result.num_gradient_evals == 0 and result.rounds[0].source == "prior"
    with pytest.raises(ValueError, match=r"starts='gradient'\) needs a log-likelihood that is differentiable"):
        fit(black_box, y, schedule=schedule.with_(starts="gradient"), progress=False)


def test_rounds_are_typed_and_the_budget_is_kept():
    model, _ = _box_mixture_model([[-5.0, 0.0], [5.0, 2.0]], 0.7, [0.3, 0.7])
    seen = []
    # a budget that runs out before β reaches 1 (8,000 reaches it in round 2)
    schedule = Schedule(budget=6_000, initial_draws=3_000, starts="prior", num_steps=30, warm_steps=20)
    with pytest.warns(UserWarning, match=r"β = .* < 1 after .* model evaluations \(budget 6,000\)"):
        result = fit(model, schedule=schedule, progress=False, callback=lambda g, s: seen.append(s))
    assert result.num_evals <= 6_000 and seen == result.rounds
    assert all(isinstance(r, RoundSummary) for r in result.rounds)
    first = result.rounds[0]
    assert first.num_draws == 3_000 and first.num_likelihood_evals == 3_000 and first.num_steps == 30
    assert "calls=3,000" in first.line()


@pytest.mark.parametrize("changes, field", [({"budget": 0}, "budget"), ({"defensive": 1.0}, "defensive"),
                                            ({"starts": "lbfgs"}, "starts"), ({"num_rounds": 0}, "num_rounds"),
                                            ({"mode_weight_stderr": 0.0}, "mode_weight_stderr")])
def test_a_bad_schedule_names_its_field(changes, field):
    with pytest.raises(ValueError, match=f"Schedule.{field}"):
        Schedule(**changes)


def _weights(log_w: torch.Tensor) -> WeightedDraws:
    n = len(log_w)
    zeros = torch.zeros(n, dtype=torch.float64)
    return WeightedDraws(torch.zeros(n, 1), log_w.double(), zeros, zeros)


def test_degenerate_weights_have_no_small_stderr():
    gen = torch.Generator().manual_seed(0)
    # prior draws under a likelihood 10⁻⁵ as wide as the prior: a handful of draws carry the weight
    theta = torch.randn(20_000, generator=gen, dtype=torch.float64)
    degenerate = _weights(-0.5 * (theta / 1e-5) ** 2)
    assert degenerate.ess < 10 and degenerate.log_evidence_stderr == math.inf
    # Pareto tail with shape 0.9: plenty of draws by ESS, but the tail decides the mean
    u = torch.rand(20_000, generator=gen, dtype=torch.float64)
    tail = _weights(-0.9 * torch.log(u))
    assert tail.ess > 10 and tail.log_evidence_stderr == math.inf
    # Pareto tail with shape 0.6 (infinite variance; its exact quantiles): the delta method alone is too small
    u = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
    heavy = _weights(-0.6 * torch.log(u))
    lw = heavy.log_weights
    w = torch.exp(lw - lw.max())
    delta = float(w.std() / (w.mean() * math.sqrt(len(w))))
    assert heavy.log_evidence_stderr > delta
    # light-tailed weights keep the delta method
    light = _weights(0.1 * torch.randn(20_000, generator=gen, dtype=torch.float64))
    lw = light.log_weights
    w = torch.exp(lw - lw.max())
    assert light.log_evidence_stderr == pytest.approx(float(w.std() / (w.mean() * math.sqrt(len(w)))))


def test_an_unreliable_fit_says_so_and_what_to_do():
    model, _ = _box_mixture_model([[-5.0, 0.0], [5.0, 2.0]], 0.05, [0.3, 0.7])  # tiny modes in a wide box
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, num_components=1, schedule=Schedule.one_shot(2_000, num_steps=5), progress=False)
    assert result.ess < 10 and result.log_evidence_stderr == math.inf
    assert any("effective sample size of only" in str(w.message) and "initial_draws" in str(w.message) for w in caught)


def test_each_round_reports_its_calls_per_effective_draw():
    """Calls per ESS gained (per round) and per ESS (cumulative) on a seeded fit whose ESS grows."""
    y = torch.tensor([0.5, 1.0, 1.5])
    schedule = Schedule(num_steps=30, warm_steps=20, target_ess=3_000, round_ess=1_000, initial_draws=2_000,
                        starts="prior")
    result = fit(black_box, y, num_components=1, schedule=schedule, progress=False, seed=0)
    assert len(result.rounds) >= 2
    previous_ess, previous_calls = 0.0, 0
    for r in result.rounds:
        gained = r.ess - previous_ess
        assert r.total_calls_per_ess == pytest.approx(r.num_evals / r.ess)
        if gained > 0:
            assert math.isfinite(r.calls_per_ess) and r.calls_per_ess > 0
            assert r.calls_per_ess == pytest.approx((r.num_evals - previous_calls) / gained)
        else:
            assert r.calls_per_ess == math.inf
        assert f"calls/ΔESS={r.calls_per_ess:.3g}" in r.line() and f"calls/ESS={r.total_calls_per_ess:.3g}" in r.line()
        previous_ess, previous_calls = r.ess, r.num_evals
    # the ESS grows every round here, so every round bought effective draws at a finite price
    assert all(b.ess > a.ess for a, b in zip(result.rounds, result.rounds[1:], strict=False))
    assert all(math.isfinite(r.calls_per_ess) and r.calls_per_ess > 0 for r in result.rounds)


def test_a_round_at_beta_one_stops_drawing_once_the_target_is_met():
    """The last round is sized from the previous guide's efficiency; the one just trained is better,
    so drawing all of it would overshoot ``target_ess`` (here by 42 %: 14,499 draws, ESS 14,240):
    it is drawn in parts and stops at the first part that meets the target."""
    y = torch.tensor([0.5, 1.0, 1.5])
    schedule = Schedule(num_steps=30, warm_steps=20, target_ess=10_000, round_ess=300, initial_draws=2_000,
                        starts="prior")
    result = fit(black_box, y, num_components=1, schedule=schedule, progress=False, seed=0)
    last = result.rounds[-1]
    assert last.beta == 1.0 and schedule.target_ess <= last.ess < 1.15 * schedule.target_ess


def test_a_tempered_round_stops_drawing_once_it_holds_what_it_was_planned_for():
    """A tempered round is planned from an assumed efficiency (0.8 after round 0: 8,333 draws for
    2 · round_ess = 6,000 effective); the guide proposes at 0.91, so drawing all of it overshoots by
    27 % (own ESS 7,594), and parts of 1,042 draws by up to one part (6,629). Its first part (1,042)
    measures the efficiency, the next draws what that says is missing, so it ends within one
    ``MIN_PART`` of 6,000."""
    y = torch.linspace(0.0, 2.0, 20)
    schedule = Schedule(num_steps=30, warm_steps=20, round_ess=3_000, initial_draws=8_000, starts="prior",
                        max_rounds=2)
    with pytest.warns(UserWarning, match="Stopped at likelihood temperature"):
        result = fit(black_box, y, num_components=1, schedule=schedule, progress=False, seed=0)
    tempered = result.rounds[1]
    own_ess = tempered.efficiency * tempered.num_draws
    need = 2 * schedule.round_ess
    assert result.rounds[0].beta < 1.0 and need <= own_ess < need + MIN_PART and tempered.num_draws < 8_333


def test_a_tempered_round_whose_proposal_missed_ends_after_its_first_part():
    """Black box, y ~ N(mu, 1) with 20 points: at β = 0.5 the tempered posterior is N(1, 0.32²).
    A round planned for 8,000 draws from a proposal there draws until it holds 2 · round_ess; from
    one at mu = 3 (6 sds off: 15 effective draws in 1,000, its defensive prior draws) it stops after
    its first 1,000 draws (without the early end it draws all 8,000)."""
    y = torch.linspace(0.0, 2.0, 20)
    schedule = Schedule(round_ess=1_000, initial_draws=2_000, starts="prior")
    guide = AutoLWFlow(black_box, num_components=1)
    guide.setup(y)
    loss = LikelihoodWeightedKL(progress=False)
    drawn = {}
    for centre in (1.0, 3.0):
        pyro.set_rng_seed(0)
        run = _Run(schedule, loss.make_adapter(black_box, guide.prototype_trace, (y,), {}), guide, loss, False)
        run.start(min_ess=0.0)
        run.beta, run.next_draws = 0.5, 8_000
        run.next_proposal = dist.Normal(torch.tensor([centre]), 0.32).to_event(1)
        run.draw_from_guide()
        drawn[centre] = run.pool.proposals[-1].count
    assert 2 * schedule.round_ess / 0.9 < drawn[1.0] < 8_000 and drawn[3.0] == 1_000


def test_a_hand_made_round_summary_keeps_its_fields_and_prints_unknown_ratios():
    summary = RoundSummary(0, 1.0, 100, 100, 0, 100, 50.0, 0.1, 50.0, 0.5, -1.0, 0.01, 1, 10, 0.1, "prior")
    assert math.isnan(summary.calls_per_ess) and "calls/ΔESS=–" in summary.line()
    assert "calls/ESS=∞" in RoundSummary(**{**summary.__dict__, "total_calls_per_ess": math.inf}).line()


def test_the_progress_bar_shows_training_steps_and_the_held_out_loss(capsys):
    y = torch.tensor([0.5, 1.0, 1.5])
    schedule = Schedule(num_steps=50, warm_steps=50, target_ess=3_000, round_ess=1_000, initial_draws=2_000,
                        starts="prior")
    quiet = fit(black_box, y, num_components=1, schedule=schedule, progress=False, seed=0)
    capsys.readouterr()
    shown = fit(black_box, y, num_components=1, schedule=schedule, progress=True, seed=0)
    err = capsys.readouterr().err
    assert "training step 25/50 loss " in err  # the first, cold round: the running minibatch loss
    assert len(shown.rounds) >= 2 and "step 25/50 held-out " in err  # warm rounds: the held-out loss
    # showing progress changes nothing the fit computes
    assert shown.losses == quiet.losses and torch.equal(shown.draws.latents, quiet.draws.latents)
