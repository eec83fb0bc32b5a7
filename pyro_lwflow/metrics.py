"""Sample-quality metrics, exactly as defined in the project's benchmark spec.

Every function takes ``(N, d)`` tensors or arrays of samples; ``exact`` are draws from the true
posterior, ``approx`` from the model under test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ot
import torch

__all__ = [
    "bridge_mass",
    "kl_divergence",
    "mode_weight_error",
    "noise_floor",
    "sliced_w",
    "w1_avg",
]


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def kl_divergence(log_p_exact: torch.Tensor, log_q_exact: torch.Tensor) -> float:
    """``D_KL(p ‖ q)`` by Monte Carlo: mean over exact draws of ``log p(θ) − log q(θ)`` (nats).

    :param log_p_exact: ``(N,)`` true log density at N exact draws.
    :param log_q_exact: ``(N,)`` model log density at the same draws.
    """
    return float((log_p_exact.double() - log_q_exact.double()).mean())


def w1_avg(exact, approx) -> float:
    """Mean over coordinates of the 1-D Wasserstein-1 distance (POT ``wasserstein_1d``)."""
    x, y = _np(exact), _np(approx)
    return float(np.mean([ot.wasserstein_1d(x[:, j], y[:, j], p=1) for j in range(x.shape[1])]))


def sliced_w(exact, approx, n_projections: int = 500, seed: int = 0) -> float:
    """POT ``sliced_wasserstein_distance`` with ``p=1``, 500 projections, seed 0."""
    return float(ot.sliced_wasserstein_distance(_np(exact), _np(approx), n_projections=n_projections, p=1, seed=seed))


def bridge_mass(log_p: Callable[[torch.Tensor], torch.Tensor], exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Fraction of model draws where ``p(θ) < t``, ``t`` the 0.001-quantile of ``p`` over exact draws.

    The truth itself puts 0.1 % of its mass there, so 0.001 is the best achievable value.
    """
    threshold = torch.quantile(log_p(exact).double(), 0.001)
    return float((log_p(approx).double() < threshold).double().mean())


def mode_weight_error(
    component_log_probs: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor, approx: torch.Tensor
) -> float:
    """Largest absolute error of the model's mode weights.

    Each model draw goes to the component with the highest responsibility; the error is
    ``max_k |fraction_k − weights_k|``.

    :param component_log_probs: ``θ (N, d) → (N, K)`` log(weight × density) of each mode.
    """
    assign = component_log_probs(approx).argmax(-1)
    fractions = torch.bincount(assign, minlength=len(weights)).double() / len(assign)
    return float((fractions - torch.as_tensor(weights, dtype=torch.float64)).abs().max())


def noise_floor(
    sample: Callable[[int, int], torch.Tensor],
    metric: Callable[[torch.Tensor, torch.Tensor], float],
    num_samples: int = 20_000,
    repeats: int = 5,
) -> float:
    """The metric between two independent exact sample sets, median of ``repeats``.

    :param sample: ``(num_samples, seed) → (num_samples, d)`` exact draws.
    """
    values = [metric(sample(num_samples, 2 * r + 1), sample(num_samples, 2 * r + 2)) for r in range(repeats)]
    return float(np.median(values))
