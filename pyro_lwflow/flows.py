"""RealNVP from Pyro's own transforms: affine couplings with soft-bounded log-scales, and an
elementwise spline for the marginals' shapes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.transforms import AffineCoupling, ComposeTransformModule, Permute, Spline
from pyro.nn import DenseNN
from torch import nn
from torch.distributions import constraints

__all__ = ["BoundedHypernet", "FlowStack", "coupling_layers", "marginal_spline", "realnvp"]


class FlowStack(ComposeTransformModule):
    """A :class:`~pyro.distributions.transforms.ComposeTransformModule` of bijections of
    ``R^D``, whose domain and codomain are fixed: the parent class rebuilds them from every part
    on each access, thousands of constraint objects per training step (~40 % of its time)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(*batch, D) → (*batch,)``; an empty stack is the identity (the parent returns ``x``'s shape)."""
        if not self.parts:
            return x.new_zeros(x.shape[:-1])
        return super().log_abs_det_jacobian(x, y)


class BoundedHypernet(nn.Module):
    """A :class:`~pyro.nn.DenseNN` whose log-scale output is squashed into ``(-bound, bound)``.

    The last layer starts at zero, so the coupling it drives starts at the identity. A soft
    bound (``bound · tanh(s / bound)``) keeps gradients alive where Pyro's hard clip would not,
    and keeps ``log q`` finite for draws far from the mass (which carry weight ≈ 0: an
    infinite ``log q`` there would turn ``0 · ∞`` into NaN for the whole batch).

    :param input_dim: size of the conditioning half.
    :param hidden_dims: hidden layer widths.
    :param output_dim: size of the transformed half.
    :param bound: the largest absolute log-scale.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], output_dim: int, bound: float) -> None:
        super().__init__()
        self.net = DenseNN(input_dim, list(hidden_dims), param_dims=[output_dim, output_dim])
        last = self.net.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.bound = bound

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self.net(x)
        return shift, self.bound * torch.tanh(log_scale / self.bound)


def _permutation(dim: int, layer: int) -> torch.LongTensor:
    """A fixed permutation per layer, rebuilt identically from ``(dim, layer)`` on load.

    Even layers rotate the coordinates by the coupling's split, so every coordinate conditions a
    coupling within ``⌈D / split⌉`` layers (a reversal would leave the middle of an odd ``D``
    forever transformed affinely, never conditioning); odd layers shuffle them (seeded) to mix.
    """
    if dim == 2:
        return torch.tensor([1, 0])
    if dim == 3 or layer % 2 == 0:
        return torch.roll(torch.arange(dim), -((dim + 1) // 2))
    return torch.randperm(dim, generator=torch.Generator().manual_seed(layer))


def realnvp(
    dim: int,
    num_transforms: int = 6,
    hidden_dims: Sequence[int] = (64, 64),
    log_scale_bound: float = 3.0,
) -> FlowStack:
    """A RealNVP stack: ``num_transforms`` affine couplings, each followed by a permutation.

    :param dim: dimension ``D`` of the packed latent vector; maps ``(..., D) → (..., D)``.
    :returns: a :class:`FlowStack` that starts at the
        identity (a last permutation undoes the others). A 1-D latent has nothing to couple: the
        stack is then empty and the mixture base alone models it.

    Reference: Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real NVP",
    https://arxiv.org/abs/1605.08803
    """
    if dim < 2:
        return FlowStack([])

    def coupling(split: int) -> AffineCoupling:
        hypernet = BoundedHypernet(split, hidden_dims, dim - split, log_scale_bound)
        return AffineCoupling(split, hypernet, log_scale_min_clip=-log_scale_bound, log_scale_max_clip=log_scale_bound)

    parts = coupling_layers(dim, num_transforms, coupling)
    return FlowStack(parts)


def coupling_layers(dim: int, num_transforms: int, coupling: Callable[[int], object]) -> list:
    """``num_transforms`` couplings ``coupling(split)`` (each transforms the last ``dim − split``
    coordinates given the first ``split``), each but the last followed by the fixed permutation of
    its layer (:func:`_permutation`), and a last permutation that restores the order: the layout of
    :func:`realnvp` and of :func:`~pyro_lwflow.conditional.conditional_realnvp`. ``dim ≥ 2``."""
    split = (dim + 1) // 2
    parts: list = []
    order = torch.arange(dim)  # which input coordinate sits at each position
    for layer in range(num_transforms):
        parts.append(coupling(split))
        if layer < num_transforms - 1:
            perm = _permutation(dim, layer)
            parts.append(Permute(perm))
            order = order[perm]
    if not torch.equal(order, torch.arange(dim)):
        parts.append(Permute(torch.argsort(order)))
    return parts


def marginal_spline(dim: int, count_bins: int = 16, bound: float = 4.0) -> Spline:
    """Pyro's elementwise monotonic rational-quadratic spline (Durkan et al. 2019), starting at
    the identity.

    Affine couplings move and scale one coordinate as a function of the others; they cannot bend
    a coordinate's own marginal (a skewed Gumbel, a Laplace cusp, Student-t shoulders) except by
    roundabout use of the others. One spline per coordinate, ``count_bins`` bins on
    ``[-bound, bound]`` and the identity outside, does that directly at the cost of an
    elementwise map. Maps ``(..., D) → (..., D)``.

    Reference: Durkan, Bekasov, Murray, Papamakarios, "Neural Spline Flows",
    https://arxiv.org/abs/1906.04032
    """
    spline = Spline(dim, count_bins=count_bins, bound=bound, order="quadratic")
    with torch.no_grad():  # equal bins and unit slopes: the identity
        spline.unnormalized_widths.zero_()
        spline.unnormalized_heights.zero_()
        spline.unnormalized_derivatives.fill_(math.log(math.expm1(1.0 - 1e-3)))  # softplus⁻¹(1 − min slope)
    return spline
