"""The coordinates the flow works in: linear inside a bounded support, not logit."""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_transform import TransformModule
from pyro.poutine import Trace
from torch.distributions import biject_to, constraints

from .layout import Layout

__all__ = ["BoxCoordinates", "Standardize", "box_coordinates"]


class Standardize(TransformModule):
    """``s ↦ y = loc + scale · s`` per coordinate, set once from the weighted draws.

    The couplings and the mixture base then work in coordinates where the posterior has mean 0
    and spread 1 whatever the model's units: their networks see inputs of order one and need
    shifts of order one, the scale at which they are initialised and their learning rate makes
    sense (in raw units, modes 12 apart took a coupling hundreds of steps to separate, and some
    fits never did). Starts as the identity; ``loc`` and ``scale`` are saved with the guide.

    :param dim: number of coordinates ``D``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim: int) -> None:
        super().__init__(cache_size=0)
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit_(self, y: torch.Tensor) -> None:
        """Set ``loc`` and ``scale`` to the mean and standard deviation of ``y`` ``(N, D)``."""
        self.loc.copy_(y.mean(0))
        self.scale.copy_(y.std(0).nan_to_num(1.0).clamp_min(1e-6))

    def _call(self, s: torch.Tensor) -> torch.Tensor:
        return self.loc.to(s) + self.scale.to(s) * s

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.loc.to(y)) / self.scale.to(y)

    def log_abs_det_jacobian(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(*batch, D) → (*batch,)``: ``Σ log scale``."""
        return self.scale.to(s).log().sum().expand(s.shape[:-1])


class BoxCoordinates(TransformModule):
    """Coordinate-wise map from the flow's coordinates ``y`` to Pyro's unconstrained ``z``.

    For a site with a bounded support ``(low, high)`` Pyro's unconstrained coordinate is
    ``z = logit((θ − low) / (high − low))``, which bends a Gaussian posterior mode: in
    ``Uniform(-12, 12)`` a unit-width mode at θ = 7 is stretched by a factor varying ~2× across
    it, and the couplings must spend capacity undoing that. Here ``y = θ`` on the interior
    ``[low + m, high − m]`` (``m = margin · (high − low)``), with exponential tails
    ``θ − low = m·exp((y − low − m)/m)`` (and mirrored) reaching the edges, so a Gaussian mode in
    θ is Gaussian in ``y`` and a mode pressed against an edge lives in log space. Coordinates
    whose ``mask`` is false pass through unchanged.

    :param low, high: ``(D,)`` bounds of each packed coordinate (any finite value where masked out).
    :param mask: ``(D,)`` bool, true for the coordinates of bounded sites.
    :param margin: the tails' share of each interval's width, in ``(0, 0.5)``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, low: torch.Tensor, high: torch.Tensor, mask: torch.Tensor, margin: float = 0.05) -> None:
        if not 0.0 < margin < 0.5:
            raise ValueError(f"margin must be in (0, 0.5), got {margin}")
        super().__init__(cache_size=0)
        self.register_buffer("low", torch.where(mask, low, 0.0), persistent=False)
        self.register_buffer("width", torch.where(mask, high - low, 1.0), persistent=False)
        self.register_buffer("mask", mask.bool(), persistent=False)
        self.margin = margin

    def _parts(self, y: torch.Tensor):
        """``(log u, log(1 − u), log dθ/dy)`` with ``u = (θ − low)/width``, each branch kept finite."""
        low, width = self.low.to(y), self.width.to(y)
        m = self.margin * width
        a, b = low + m, low + width - m
        log_margin = math.log(self.margin)
        below = log_margin + (torch.minimum(y, a) - a) / m  # log u in the lower tail
        above = log_margin - (torch.maximum(y, b) - b) / m  # log(1 − u) in the upper tail
        inner = torch.clamp(torch.minimum(torch.maximum(y, a), b) - low, min=0.0) / width
        lo_tail, hi_tail = y < a, y > b
        log_u = torch.where(lo_tail, below, torch.where(hi_tail, torch.log1p(-above.exp()), inner.log()))
        log_v = torch.where(lo_tail, torch.log1p(-below.exp()), torch.where(hi_tail, above, torch.log1p(-inner)))
        log_slope = torch.where(lo_tail, below - log_margin, torch.where(hi_tail, above - log_margin, 0.0))
        return log_u, log_v, log_slope

    def _call(self, y: torch.Tensor) -> torch.Tensor:
        log_u, log_v, _ = self._parts(y)
        return torch.where(self.mask, log_u - log_v, y)

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        low, width = self.low.to(z), self.width.to(z)
        m = self.margin * width
        log_margin = math.log(self.margin)
        log_u, log_v = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
        y = torch.where(
            log_u < log_margin,
            low + m + m * (log_u - log_margin),
            torch.where(log_v < log_margin, low + width - m - m * (log_v - log_margin), low + width * torch.sigmoid(z)),
        )
        return torch.where(self.mask, y, z)

    def log_abs_det_jacobian(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(*batch, D) → (*batch,)``: ``log |dz/dy|`` summed over the coordinates."""
        log_u, log_v, log_slope = self._parts(y)
        per_coordinate = log_slope - log_u - log_v - self.width.to(y).log()
        return torch.where(self.mask, per_coordinate, 0.0).sum(-1)


def box_coordinates(prototype: Trace, layout: Layout, margin: float = 0.05) -> BoxCoordinates:
    """The :class:`BoxCoordinates` of a model's packed latent vector (its sites in ``layout``
    order): every coordinate of a site whose support is a bounded interval (``Uniform``, ``Beta``,
    ...) gets its linear interior."""
    lows, highs, masks = [], [], []
    for site in layout:
        node = prototype.nodes[site.name]
        support = node["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        value = node["value"]
        shape = biject_to(node["fn"].support).inv(value).shape
        bounded = isinstance(support, (constraints.interval, constraints.half_open_interval))
        low = torch.as_tensor(support.lower_bound if bounded else 0.0, dtype=value.dtype)
        high = torch.as_tensor(support.upper_bound if bounded else 1.0, dtype=value.dtype)
        lows.append(low.expand(shape).reshape(-1))
        highs.append(high.expand(shape).reshape(-1))
        masks.append(torch.full((site.size,), bounded))
    return BoxCoordinates(torch.cat(lows), torch.cat(highs), torch.cat(masks), margin)
