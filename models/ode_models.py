"""A real simulator: Lotka–Volterra predator–prey dynamics solved by SciPy, a NumPy black box.

The likelihood is what a scientist with an ODE model has: ``scipy.integrate.solve_ivp`` run
outside torch, its log-likelihood handed to Pyro through ``pyro.factor``. It has no torch
gradient, so :func:`pyro_lwflow.fit` takes the gradient-free path (``starts="prior"``) by itself,
and NUTS cannot run it at all.

=====================  =================================================================
model                  what it is
=====================  =================================================================
``lotka_volterra``     prey ``x`` and predators ``z``: ``x' = α x − β x z``,
                       ``z' = −γ z + δ x z``, from ``(x, z)(0) = (30, 1)``; both observed at
                       ``t = 1, 2, …, 20`` with multiplicative noise,
                       ``y ~ LogNormal(log population, 0.1)`` (40 values); priors
                       ``LogNormal(−0.125, 0.5)`` on ``α, γ`` and ``LogNormal(−3, 0.5)`` on
                       ``β, δ`` (sbibm's ``lotka_volterra`` task)
=====================  =================================================================

The model carries ``.example_data()`` (the ``(20, 2)`` observations simulated from
``.true_params`` with a fixed seed: the model's one argument, as ``lwflow fit`` passes it),
``.true_params`` (``{site: float}``), ``.simulate(params, rng)`` (noisy observations for arrays
of parameters) and ``.reference_posterior(y)`` (a gradient-free importance-sampling reference,
see :func:`reference_posterior`). Use::

    from pyro_lwflow import models, fit
    model = models.load("ode_models:lotka_volterra")
    result = fit(model, model.example_data())

or ``lwflow fit ode_models.py:lotka_volterra``.

**Vectorised.** ``fit`` traces a model with a whole batch of draws at once (each latent of shape
``(n,)``). :func:`log_likelihood` solves the ODEs of up to ``CHUNK`` draws as one stacked system
(``2 · CHUNK`` equations, one ``solve_ivp`` call), in the log populations
(``(log x)' = α − β z``, ``(log z)' = −γ + δ x``: positive by construction, and smooth where a
population nearly dies out). The draws of a call are sorted by their oscillation frequency
``√(αγ)`` before chunking, so each stacked system holds draws of similar speed and the adaptive
step is not set by one fast draw for a thousand slow ones. A draw whose solution fails or is not
finite gets ``−inf`` (zero likelihood).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from scipy.integrate import solve_ivp

__all__ = ["CHUNK", "INITIAL", "NOISE", "PRIOR_LOC", "PRIOR_SCALE", "SITES", "TIMES", "TRUE_PARAMS",
           "log_likelihood", "log_posterior_z", "lotka_volterra", "reference_posterior", "simulate", "solve"]

SITES = ("alpha", "beta", "gamma", "delta")
PRIOR_LOC = {"alpha": -0.125, "beta": -3.0, "gamma": -0.125, "delta": -3.0}  # of log(rate)
PRIOR_SCALE = 0.5
INITIAL = (30.0, 1.0)  # prey, predators at t = 0
TIMES = np.arange(1.0, 21.0)  # the 20 observation times
NOISE = 0.1  # sd of log(observation) around log(population)
TRUE_PARAMS = {"alpha": 0.7, "beta": 0.05, "gamma": 0.9, "delta": 0.05}
CHUNK = 500  # draws per stacked solve_ivp call
RTOL, ATOL = 1e-8, 1e-10


def solve(params: np.ndarray, times: np.ndarray = TIMES, chunk: int = CHUNK) -> np.ndarray:
    """Log populations at ``times`` for each row of ``params`` ``(n, 4)`` (α, β, γ, δ).

    Pure NumPy/SciPy. Returns ``(n, len(times), 2)`` (log prey, log predators); rows whose
    solution fails or is not finite are NaN.
    """
    params = np.atleast_2d(np.asarray(params, dtype=np.float64))
    out = np.full((params.shape[0], len(times), 2), np.nan)
    ok = np.isfinite(params).all(-1) & (params > 0).all(-1)
    order = np.flatnonzero(ok)
    order = order[np.argsort(np.sqrt(params[order, 0] * params[order, 2]), kind="stable")]
    for s in range(0, order.size, chunk):
        idx = order[s : s + chunk]
        out[idx] = _solve_stacked(params[idx], times)
    return out


def _solve_stacked(params: np.ndarray, times: np.ndarray) -> np.ndarray:
    """One ``solve_ivp`` over the stacked log-space systems of ``params`` ``(n, 4)``; ``(n, T, 2)``.

    A failed stacked solve is split in two (down to single draws), so one bad draw does not take
    its chunk with it.
    """
    n = params.shape[0]
    alpha, beta, gamma, delta = params.T

    def rhs(_t, state):
        u, v = state[:n], state[n:]  # log prey, log predators
        return np.concatenate([alpha - beta * np.exp(v), -gamma + delta * np.exp(u)])

    start = np.concatenate([np.full(n, math.log(INITIAL[0])), np.full(n, math.log(INITIAL[1]))])
    with np.errstate(over="ignore", invalid="ignore"):
        sol = solve_ivp(rhs, (0.0, float(times[-1])), start, method="RK45", t_eval=times, rtol=RTOL, atol=ATOL)
    if sol.status == 0 and sol.y.shape[1] == len(times):
        out = np.stack([sol.y[:n], sol.y[n:]], -1)
        return np.where(np.isfinite(out), out, np.nan)
    if n == 1:
        return np.full((1, len(times), 2), np.nan)
    half = n // 2
    return np.concatenate([_solve_stacked(params[:half], times), _solve_stacked(params[half:], times)])


def log_likelihood(params: np.ndarray, y: np.ndarray, noise: float = NOISE) -> np.ndarray:
    """``log p(y | θ)`` for each row of ``params`` ``(n, 4)``: ``y`` ``(20, 2)`` positive observations,
    ``log y ~ Normal(log population, noise)`` (a LogNormal density in ``y``). ``(n,)`` float64;
    ``−inf`` where the ODE solution fails."""
    y = np.asarray(y, dtype=np.float64)
    log_y = np.log(y)
    resid = (solve(params) - log_y) / noise
    value = -0.5 * (resid**2).sum((-2, -1)) - y.size * math.log(noise * math.sqrt(2 * math.pi)) - log_y.sum()
    return np.where(np.isfinite(value), value, -np.inf)


def simulate(params, rng: np.random.Generator | int | None = 0, noise: float = NOISE) -> np.ndarray:
    """Noisy observations ``(n, 20, 2)`` for parameters ``(n, 4)`` (or one ``(4,)`` row: ``(20, 2)``)."""
    params = np.asarray(params, dtype=np.float64)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    log_pop = solve(params.reshape(-1, 4))
    y = np.exp(log_pop + noise * rng.standard_normal(log_pop.shape))
    return y[0] if params.ndim == 1 else y


def log_posterior_z(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unnormalised log posterior density of ``z = log θ`` ``(n, 4)``: the Normal prior of the log
    rates plus :func:`log_likelihood`. Its integral over ``z`` is the model's evidence."""
    z = np.atleast_2d(z)
    loc = np.array([PRIOR_LOC[s] for s in SITES])
    log_prior = (-0.5 * ((z - loc) / PRIOR_SCALE) ** 2 - math.log(PRIOR_SCALE * math.sqrt(2 * math.pi))).sum(-1)
    with np.errstate(over="ignore"):
        return log_prior + log_likelihood(np.exp(z), y)


def reference_posterior(y, num_draws: int = 200_000, seed: int = 0, stage_draws: int = 20_000,
                        stages: int = 3, df: float = 5.0) -> dict:
    """A gradient-free reference posterior by adaptive importance sampling in ``z = log θ``.

    The best of ``stage_draws`` prior draws is refined by Nelder–Mead into the mode, a
    finite-difference Hessian there gives a Laplace covariance, and ``stages`` rounds of
    ``stage_draws`` draws from a multivariate Student-t (``df``) move the proposal to the weighted
    mean and 1.5² × the weighted covariance; the last proposal then draws ``num_draws``, weighted
    by posterior / proposal. Nothing here uses the true parameters or a torch gradient.

    :returns: ``{"samples": (num_draws, 4) θ, "log_weights": (num_draws,) normalised,
        "mean", "sd": (4,) weighted moments of θ, "ess", "pareto_k", "log_evidence",
        "log_evidence_stderr", "calls"}``.
    """
    from scipy.optimize import minimize
    from scipy.stats import multivariate_t

    y = np.asarray(torch.as_tensor(y), dtype=np.float64)
    rng = np.random.default_rng(seed)
    loc = np.array([PRIOR_LOC[s] for s in SITES])
    calls = 0

    def target(z):
        nonlocal calls
        z = np.atleast_2d(z)
        calls += z.shape[0]
        return log_posterior_z(z, y)

    z_prior = loc + PRIOR_SCALE * rng.standard_normal((stage_draws, 4))
    start = z_prior[np.argmax(target(z_prior))]
    opt = minimize(lambda z: -float(target(z)[0]), start, method="Nelder-Mead",
                   options={"xatol": 1e-7, "fatol": 1e-7, "maxiter": 4000, "maxfev": 8000})
    mode, h = opt.x, 1e-4
    eye = np.eye(4) * h
    # central second differences: f(x ± h e_i ± h e_j) in one batch
    points = [mode] + [mode + a * eye[i] + b * eye[j] for i in range(4) for j in range(4) for a in (1, -1)
                       for b in (1, -1)]
    f = target(np.array(points))
    f0, f = f[0], f[1:].reshape(4, 4, 2, 2)
    hess = (f[:, :, 0, 0] - f[:, :, 0, 1] - f[:, :, 1, 0] + f[:, :, 1, 1]) / (4 * h * h)
    cov = np.linalg.inv(-0.5 * (hess + hess.T)) if np.isfinite(f0) else np.eye(4) * 0.01
    cov = 0.5 * (cov + cov.T)
    if not np.all(np.linalg.eigvalsh(cov) > 0):
        cov = np.eye(4) * 0.01
    mean, scale = mode, 1.5**2 * cov
    for stage in range(stages + 1):
        n = stage_draws if stage < stages else num_draws
        proposal = multivariate_t(loc=mean, shape=scale, df=df)
        z = proposal.rvs(size=n, random_state=rng).reshape(n, 4)
        log_w = target(z) - proposal.logpdf(z)
        log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        if stage < stages:
            mean = w @ z
            centred = z - mean
            scale = 1.5**2 * (centred.T * w) @ centred * (df - 2) / df
    theta = np.exp(z)
    from pyro_lwflow.diagnostics import psis_log_weights

    _, k = psis_log_weights(torch.as_tensor(log_w))
    m = log_w.max()
    log_z = m + math.log(np.mean(np.exp(log_w - m)))
    ratio = np.exp(log_w - log_z)
    stderr = float(np.std(ratio) / math.sqrt(n))
    th_mean = w @ theta
    return {"samples": theta, "log_weights": log_w - log_z - math.log(n), "mean": th_mean,
            "sd": np.sqrt(w @ (theta - th_mean) ** 2), "ess": float(1.0 / (w**2).sum()), "pareto_k": float(k),
            "log_evidence": float(log_z), "log_evidence_stderr": stderr, "calls": calls}


def _example_data() -> torch.Tensor:
    """``(20, 2)`` observations simulated from :data:`TRUE_PARAMS` with a fixed seed."""
    theta = np.array([TRUE_PARAMS[s] for s in SITES])
    return torch.as_tensor(simulate(theta, rng=np.random.default_rng(2024)), dtype=torch.float32)


def lotka_volterra(y: torch.Tensor):
    """Rates ``alpha, beta, gamma, delta`` given observed populations ``y`` ``(20, 2)`` (prey,
    predators at ``TIMES``). The likelihood is :func:`log_likelihood`, a NumPy/SciPy black box."""
    rates = [pyro.sample(s, dist.LogNormal(PRIOR_LOC[s], PRIOR_SCALE)) for s in SITES]
    rates = torch.broadcast_tensors(*rates)
    # (batch…, 4) → NumPy: a tensor that requires grad raises here, so a gradient method fails loudly
    theta = torch.stack(rates, -1).reshape(-1, 4).numpy()
    value = log_likelihood(theta, torch.as_tensor(y).numpy())
    pyro.factor("likelihood", torch.as_tensor(value, dtype=rates[0].dtype).reshape(rates[0].shape))


lotka_volterra.example_data = _example_data
lotka_volterra.true_params = dict(TRUE_PARAMS)
lotka_volterra.simulate = simulate
lotka_volterra.reference_posterior = reference_posterior

MODELS = {"lotka_volterra": lotka_volterra}
