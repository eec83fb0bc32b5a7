"""Three tasks of the SBI benchmark (sbibm 1.1.0, Lueckmann et al. 2021) as Pyro models.

Each model has sbibm's prior and simulator exactly, and a closed-form likelihood, so the library can
evaluate ``p(x | theta)`` where the simulation-based methods cannot. One latent site ``theta`` (a
vector), one observed site ``x`` (a vector, ``obs=x``). Every model vectorises under an outer
``pyro.plate`` over particles (``theta`` then has a leading batch dimension) and simulates when
``x`` is left free: ``pyro.poutine.uncondition(model)()`` draws from the prior predictive.

===================  =====  =====  ==========================================================
model                theta  x      what it is
===================  =====  =====  ==========================================================
``two_moons``        2      2      ``Uniform(-1, 1)²``; a noisy half circle shifted by
                                   ``(-|θ1+θ2|/√2, (-θ1+θ2)/√2)``: crescent, bimodal posteriors
``slcp``             5      8      ``Uniform(-3, 3)⁵``; 4 iid 2-D Gaussians whose mean, scales and
                                   correlation are set by ``theta``: four sign-symmetric modes
``gaussian_linear``  10     10     ``theta ~ N(0, 0.1·I)``, ``x ~ N(theta, 0.1·I)``
===================  =====  =====  ==========================================================

Each model function carries ``.sbibm_task`` (the task's name in sbibm), ``.dim_theta`` and
``.dim_x``. The observations and reference posteriors are sbibm's:
``sbibm.get_task(model.sbibm_task).get_observation(i)`` is the ``(1, dim_x)`` observation ``i``.

Two notes against sbibm's code. ``two_moons``: sbibm's own ``_likelihood`` leaves out the polar
Jacobian ``-log(π r)``; its reference posterior is sampled exactly from the simulator, which has
it, so the density here (with it) is the one the reference samples follow. ``slcp``: sbibm adds
``1e-6`` to the diagonal of the covariance, and so does this.

Use::

    from pyro_lwflow import models
    model = models.load("sbi_tasks:two_moons")
    model(torch.tensor([0.1, 0.2]))                       # condition on an observation
    pyro.poutine.uncondition(model)()                     # one simulation
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["TwoMoonsLikelihood", "SLCPLikelihood", "two_moons", "slcp", "gaussian_linear", "MODELS"]

# two_moons' simulator constants (sbibm: simulator_params)
A_LOW, A_HIGH = -math.pi / 2.0, math.pi / 2.0
BASE_OFFSET = 0.25
R_LOC, R_SCALE = 0.1, 0.01
# slcp: 4 iid 2-D draws; sbibm adds eps to the covariance's diagonal "to ensure PSD"
SLCP_NUM_DATA = 4
SLCP_EPS = 1e-6
# gaussian_linear: prior and noise covariances are 0.1 * I (sbibm's prior_scale, simulator_scale)
GL_DIM = 10
GL_VARIANCE = 0.1


def _two_moons_shift(theta: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` sbibm's ``_map_fun`` offset: ``(-|θ1+θ2|/√2, (-θ1+θ2)/√2)``."""
    z0 = (theta[..., 0] + theta[..., 1]) / math.sqrt(2.0)
    z1 = (theta[..., 1] - theta[..., 0]) / math.sqrt(2.0)
    return torch.stack([-z0.abs(), z1], -1)


class TwoMoonsLikelihood(dist.TorchDistribution):
    """``x | theta`` of sbibm's two_moons: ``x = (r cos a + 0.25, r sin a) + shift(theta)``.

    ``a ~ Uniform(-π/2, π/2)``, ``r ~ Normal(0.1, 0.01)``. ``theta``: ``(..., 2)``; batch shape
    ``theta.shape[:-1]``, event shape ``(2,)``. The density is the change of variables from
    ``(a, r)`` to ``p = x - shift(theta)``: ``log N(r; 0.1, 0.01) - log π - log r`` with
    ``r = |p - (0.25, 0)|``, ``a = atan2(p2, p1 - 0.25)``, and ``-inf`` unless ``|a| < π/2``.
    (A negative ``r`` has density there too, at angle ``a ± π``; at ``N(0.1, 0.01)`` that is a
    10-sigma event, so it is left out, as sbibm leaves it out.)
    """

    arg_constraints = {"theta": constraints.real_vector}
    support = constraints.real_vector

    def __init__(self, theta: torch.Tensor, validate_args=None):
        self.theta = theta
        super().__init__(theta.shape[:-1], torch.Size([2]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return TwoMoonsLikelihood(self.theta.expand(torch.Size(batch_shape) + (2,)))

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]
        opts = {"dtype": self.theta.dtype, "device": self.theta.device}
        with torch.no_grad():
            a = A_LOW + (A_HIGH - A_LOW) * torch.rand(shape, **opts)
            r = R_LOC + R_SCALE * torch.randn(shape, **opts)
            p = torch.stack([r * torch.cos(a) + BASE_OFFSET, r * torch.sin(a)], -1)
            return p + _two_moons_shift(self.theta)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        p = value - _two_moons_shift(self.theta)
        u, v = p[..., 0] - BASE_OFFSET, p[..., 1]
        r = torch.sqrt(u * u + v * v)
        log_r_density = -0.5 * ((r - R_LOC) / R_SCALE) ** 2 - math.log(R_SCALE) - 0.5 * math.log(2 * math.pi)
        log_density = log_r_density - math.log(A_HIGH - A_LOW) - torch.log(r)
        # |a| < π/2  <=>  u > 0 (atan2(v, u) with u > 0)
        return torch.where(u > 0, log_density, torch.full_like(log_density, -math.inf))


def _slcp_mean_cov(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., 2)`` mean and ``(..., 2, 2)`` covariance of one of slcp's 4 draws."""
    m = theta[..., :2]
    s1, s2 = theta[..., 2] ** 2, theta[..., 3] ** 2
    rho = torch.tanh(theta[..., 4])
    off = rho * s1 * s2
    cov = torch.stack([torch.stack([s1**2 + SLCP_EPS, off], -1), torch.stack([off, s2**2 + SLCP_EPS], -1)], -2)
    return m, cov


class SLCPLikelihood(dist.TorchDistribution):
    """``x | theta`` of sbibm's slcp: 4 iid ``N(mean, cov)`` 2-D draws flattened to ``(8,)``.

    ``mean = (θ1, θ2)``, ``s1 = θ3²``, ``s2 = θ4²``, ``ρ = tanh θ5``,
    ``cov = [[s1² + ε, ρ s1 s2], [ρ s1 s2, s2² + ε]]`` with ``ε = 1e-6``. The flattening is
    sbibm's (``reshape(-1, 8)`` of ``(N, 4, 2)``): ``x = (x1₁, x1₂, x2₁, x2₂, ...)``, draw by draw.
    """

    arg_constraints = {"theta": constraints.real_vector}
    support = constraints.real_vector

    def __init__(self, theta: torch.Tensor, validate_args=None):
        self.theta = theta
        m, cov = _slcp_mean_cov(theta)
        self._pair = dist.MultivariateNormal(m.unsqueeze(-2), cov.unsqueeze(-3), validate_args=False)
        super().__init__(theta.shape[:-1], torch.Size([2 * SLCP_NUM_DATA]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return SLCPLikelihood(self.theta.expand(torch.Size(batch_shape) + (5,)))

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + (SLCP_NUM_DATA,)
        with torch.no_grad():
            return self._pair.expand(shape).sample().reshape(self._extended_shape(torch.Size(sample_shape)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        pairs = value.reshape(value.shape[:-1] + (SLCP_NUM_DATA, 2))
        return self._pair.log_prob(pairs).sum(-1)


TWO_MOONS_X = torch.zeros(2)
SLCP_X = torch.zeros(2 * SLCP_NUM_DATA)
GAUSSIAN_LINEAR_X = torch.zeros(GL_DIM)


def _task(name: str, dim_theta: int, dim_x: int):
    def attach(fn):
        fn.sbibm_task, fn.dim_theta, fn.dim_x = name, dim_theta, dim_x
        return fn

    return attach


@_task("two_moons", 2, 2)
def two_moons(x: torch.Tensor = TWO_MOONS_X):
    """sbibm's ``two_moons``: ``theta`` ``(2,)`` ~ Uniform(-1, 1)², ``x`` ``(2,)`` observed."""
    theta = pyro.sample("theta", dist.Uniform(-1.0, 1.0).expand([2]).to_event(1))
    pyro.sample("x", TwoMoonsLikelihood(theta), obs=x)


@_task("slcp", 5, 2 * SLCP_NUM_DATA)
def slcp(x: torch.Tensor = SLCP_X):
    """sbibm's ``slcp``: ``theta`` ``(5,)`` ~ Uniform(-3, 3)⁵, ``x`` ``(8,)`` observed (4 draws of 2)."""
    theta = pyro.sample("theta", dist.Uniform(-3.0, 3.0).expand([5]).to_event(1))
    pyro.sample("x", SLCPLikelihood(theta), obs=x)


@_task("gaussian_linear", GL_DIM, GL_DIM)
def gaussian_linear(x: torch.Tensor = GAUSSIAN_LINEAR_X):
    """sbibm's ``gaussian_linear``: ``theta`` ``(10,)`` ~ N(0, 0.1·I), ``x`` ``(10,)`` ~ N(theta, 0.1·I)."""
    scale = math.sqrt(GL_VARIANCE)
    theta = pyro.sample("theta", dist.Normal(0.0, scale).expand([GL_DIM]).to_event(1))
    pyro.sample("x", dist.Normal(theta, scale).to_event(1), obs=x)


MODELS = {m.__name__: m for m in (two_moons, slcp, gaussian_linear)}
