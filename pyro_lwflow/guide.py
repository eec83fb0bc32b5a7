"""AutoLWFlow: a RealNVP guide over a Gaussian-mixture base, for any continuous Pyro model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam, pyro_method
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

from .coordinates import BoxCoordinates, Standardize, box_coordinates
from .draws import WeightedDraws
from .flows import FlowStack, marginal_spline, realnvp
from .layout import Layout, cannot_sample
from .modes import GaussianMixtureFit, find_modes, resample_points

__all__ = ["AutoLWFlow"]


class _LastSite(Messenger):
    """Remembers the sample site being processed, to name it when tracing fails."""

    site: dict | None = None

    def _pyro_sample(self, msg: dict) -> None:
        self.site = msg


class AutoLWFlow(AutoContinuous):
    """A normalizing-flow guide trained on likelihood-weighted prior draws.

    The posterior over the packed unconstrained latent vector ``z ∈ R^D`` is
    ``TransformedDistribution(MixtureSameFamily(...), RealNVP)``: a trainable mixture of
    ``num_components`` diagonal Gaussians pushed through affine coupling layers and an elementwise
    spline (``marginal_bins``). Each mixture
    component can sit on its own posterior mode, so the flow needs no probability "bridges"
    between separated modes (arXiv:2512.04954, section 3).

    Usage::

        guide = AutoLWFlow(model, num_components=3)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=LikelihoodWeightedKL())

    :param model: a Pyro model whose latent sites are all continuous.
    :param num_components: number of mixture components ``K ≥ 1``, or ``"auto"`` to choose it by
        BIC on the weighted draws when the guide is first initialised from them.
    :param num_transforms: number of affine coupling layers.
    :param hidden_dims: hidden widths of each coupling's network.
    :param log_scale_bound: largest absolute log-scale a coupling may apply.
    :param marginal_bins: bins of an elementwise spline after the couplings
        (:func:`~pyro_lwflow.flows.marginal_spline`, on ±4 standardised units), which shapes each
        coordinate's marginal (skew, cusps, heavy shoulders) where affine couplings cannot;
        ``None`` leaves the paper's plain RealNVP.
    :param max_components: the largest ``K`` tried when ``num_components="auto"``.
    :param box_margin: for sites with a bounded support (``Uniform``, ``Beta``, ...) the flow works
        in θ itself on the interior of the interval, with logit-like tails on this share of its
        width at each edge (:class:`~pyro_lwflow.coordinates.BoxCoordinates`); ``None`` keeps
        Pyro's logit coordinates, which bend every mode.
    :param device: where the guide's parameters live and it trains and samples (e.g. ``"cuda"``);
        default the model's. Weighted draws stay on the CPU; minibatches are moved here.
    """

    def __init__(
        self,
        model: Callable,
        num_components: int | str = "auto",
        num_transforms: int = 6,
        hidden_dims: Sequence[int] = (64, 64),
        log_scale_bound: float = 3.0,
        marginal_bins: int | None = 16,
        max_components: int = 8,
        box_margin: float | None = 0.05,
        init_loc_fn: Callable = init_to_median,
        device: torch.device | str | None = None,
    ) -> None:
        if num_components != "auto" and not (isinstance(num_components, int) and num_components >= 1):
            raise ValueError(
                f"num_components must be a positive integer or 'auto', got {num_components!r}"
            )
        if num_transforms < 0:
            raise ValueError(f"num_transforms must be >= 0, got {num_transforms}")
        if marginal_bins is not None and not (isinstance(marginal_bins, int) and marginal_bins >= 2):
            raise ValueError(f"marginal_bins must be an integer >= 2 or None, got {marginal_bins!r}")
        self.num_components = num_components
        self.num_transforms = num_transforms
        self.hidden_dims = tuple(hidden_dims)
        self.log_scale_bound = log_scale_bound
        self.marginal_bins = marginal_bins
        self.max_components = max_components
        self.box_margin = box_margin
        self.device = None if device is None else torch.device(device)
        self.component_scores: dict[int, float] = {}
        self.initialized = False
        self._last_site = _LastSite()
        super().__init__(self._last_site(model), init_loc_fn=init_loc_fn)

    # -- set-up -------------------------------------------------------------------------

    def _setup_prototype(self, *args, **kwargs) -> None:
        recorder = self._last_site
        try:
            with pyro.validation_enabled(False):
                super()._setup_prototype(*args, **kwargs)
        except NotImplementedError as err:
            site = recorder.site
            if site is not None and not site["is_observed"] and cannot_sample(site["fn"]):
                raise ValueError(
                    f"Latent site '{site['name']}' has an improper prior ({type(site['fn']).__name__}) "
                    "that cannot be sampled; likelihood weighting draws from the prior, so give it "
                    "a proper prior (e.g. dist.Normal(0, 10) or dist.Uniform(low, high))."
                ) from err
            if self.prototype_trace is not None:
                Layout.from_trace(self.prototype_trace)  # raises the clearer error, naming the site
            raise
        except ValueError:
            if self.prototype_trace is not None:
                Layout.from_trace(self.prototype_trace)
            raise
        self.layout = Layout.from_trace(self.prototype_trace)
        self.transform = self._new_transform()
        k = 1 if self.num_components == "auto" else self.num_components
        loc = self.to_flow_coordinates(self._init_loc().detach().to(self.device))
        with torch.random.fork_rng(devices=[]):  # a placeholder until initialize(): leave the RNG stream alone
            spread = torch.randn(k, self.latent_dim, dtype=loc.dtype, device=loc.device) if k > 1 else 0.0
        self.set_mixture(torch.zeros(k), loc + spread, torch.ones(k, self.latent_dim), like=loc)

    def _new_transform(self) -> FlowStack:
        """Couplings and the marginal spline (starting at the identity), then the fixed maps to
        Pyro's unconstrained coordinates: :class:`~pyro_lwflow.coordinates.Standardize` and, unless
        ``box_margin`` is ``None``, :class:`~pyro_lwflow.coordinates.BoxCoordinates`."""
        parts = list(realnvp(self.latent_dim, self.num_transforms, self.hidden_dims, self.log_scale_bound).parts)
        if self.marginal_bins is not None:
            parts.append(marginal_spline(self.latent_dim, self.marginal_bins))
        parts.append(Standardize(self.latent_dim))
        if self.box_margin is not None:
            parts.append(box_coordinates(self.prototype_trace, self.layout, self.box_margin))
        return FlowStack(parts).to(self.device)

    def _fixed_parts(self) -> list:
        """The trailing parameter-free maps of the transform, in order."""
        parts = self.transform.parts
        n = len(parts)
        while n and isinstance(parts[n - 1], (Standardize, BoxCoordinates)):
            n -= 1
        return parts[n:]

    @property
    def standardize(self) -> Standardize:
        """The fixed affine map that standardises the flow's coordinates (fitted on the first draws)."""
        return next(p for p in self._fixed_parts() if isinstance(p, Standardize))

    def model_units(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed unconstrained latents ``(..., D)`` → linear in θ inside bounded supports (see
        ``box_margin``), before standardising."""
        for part in reversed(self._fixed_parts()):
            if not isinstance(part, Standardize):
                latents = part.inv(latents)
        return latents

    def to_flow_coordinates(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed unconstrained latents ``(..., D)`` → the coordinates the couplings output and the
        mixture starts in: standardised (mean 0, spread 1 over the posterior), and linear in θ
        inside bounded supports (see ``box_margin``)."""
        return self.standardize.inv(self.model_units(latents))

    def set_mixture(
        self, logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor, like: torch.Tensor | None = None
    ) -> None:
        """Replace the base mixture: ``(K,)`` logits, ``(K, D)`` locations and diagonal scales, in the
        flow's coordinates (:meth:`to_flow_coordinates`)."""
        like = self.component_loc if like is None else like
        self.mixture_logits = PyroParam(logits.to(like))
        self.component_loc = PyroParam(locs.to(like))
        self.component_scale = PyroParam(scales.to(like), constraint=constraints.positive)

    @torch.no_grad()
    def initialize(
        self,
        draws: WeightedDraws,
        mixture: GaussianMixtureFit | None = None,
        seed: int = 0,
        num_components: int | None = None,
    ) -> None:
        """Place the base components on the modes of the weighted draws
        (:func:`~pyro_lwflow.modes.find_modes`, with ``num_components`` if given), or on ``mixture``.

        Each component's weight, mean and diagonal scale come from the fitted mixture, so each
        starts on its own mode; the coupling layers are left as they are (the identity when new).
        The first time, the flow's coordinates are also standardised on the draws
        (:class:`~pyro_lwflow.coordinates.Standardize`).
        """
        if self.prototype_trace is None:
            raise RuntimeError("call the guide (or LikelihoodWeightedKL) on the model's data first")
        if not self.initialized and mixture is None:  # once: later mixtures live in these coordinates
            points = resample_points(draws, 5_000, torch.Generator().manual_seed(seed)).to(self.component_loc)
            self.standardize.fit_(self.model_units(points))
        fit = mixture if mixture is not None else find_modes(self, draws, seed=seed, num_components=num_components)
        scales = torch.diagonal(fit.covariances, dim1=-2, dim2=-1).sqrt().clamp_min(1e-3)
        self.set_mixture(fit.weights.log(), fit.means, scales)
        self.initialized = True

    @torch.no_grad()
    def reset(
        self,
        draws: WeightedDraws,
        mixture: GaussianMixtureFit | None = None,
        seed: int = 0,
        num_components: int | None = None,
        restandardize: bool = False,
    ) -> None:
        """Start again from the identity flow and a mixture placed on the draws' modes (with
        ``restandardize``, in coordinates standardised afresh on the draws)."""
        # the mixture lives in the fixed maps' coordinates: keep them
        fixed = [{k: v.clone() for k, v in p.state_dict().items()} for p in self._fixed_parts()]
        del self.transform  # also drops its entries from Pyro's param store
        self.transform = self._new_transform()
        for state, new in zip(fixed, self._fixed_parts(), strict=True):
            new.load_state_dict(state)
        if restandardize:
            self.initialized = False
        self.initialize(draws, mixture, seed=seed, num_components=num_components)

    @torch.no_grad()
    def frozen_posterior(self) -> dist.TransformedDistribution:
        """A detached copy of the current ``q`` over packed latents, unaffected by later training."""
        base = dist.MixtureSameFamily(
            dist.Categorical(logits=self.mixture_logits.detach().clone()),
            dist.Normal(self.component_loc.detach().clone(), self.component_scale.detach().clone()).to_event(1),
        )
        with torch.random.fork_rng(devices=[]):  # a new stack's initial values are overwritten: leave the RNG
            transform = self._new_transform()
        # a state copy, not a deepcopy: the couplings cache tensors of the last training graph
        transform.load_state_dict(self.transform.state_dict())
        return dist.TransformedDistribution(base, transform.requires_grad_(False))

    @torch.no_grad()
    def refit_mixture_weights(self, draws: WeightedDraws, max_iters: int = 200, tol: float = 1e-6) -> None:
        """Set the mixture weights to their weighted maximum-likelihood value given the flow.

        EM on the weights alone: the flow and the components stay fixed, so each component's
        responsibility for each draw is computed once in the base space; it stops when no weight
        moves by more than ``tol``. Stochastic gradients leave the weights noisy by about the
        minibatch's own sampling error; this removes that noise, leaving only the draws'
        (ESS-limited) error.
        """
        if self.mixture_logits.shape[0] == 1:
            return
        weights, log_comp = self._weighted_components(draws)
        pi = torch.softmax(self.mixture_logits, 0)
        for _ in range(max_iters):
            resp = torch.softmax(log_comp + pi.clamp_min(1e-12).log(), -1)
            new = weights @ resp
            done = float((new - pi).abs().max()) < tol
            pi = new
            if done:
                break
        log_pi = pi.clamp_min(1e-12).log()
        # in place, so an optimiser holding the parameter keeps working
        self.mixture_logits_unconstrained.data.copy_(log_pi - log_pi.logsumexp(0))

    @torch.no_grad()
    def mixture_weight_stderr(self, draws: WeightedDraws) -> torch.Tensor:
        """``(K,)`` standard errors of the mixture weights that ``draws`` estimate: component k's
        weight is ``π̂ₖ = Σᵢ w̄ᵢ rᵢₖ`` (``w̄`` the normalised importance weights, ``rᵢₖ`` its
        responsibility for draw i), with variance ``Σᵢ w̄ᵢ² (rᵢₖ − π̂ₖ)²`` (the delta method). With the
        components on the modes, these are the errors of the modes' masses."""
        if self.mixture_logits.shape[0] == 1:
            return torch.zeros(1)
        weights, log_comp = self._weighted_components(draws)
        resp = torch.softmax(log_comp + torch.log_softmax(self.mixture_logits, 0), -1)
        estimate = weights @ resp
        return torch.sqrt((weights.unsqueeze(-1) ** 2 * (resp - estimate) ** 2).sum(0)).cpu()

    def _weighted_components(self, draws: WeightedDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """``((M,) normalised weights, (M, K) component log densities in the base space)`` of the
        draws carrying all but 1e-6 of the weight (a few percent of a prior sample)."""
        order = torch.argsort(draws.weights, descending=True)
        mass = torch.cumsum(draws.weights[order], 0)
        keep = order[: int(torch.searchsorted(mass, torch.tensor(1 - 1e-6, dtype=mass.dtype))) + 1]
        weights = draws.weights[keep]
        weights = (weights / weights.sum()).to(self.component_loc)
        comps = dist.Normal(self.component_loc, self.component_scale).to_event(1)
        log_comp = torch.cat([  # in chunks to bound the flow's activations
            comps.log_prob(self.transform.inv(chunk.to(self.component_loc)).unsqueeze(-2))
            for chunk in draws.latents[keep].split(65_536)
        ])
        return weights, log_comp

    # -- the distribution ---------------------------------------------------------------

    def get_base_dist(self) -> dist.MixtureSameFamily:
        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.mixture_logits),
            dist.Normal(self.component_loc, self.component_scale).to_event(1),
        )

    def get_transform(self, *args, **kwargs):
        return self.transform

    # -- conveniences -------------------------------------------------------------------

    @pyro_method
    def latent_log_prob(self, latents: torch.Tensor) -> torch.Tensor:
        """``log q`` of packed unconstrained latents ``(*batch, D) → (*batch,)``.

        A Pyro method: the parameters it touches are registered with the param store, so
        :class:`pyro.infer.SVI` optimises them.
        """
        return self.get_posterior().log_prob(latents)

    def log_density(self, values: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Exact ``log q`` of constrained site values, Jacobians of the support maps included.

        :param values: ``{site: (*batch, *site_shape)}`` for every latent site; for a model with one
            latent site, its values as a bare tensor also work.
        :returns: ``(*batch,)`` log densities with respect to Lebesgue measure on the
            constrained values.
        :raises TypeError: for a bare tensor when the model has several latent sites.
        """
        self._require_setup()
        if isinstance(values, torch.Tensor):
            if len(self.layout) != 1:
                raise TypeError(
                    f"log_density got a tensor, but the model has {len(self.layout)} latent sites "
                    f"({self.layout.names}): pass a dict {{site: values}}."
                )
            values = {self.layout[0].name: values}
        elif not isinstance(values, dict):
            raise TypeError(f"log_density takes a dict {{site: values}}, got {type(values).__name__}")
        values = {k: torch.as_tensor(v).to(self.component_loc) for k, v in values.items()}
        latents, log_det = self.layout.pack(values)
        return self.latent_log_prob(latents) - log_det

    @torch.no_grad()
    def sample_posterior(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``{site: (num_samples, *site_shape)}`` constrained draws, without running the model."""
        self._require_setup()
        return self.layout.unpack(self.get_posterior().sample((num_samples,)))

    @torch.no_grad()
    def quantiles(self, quantiles, *args, num_samples: int = 10_000, **kwargs) -> dict[str, torch.Tensor]:
        """Monte Carlo quantiles of each site: ``{site: (len(quantiles), *site_shape)}``.

        As in Pyro's ``AutoContinuous``, the quantiles are taken coordinate by coordinate in the
        unconstrained space and mapped to the support, so each is a valid value of its site (a
        point on the simplex, a Cholesky factor); for elementwise supports (real, positive,
        intervals) they are the quantiles of the constrained values themselves.
        """
        self.setup(*args, **kwargs)
        latents = self.get_posterior().sample((num_samples,)).double()
        q = torch.as_tensor(quantiles, dtype=torch.float64, device=latents.device)
        return self.layout.unpack(torch.quantile(latents, q, dim=0).to(self.component_loc))

    @torch.no_grad()
    def median(self, *args, num_samples: int = 10_000, **kwargs) -> dict[str, torch.Tensor]:
        """Monte Carlo posterior median of each site: ``{site: site_shape}``."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, num_samples=num_samples, **kwargs).items()}

    def setup(self, *args, **kwargs) -> AutoLWFlow:
        """Trace the model once on its data (``model(*args, **kwargs)``), if not done yet: the
        prototype trace fixes the latent sites, their shapes and supports. Returns the guide."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def require_setup(self) -> None:
        """Raise a clear error if the guide has not seen the model yet."""
        self._require_setup()

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                "The guide has not seen the model yet: fit it first (fit(), or SVI with "
                "LikelihoodWeightedKL), or call guide(*model_args) once."
            )
