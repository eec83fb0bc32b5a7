"""The gradient probe of ``starts="auto"``: a model that overflows on part of its prior still vectorises
and gets gradient starts; a model that does not vectorise but has a gradient is climbed one start at a
time, and says why it is traced draw by draw; a NumPy black box keeps the gradient-free path."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lwflow import AutoLWFlow, Schedule, fit
from pyro_lwflow.adapter import PriorAdapter
from pyro_lwflow.starts import find_optima, is_differentiable

from .toy_models import numpy_factor_model

T = 200
QUICK = {"num_steps": 30, "warm_steps": 20, "num_rounds": 1, "num_starts": 8, "initial_draws": 1_000}


def _arma_series(n: int, phi: float = 0.6, theta: float = 0.4, sigma: float = 0.7, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    eps = sigma * torch.randn(n + 50, generator=gen)
    y, prev_y, prev_e = [], 0.0, 0.0
    for e in eps.tolist():
        prev_y = phi * prev_y + theta * prev_e + e
        prev_e = e
        y.append(prev_y)
    return torch.tensor(y[50:])


Y = _arma_series(T)


def arma(y):
    """ARMA(1,1) with a prior on θ wide enough that the residual recursion ``e_t = r_t − θ e_{t−1}``
    overflows for |θ| ≳ 1.25: many draws run a batched recursion (``-inf`` there), one draw a triangular
    solve (NaN there), so the two disagree only where neither is finite."""
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    theta = pyro.sample("theta", dist.Uniform(-2.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    n = y.shape[-1]
    y_lag = torch.cat([y.new_zeros(1), y[:-1]])
    if phi.dim() == 0:
        r = y - phi * y_lag
        a = torch.eye(n) + theta * torch.diag(torch.ones(n - 1), -1)
        e = torch.linalg.solve_triangular(a, r[:, None], upper=False)[:, 0]
        pyro.factor("loglik", dist.Normal(0.0, sigma).log_prob(e).sum())
    else:
        r = y - phi[..., None] * y_lag
        es = [r[..., 0]]
        for t in range(1, n):
            es.append(r[..., t] - theta * es[-1])
        e = torch.stack(es, -1)
        pyro.factor("loglik", dist.Normal(0.0, sigma[..., None]).log_prob(e).sum(-1))


def arma_loop(y):
    """The same ARMA(1,1) as a Python loop of scalar torch ops: differentiable for one draw, but
    under a batch dimension the final ``.sum()`` adds every draw's likelihood into one number."""
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    theta = pyro.sample("theta", dist.Uniform(-2.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    e, prev, terms = y[0] * 0.0, y[0] * 0.0, []
    for t in range(y.shape[-1]):
        e = y[t] - phi * prev - theta * e
        prev = y[t]
        terms.append(e)
    pyro.factor("loglik", dist.Normal(0.0, sigma).log_prob(torch.stack(terms)).sum())


def _tracer(model, *args):
    guide = AutoLWFlow(model).setup(*args)
    return PriorAdapter(model, guide.prototype_trace, args).tracer


def _overflowing_first(tracer, n: int, num_bad: int) -> torch.Tensor:
    """``n`` prior draws, the first ``num_bad`` of them with |θ| > 1.6 (the recursion overflows)."""
    torch.manual_seed(0)
    latents = tracer.prior_latents(4 * n)
    theta = tracer.layout.unpack(latents)["theta"]
    bad = theta.abs() > 1.6
    return torch.cat([latents[bad][:num_bad], latents[~bad], latents[bad][num_bad:]])[:n]


@pytest.mark.parametrize("num_bad", [1, 3, 8])
def test_a_recursion_that_overflows_on_part_of_the_prior_vectorises_and_has_a_gradient(num_bad):
    tracer = _tracer(arma, Y)
    latents = _overflowing_first(tracer, 256, num_bad)
    vec, _ = tracer._vectorized(latents[:num_bad])
    seq = tracer._sequential(latents[:num_bad]).log_likelihood
    assert torch.isneginf(vec).all() and not torch.isfinite(seq).any()  # overflow both ways, but not the same
    assert is_differentiable(tracer, latents)  # (no "one draw at a time" warning: an error under pytest)
    assert tracer.vectorized


def test_gradient_starts_on_an_overflowing_recursion():
    schedule = Schedule(starts="gradient", **QUICK)
    result = fit(arma, Y, schedule=schedule, num_components=1, progress=False, seed=1)
    assert result.num_gradient_evals > 0 and result.rounds[0].source == "optima"
    phi, theta = (result.sample(2_000)[k].mean() for k in ("phi", "theta"))
    assert abs(float(phi) - 0.6) < 0.2 and abs(float(theta) - 0.4) < 0.2
    auto = fit(arma, Y, schedule=schedule.with_(starts="auto"), num_components=1, progress=False, seed=1)
    assert auto.rounds[0].source == "optima"


def test_a_non_vectorised_model_with_a_gradient_is_climbed_one_start_at_a_time():
    batch_dims = []

    def model(y):
        phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
        batch_dims.append(phi.dim())
        theta = pyro.sample("theta", dist.Uniform(-2.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        e, prev, terms = y[0] * 0.0, y[0] * 0.0, []
        for t in range(y.shape[-1]):
            e = y[t] - phi * prev - theta * e
            prev = y[t]
            terms.append(e)
        pyro.factor("loglik", dist.Normal(0.0, sigma).log_prob(torch.stack(terms)).sum())

    y = Y[:60]
    tracer = _tracer(model, y)
    torch.manual_seed(0)
    prior = tracer.prior_latents(500)
    with pytest.warns(UserWarning, match=r"one draw at a time because its log-likelihood under a vectorising "
                                         r"pyro.plate differs from draw-by-draw tracing"):
        assert is_differentiable(tracer, prior)
    assert tracer.vectorized is False
    batch_dims.clear()
    optima, count = find_optima(tracer, prior, num_starts=4)
    assert count > 0 and optima and set(batch_dims) == {0}  # every start traced on its own
    # the same optimum as the vectorised model's
    reference = _tracer(arma, y)
    reference.check_vectorization(prior)
    assert reference.vectorized
    best, _ = find_optima(reference, prior, num_starts=4)
    assert torch.allclose(optima[0].loc, best[0].loc, atol=2e-2)


def test_fit_climbs_a_non_vectorised_model_and_says_why_it_is_slow():
    y = Y[:40]
    with pytest.warns(UserWarning, match="one draw at a time because .* differs from draw-by-draw"):
        result = fit(arma_loop, y, schedule=Schedule(starts="gradient", **{**QUICK, "initial_draws": 300}),
                     num_components=1, progress=False, seed=0)
    assert result.num_gradient_evals > 0 and result.rounds[0].source == "optima"


def test_a_non_vectorised_numpy_black_box_has_no_gradient():
    tracer = _tracer(numpy_factor_model, torch.tensor([0.5, -0.5]))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="one draw at a time"):
        assert not is_differentiable(tracer, tracer.prior_latents(100))
