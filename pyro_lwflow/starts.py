"""Gradient-informed starts: the optima of the log joint, found from many prior draws, as a proposal.

When the model's log joint ``log p(θ) + log L(θ)`` is differentiable in torch, a batched L-BFGS
climbs from ``S`` prior draws at once, the optima are merged into distinct modes (Mahalanobis
distance under each mode's Laplace covariance), and :func:`start_proposal` puts an inflated,
heavy-tailed Student-t on each, weighted by its Laplace evidence. Every point the optimiser
evaluates is a *gradient evaluation* and is counted.

Everything works on packed unconstrained latents ``(S, D)`` (:class:`~pyro_lwflow.layout.Layout`),
through :meth:`~pyro_lwflow.tracing.ModelTracer.log_joint`: one vectorised trace for all ``S``
points, or, for a model that does not vectorise but is differentiable for one draw, one trace per
point (the climb is the same, only slower).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro.distributions as dist
import torch

from .tracing import ModelTracer

__all__ = ["Optimum", "find_optima", "is_differentiable", "start_proposal"]


@dataclass
class Optimum:
    """A mode of the log joint: location, Laplace covariance, value, and how many starts reached it.

    :param loc: ``(D,)`` float64 packed unconstrained latents.
    :param cov: ``(D, D)`` float64 inverse of the (eigenvalue-clipped) negative Hessian.
    :param log_joint: log joint density at ``loc`` (nats).
    :param num_starts: starts that converged to it.
    """

    loc: torch.Tensor
    cov: torch.Tensor
    log_joint: float
    num_starts: int = 1

    @property
    def laplace_log_evidence(self) -> float:
        """Laplace estimate of the mode's mass: ``log p*(θ) + ½ log det(2π Σ)``."""
        return self.log_joint + 0.5 * float(torch.logdet(2 * math.pi * self.cov))


class _Counted:
    """The log joint and its gradient at ``(S, D)`` latents, counting every point evaluated."""

    def __init__(self, tracer: ModelTracer) -> None:
        self.tracer = tracer
        self.count = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.count += x.shape[0]
        z = x.detach().float().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log_lik, log_prior = self.tracer.log_joint(z)
            value = log_lik + log_prior
            if value.requires_grad:
                (grad,) = torch.autograd.grad(value.sum(), z, allow_unused=True)
            else:  # traced draw by draw, the model raised at every draw
                grad = None
        value = value.detach()
        grad = torch.zeros_like(z) if grad is None else grad
        grad = grad.double()
        bad = ~torch.isfinite(value) | ~torch.isfinite(grad).all(-1)
        return value.masked_fill(bad, -math.inf), grad.masked_fill(bad[:, None], 0.0)


def is_differentiable(tracer: ModelTracer, latents: torch.Tensor, probe: int = 64, max_traced: int = 16) -> bool:
    """Whether the log-likelihood has a finite, non-zero torch gradient at some of ``latents``
    (``(N, D)``): false for a NumPy black box, ``.item()`` or ``float()`` on a latent, or a model
    that raises.

    Decided at draws with a finite log-likelihood: draws where the model overflows (a ``-inf`` or
    NaN log-likelihood or gradient) are skipped. A vectorised model is tried at the first
    ``probe`` draws in one pass; one that does not vectorise (:meth:`ModelTracer.check_vectorization`)
    one draw at a time, up to ``max_traced`` draws, stopping at the first with a finite
    log-likelihood (its gradient, or the lack of one, decides).
    """
    tracer.check_vectorization(latents)
    if tracer.vectorized:
        return _has_gradient(tracer, latents[:probe])
    for i in range(min(max_traced, latents.shape[0])):
        answer = _has_gradient(tracer, latents[i : i + 1])
        if answer is not None:
            return answer
    return False


def _has_gradient(tracer: ModelTracer, latents: torch.Tensor) -> bool | None:
    """Whether the log-likelihood has a finite non-zero gradient at some of ``latents``; ``None``
    if it is finite at none of them (nothing decided)."""
    z = latents.detach().float().requires_grad_(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log_lik, _ = tracer.log_joint(z)
            finite = torch.isfinite(log_lik.detach())
            if not finite.any():
                return None
            if not log_lik.requires_grad:
                return False
            (grad,) = torch.autograd.grad(log_lik[finite].sum(), z, allow_unused=True)
    except Exception:  # noqa: BLE001 - any failure (a .numpy() on a graph, a raise) means "no gradient"
        return False
    if grad is None:
        return False
    ok = finite & torch.isfinite(grad).all(-1)
    return bool(ok.any() and (grad[ok] != 0).any())


def _lbfgs(f: _Counted, x: torch.Tensor, max_iters: int, inside, history: int = 10, gtol: float = 1e-5):
    """Batched L-BFGS *ascent* of ``f`` from each row of ``x`` ``(S, D)``, each row on its own
    (own history, own backtracking Armijo line search). Returns ``(x, value, converged)``; rows that
    never had a finite value keep ``-inf``; ``converged`` is false for rows still climbing after
    ``max_iters`` or leaving the region ``inside(x)`` (an unbounded log joint, such as a funnel's neck)."""
    value, grad = f(x)
    s_hist, y_hist, rho_hist = [], [], []
    done = ~torch.isfinite(value)
    converged = torch.zeros_like(done)
    for _ in range(max_iters):
        if bool(done.all()):
            break
        q = -grad  # minimise −f
        alphas = []
        for s, y, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist), strict=True):
            a = rho * (s * q).sum(-1)
            q = q - a[:, None] * y
            alphas.append(a)
        if s_hist:
            sy, yy = (s_hist[-1] * y_hist[-1]).sum(-1), (y_hist[-1] * y_hist[-1]).sum(-1)
            gamma = torch.where(sy > 0, sy / yy.clamp_min(1e-300), 1.0 / grad.norm(dim=-1).clamp_min(1e-12))
        else:
            gamma = 1.0 / grad.norm(dim=-1).clamp_min(1e-12)
        r = gamma[:, None] * q
        for s, y, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas), strict=True):
            b = rho * (y * r).sum(-1)
            r = r + s * (a - b)[:, None]
        step = -r  # the ascent direction
        slope = (step * grad).sum(-1)
        not_ascent = slope <= 0
        step[not_ascent] = grad[not_ascent] * gamma[not_ascent, None]
        slope = (step * grad).sum(-1)
        # backtracking on the rows still moving
        t = torch.ones_like(value)
        new_x, new_value, new_grad = x.clone(), value.clone(), grad.clone()
        pending = ~done
        for _ in range(30):
            idx = pending.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            trial = x[idx] + t[idx, None] * step[idx]
            v, g = f(trial)
            ok = torch.isfinite(v) & (v >= value[idx] + 1e-4 * t[idx] * slope[idx])
            acc = idx[ok]
            new_x[acc], new_value[acc], new_grad[acc] = trial[ok], v[ok], g[ok]
            pending[acc] = False
            t[idx[~ok]] *= 0.3
        stuck = pending & ~done  # no step found: at an optimum up to float precision
        s, y = new_x - x, -(new_grad - grad)  # y of the minimised function −f
        sy = (s * y).sum(-1)
        good = sy > 1e-12
        s_hist.append(torch.where(good[:, None], s, 0.0))
        y_hist.append(torch.where(good[:, None], y, 0.0))
        rho_hist.append(torch.where(good, 1.0 / sy.clamp_min(1e-300), 0.0))
        if len(s_hist) > history:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        gain = new_value - value
        x, value, grad = new_x, new_value, new_grad
        scale = 1.0 + x.abs()
        now = stuck | ((grad * scale).abs().amax(-1) < gtol * (1 + value.abs())) | (gain.abs() < 1e-10)
        converged |= now & ~done
        done |= now | ~inside(x)
    return x, value, converged


def _hessian(f: _Counted, x: torch.Tensor) -> torch.Tensor | None:
    """``(D, D)`` float64 Hessian of the log joint at ``x`` ``(D,)``, by double backward on ``D``
    copies (one traced batch); ``None`` if the model is not twice differentiable."""
    d = x.shape[-1]
    z = x.detach().float().expand(d, d).clone().requires_grad_(True)
    f.count += d
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log_lik, log_prior = f.tracer.log_joint(z)
            (grad,) = torch.autograd.grad((log_lik + log_prior).sum(), z, create_graph=True)
            (rows,) = torch.autograd.grad((grad * torch.eye(d)).sum(), z)
    except RuntimeError:
        return None
    hess = rows.double()
    return 0.5 * (hess + hess.T) if torch.isfinite(hess).all() else None


def _laplace_cov(hess: torch.Tensor | None, max_var: torch.Tensor) -> torch.Tensor:
    """Inverse of ``−hess`` with its eigenvalues clipped to ``[1 / max_var, ∞)`` (no wider than the
    prior; a flat or saddle direction gets the prior's spread)."""
    d = max_var.shape[0]
    if hess is None:
        return torch.diag(max_var)
    evals, evecs = torch.linalg.eigh(-hess)
    floor = 1.0 / float(max_var.max())
    evals = evals.clamp_min(floor)
    return (evecs / evals) @ evecs.T + 1e-12 * torch.eye(d, dtype=evecs.dtype)


def find_optima(
    tracer: ModelTracer,
    prior_latents: torch.Tensor,
    num_starts: int,
    max_iters: int = 300,
    merge_distance: float = 3.0,
    drop_below: float = 20.0,
    max_prior_sd: float = 8.0,
) -> tuple[list[Optimum], int]:
    """Climb the log joint from the first ``num_starts`` of ``prior_latents`` ``(N, D)`` and merge
    the optima into modes.

    The prior draws also set the widest a Laplace covariance may be (their variance) and where an
    optimum may lie: one beyond ``max_prior_sd`` prior standard deviations of the prior mean in some
    coordinate is an unbounded climb (a funnel's neck, where float precision stops L-BFGS), not a
    mode, and is dropped.

    :param merge_distance: optima closer than this Mahalanobis distance (under the better one's
        covariance) are one mode.
    :param drop_below: modes whose Laplace evidence is this many nats below the best are dropped.
    :returns: the modes, best first, and the number of gradient evaluations spent. Starts that do
        not converge within ``max_iters`` give no mode.
    """
    prior = prior_latents.double()
    prior_mean, prior_var = prior.mean(0), prior.var(0)
    f = _Counted(tracer)

    def inside(z: torch.Tensor) -> torch.Tensor:
        return ((z - prior_mean).abs() <= max_prior_sd * prior_var.sqrt()).all(-1)

    x, value, converged = _lbfgs(f, prior[:num_starts], max_iters, inside)
    value = value.masked_fill(~(converged & inside(x)), -math.inf)
    order = torch.argsort(value, descending=True)
    modes: list[Optimum] = []
    for i in order.tolist():
        if not math.isfinite(float(value[i])):
            continue
        for mode in modes:
            diff = x[i] - mode.loc
            if float(diff @ torch.linalg.solve(mode.cov, diff)) < merge_distance**2:
                mode.num_starts += 1
                break
        else:
            cov = _laplace_cov(_hessian(f, x[i]), prior_var)
            modes.append(Optimum(x[i].clone(), cov, float(value[i])))
    if modes:
        best = max(m.laplace_log_evidence for m in modes)
        modes = [m for m in modes if m.laplace_log_evidence >= best - drop_below]
    return modes, f.count


def start_proposal(modes: list[Optimum], inflate: float = 1.2, df: float = 5.0) -> dist.Distribution:
    """A mixture of Student-t's (``df``) at the modes, their Laplace covariances inflated by
    ``inflate`` in scale, over packed latents ``(D,)``; weights half by Laplace evidence, half equal,
    so a mode the Laplace estimate undervalues still gets draws."""
    log_z = torch.tensor([m.laplace_log_evidence for m in modes], dtype=torch.float64)
    weights = 0.5 * torch.softmax(log_z, 0) + 0.5 / len(modes)
    loc = torch.stack([m.loc for m in modes]).float()
    tril = torch.linalg.cholesky(torch.stack([m.cov for m in modes])).float() * inflate
    return dist.MixtureSameFamily(
        dist.Categorical(probs=weights.float()),
        dist.MultivariateStudentT(torch.tensor(df), loc, tril),
    )
