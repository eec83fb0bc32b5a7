"""The packed latent vector: which slice of ``z ∈ R^D`` holds which site, and the maps both ways.

The layout is read off a prototype trace of the model (Pyro's ``AutoContinuous`` order): each
continuous latent site's constrained value is mapped to Pyro's unconstrained space with
``biject_to(site.support)`` and flattened into its slice. :meth:`Layout.unpack` and
:meth:`Layout.pack` take a batch of draws on the left — ``(N, D)`` latents against
``{site: (N, *site_shape)}`` values — whatever plates the site sits in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from torch.distributions import biject_to, constraints

__all__ = ["LatentSite", "Layout", "PlateDim"]


@dataclass(frozen=True)
class PlateDim:
    """A plate a site sits in: its ``name``, ``size`` and the batch ``dim`` it occupies (negative)."""

    name: str
    size: int
    dim: int


@dataclass(frozen=True)
class LatentSite:
    """One continuous latent site and its slice ``start:stop`` of the packed vector.

    :param shape: the constrained value's shape in the prototype trace.
    :param unconstrained_shape: the same value's shape after ``biject_to(support).inv``.
    :param plates: the vectorised plates the site sits in.
    """

    name: str
    shape: torch.Size
    event_dim: int
    start: int
    stop: int
    support: constraints.Constraint
    unconstrained_shape: torch.Size
    plates: tuple[PlateDim, ...] = ()

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def transform(self) -> torch.distributions.Transform:
        """Unconstrained → constrained map of the site's support."""
        return biject_to(self.support)


class Layout:
    """The continuous latent sites of a model, in packing order.

    Iterating gives :class:`LatentSite` objects; ``layout[i]`` and ``len(layout)`` work as on a list.

    :raises ValueError: naming the site, for a discrete latent or an improper prior.
    """

    def __init__(self, sites: tuple[LatentSite, ...]) -> None:
        self.sites = tuple(sites)
        self.dim = self.sites[-1].stop if self.sites else 0

    @classmethod
    def from_trace(cls, trace: poutine.Trace) -> Layout:
        sites, pos = [], 0
        for name, site in trace.iter_stochastic_nodes():
            fn = site["fn"]
            _check_latent(name, fn)
            value = site["value"]
            unconstrained = biject_to(fn.support).inv(value)
            plates = tuple(
                PlateDim(f.name, int(f.size), int(f.dim)) for f in site["cond_indep_stack"] if f.vectorized
            )
            sites.append(LatentSite(name, value.shape, fn.event_dim, pos, pos + unconstrained.numel(), fn.support,
                                    unconstrained.shape, plates))
            pos += unconstrained.numel()
        return cls(tuple(sites))

    def __iter__(self) -> Iterator[LatentSite]:
        return iter(self.sites)

    def __getitem__(self, index: int) -> LatentSite:
        return self.sites[index]

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def unpack(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(N, D)`` unconstrained latents → ``{site: (N, *site_shape)}`` constrained values."""
        n = latents.shape[0]
        return {
            s.name: s.transform(latents[:, s.start : s.stop].reshape((n,) + tuple(s.unconstrained_shape)))
            .reshape((n,) + tuple(s.shape))
            for s in self.sites
        }

    def pack(self, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``{site: (*batch, *site_shape)}`` constrained values → ``((*batch, D) unconstrained latents,
        (*batch,) log |d value / d latent|)``, the Jacobian term of the support maps.

        :raises KeyError: naming a missing site; :raises ValueError: for a value of the wrong shape.
        """
        packed, log_det, batch = [], 0.0, None
        for s in self.sites:
            if s.name not in values:
                raise KeyError(f"a value for latent site '{s.name}' is missing (the sites are {self.names})")
            value = values[s.name]
            if tuple(value.shape[value.dim() - len(s.shape) :]) != tuple(s.shape):
                raise ValueError(
                    f"value for site '{s.name}' has shape {tuple(value.shape)}; its trailing "
                    f"dimensions must be the site's shape {tuple(s.shape)}"
                )
            batch = value.shape[: value.dim() - len(s.shape)]
            u = s.transform.inv(value)
            ladj = s.transform.log_abs_det_jacobian(u, value)
            log_det = log_det + sum_rightmost(ladj, ladj.dim() - len(batch))
            packed.append(u.reshape(batch + (-1,)))
        return torch.cat(packed, -1), log_det

    def batched(self, values: Mapping[str, torch.Tensor], max_plate_nesting: int) -> dict[str, torch.Tensor]:
        """``{site: (N, *site_shape)}`` → the same values with the draws on the dimension left of
        every plate (``-max_plate_nesting - 1``), as a vectorising particle plate expects."""
        out = {}
        for s in self.sites:
            batch_dims = len(s.shape) - s.event_dim
            pad = (1,) * max(0, max_plate_nesting - batch_dims)
            out[s.name] = values[s.name].reshape((-1,) + pad + tuple(s.shape))
        return out


def _check_latent(name: str, fn: dist.Distribution) -> None:
    if fn.support.is_discrete:
        raise ValueError(
            f"Latent site '{name}' is discrete ({type(fn).__name__}); AutoLWFlow needs every "
            "latent site to be continuous. Marginalise it out in the model (e.g. a mixture "
            "written with MixtureSameFamily), or observe it."
        )
    if isinstance(fn, dist.ImproperUniform) or cannot_sample(fn):
        raise ValueError(
            f"Latent site '{name}' has an improper prior ({type(fn).__name__}) that cannot be "
            "sampled; likelihood weighting draws from the prior, so give it a proper prior "
            "(e.g. dist.Normal(0, 10) or dist.Uniform(low, high))."
        )


def cannot_sample(fn: dist.Distribution) -> bool:
    """Whether ``fn.sample()`` is not implemented (an improper prior)."""
    try:
        fn.sample()
    except NotImplementedError:
        return True
    return False
