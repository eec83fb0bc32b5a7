"""Running a Pyro model for a batch of latent draws: prior draws, log-likelihoods, pointwise terms.

:class:`ModelTracer` is the one place the library runs the user's model. For ``N`` draws it traces
the model once under a vectorising particle plate (dimension ``-max_plate_nesting - 1``), after
checking on a few draws that this gives what tracing draw by draw gives (where both are finite: a
model may overflow differently on part of the prior); a model that does not vectorise (a NumPy
black box, Python control flow) is traced draw by draw, with a warning giving the reason. It also
checks, once, what a fixed-dimension flow over Pyro's unconstrained space cannot represent, and says
so naming the site: NaN in the data, a randomly subsampled data plate, a support that depends on
another latent, latent sites that change with the drawn values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from .layout import Layout

__all__ = ["Evaluation", "ModelStructureError", "ModelTracer", "as_model_data", "observed_site_names"]

_PARTICLES = "_lwflow_particles"
_TOLERANCE = {"rtol": 1e-4, "atol": 1e-3, "equal_nan": True}


class ModelStructureError(ValueError):
    """The model has a shape the method cannot handle (the message names the site and the fix)."""


@dataclass
class Evaluation:
    """The model's log densities at ``N`` draws.

    :param log_likelihood: ``(N,)`` float64, summed log-prob of every observed site (NaN where the
        model raised for that draw).
    :param log_prior: ``(N,)`` float64 log prior density of the unconstrained latents.
    :param num_failed: draws for which the model raised (traced draw by draw only).
    :param first_error: ``"ExceptionType: message"`` of the first of them.
    """

    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    num_failed: int = 0
    first_error: str | None = None


def as_model_data(obj):
    """The model's arguments with NumPy arrays and (nested) lists of numbers as torch tensors.

    Floating data take torch's default dtype; integers stay int64 (indices keep working).
    Anything else is returned as it is.
    """
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "fiub":
        return _tensor(torch.as_tensor(obj))
    if isinstance(obj, list) and obj and _is_numeric(obj):
        return _tensor(torch.as_tensor(obj))
    if isinstance(obj, tuple):
        return tuple(as_model_data(o) for o in obj)
    if isinstance(obj, dict):
        return {k: as_model_data(v) for k, v in obj.items()}
    return obj


def _is_numeric(obj) -> bool:
    if isinstance(obj, list):
        return all(_is_numeric(o) for o in obj)
    return isinstance(obj, (int, float, bool)) and not isinstance(obj, str)


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.get_default_dtype()) if t.is_floating_point() else t


def observed_site_names(trace: poutine.Trace) -> list[str]:
    """Names of every observed site (``obs=`` and ``pyro.factor``) in trace order."""
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and site["is_observed"]]


class ModelTracer:
    """Evaluates a Pyro model's prior and likelihood for batches of packed latents.

    :param model: the Pyro model.
    :param layout: its latent sites (:class:`~pyro_lwflow.layout.Layout` of the prototype trace).
    :param args, kwargs: the model's arguments (the data); NumPy arrays and lists of numbers become
        tensors (:func:`as_model_data`).
    :raises ValueError: naming the site, for data of the wrong shape or holding NaN, a model with no
        observed site, or an observed site in a randomly subsampled plate.
    """

    def __init__(self, model: Callable, layout: Layout, args: tuple = (), kwargs: dict | None = None) -> None:
        self.model = model
        self.layout = layout
        self.args = as_model_data(tuple(args))
        self.kwargs = as_model_data(dict(kwargs or {}))
        full = self._first_trace()
        self.observed = observed_site_names(full)
        if not self.observed:
            raise ValueError(
                "The model has no observed site, so there is nothing to weight the prior draws by. "
                "Pass the data as obs= to the likelihood's pyro.sample, or add the log-likelihood "
                "with pyro.factor('loglik', value)."
            )
        _check_observed_data(full, self.observed)
        _check_subsampling(full)
        self.max_plate_nesting = max(
            (-f.dim for s in full.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]
             if f.vectorized),
            default=0,
        )
        self.vectorized: bool | None = None  # the likelihood: decided by check_vectorization()
        self.prior_vectorized: bool | None = None  # the prior part alone: decided on the first prior draws

    @property
    def dim(self) -> int:
        return self.layout.dim

    # -- traces -----------------------------------------------------------------------------

    def trace(self, values: dict[str, torch.Tensor] | None, n: int | None, stop_after_latents: bool = False,
              grad: bool = False):
        """One trace of the model, conditioned on ``values`` if given, log-probs computed.

        :param n: draws stacked under the particle plate; ``None`` for one unbatched draw.
        :param stop_after_latents: stop the model once every latent site has a value (the
            likelihood is not computed: cheap prior draws).
        :param grad: record the autograd graph (for :meth:`log_joint`).
        """
        with torch.set_grad_enabled(grad):
            return self._trace(values, n, stop_after_latents)

    def _trace(self, values, n, stop_after_latents):
        model = self.model if values is None else poutine.condition(self.model, values)
        model = poutine.block(model, hide_types=["param"])
        if stop_after_latents:
            model = _StopAfterLatents(self.layout.names)(model)
        tracer = poutine.trace(model)
        # Validation off: a NaN log-likelihood must reach the weight checks (which drop the draw)
        # instead of failing the whole batch; shape errors still surface, naming the site.
        with pyro.validation_enabled(False):
            try:
                if n is None:
                    tracer(*self.args, **self.kwargs)
                else:
                    with pyro.plate(_PARTICLES, n, dim=-self.max_plate_nesting - 1):
                        tracer(*self.args, **self.kwargs)
            except _LatentsDrawn:
                pass
            trace = tracer.msngr.trace
            _compute_log_prob(trace)
        return trace

    def _first_trace(self, attempts: int = 10) -> poutine.Trace:
        """A full unbatched trace; a black box that raises on part of the prior gets other draws."""
        self.max_plate_nesting = 0  # unbatched traces only, until the plates are known
        for _ in range(attempts - 1):
            try:
                return self.trace(None, None)
            except ValueError:  # a data or shape error, naming the site: no other draw helps
                raise
            except Exception:  # noqa: BLE001 - the last attempt below raises it
                continue
        return self.trace(None, None)

    # -- prior draws ------------------------------------------------------------------------

    def prior_latents(self, n: int) -> torch.Tensor:
        """``(n, D)`` float32 prior draws of the packed unconstrained latents (global torch RNG).

        The model runs only until its last latent site has a value. The first call checks, on a
        few draws traced one by one, that every site's support stays fixed and that the latent
        sites do not change with the drawn values, and whether the particle plate vectorises
        the prior part.
        """
        if self.prior_vectorized is None:
            with torch.random.fork_rng(devices=[]):  # the checks must not shift the caller's stream
                self.prior_vectorized = self._check_prior()
        if self.prior_vectorized:
            return self._pack(self.trace(None, n, stop_after_latents=True), n)[0].float()
        parts = [self._pack(self.trace(None, None, stop_after_latents=True), None)[0] for _ in range(n)]
        return torch.cat(parts).float() if parts else torch.empty(0, self.dim)

    def _check_prior(self, k: int = 3) -> bool:
        """Structure and support checks on ``k`` draw-by-draw traces; whether vectorising works."""
        rows = []
        for _ in range(k):
            trace = self.trace(None, None, stop_after_latents=True)
            _check_supports(trace, self.layout)
            rows.append(self._pack(trace, None))
        lat, lp_seq = (torch.cat(x) for x in zip(*rows, strict=True))
        try:
            trace = self.trace(self._values(lat), k, stop_after_latents=True)
            lp_vec = self._pack(trace, k)[1]
        except Exception:  # noqa: BLE001 - any failure means "not vectorisable"
            return False
        return bool(torch.allclose(lp_vec, lp_seq, **_TOLERANCE))

    # -- likelihood -------------------------------------------------------------------------

    def log_densities(self, latents: torch.Tensor) -> Evaluation:
        """Log-likelihood and log prior density at ``(N, D)`` packed unconstrained latents.

        Call :meth:`check_vectorization` first (on any latents); until then the draws are traced
        one at a time. Traced draw by draw, a draw for which the model raises gets a NaN
        log-likelihood and is counted in :attr:`Evaluation.num_failed`.
        """
        latents = latents.detach().to("cpu", torch.float32)
        if self.vectorized:
            log_lik, log_prior = self._vectorized(latents)
            return Evaluation(log_lik, log_prior)
        return self._sequential(latents)

    def log_joint(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable ``(log-likelihood, log prior)``, each ``(N,)`` float64, at ``(N, D)`` packed
        unconstrained latents (Jacobians included): traced in one vectorised pass, or, for a model
        that does not vectorise (see :meth:`check_vectorization`), one draw at a time, each trace
        keeping its autograd graph. Traced draw by draw, a draw for which the model raises gets NaN
        (and no gradient).
        """
        if not self.vectorized:
            return self._log_joint_sequential(latents)
        n = latents.shape[0]
        trace = self.trace(self._values(latents), n, grad=True)
        dim = -self.max_plate_nesting - 1
        log_lik = sum(_per_draw(trace.nodes[name]["log_prob"], n, dim) for name in self.observed)
        return log_lik, self._pack(trace, n)[1]

    def _log_joint_sequential(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        log_lik, log_prior = [], []
        for i in range(latents.shape[0]):
            try:
                trace = self.trace(self._values(latents[i : i + 1], batched=False), None, grad=True)
                with torch.set_grad_enabled(True):
                    lp = self._pack(trace, None)[1][0]
                    ll = sum(trace.nodes[k]["log_prob"].sum().double() for k in self.observed)
            except ModelStructureError:
                raise
            except Exception:  # noqa: BLE001 - a model that fails in a region of the prior
                ll = lp = nan
            log_lik.append(torch.as_tensor(ll, dtype=torch.float64))
            log_prior.append(lp)
        if not log_lik:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        return torch.stack(log_lik), torch.stack(log_prior)

    def check_vectorization(self, latents: torch.Tensor, k: int = 3, probe: int = 64, max_traced: int = 8) -> None:
        """Decide, once, whether the model vectorises: trace draws of ``latents`` both ways and compare
        their log-likelihoods where both are finite.

        The first ``k`` draws are traced both ways; if fewer than ``k`` of them have a finite
        log-likelihood both ways (a model that overflows on part of the prior, e.g. an explosive
        recursion), the best of the first ``probe`` draws by their vectorised log-likelihood are
        traced one by one too, up to ``max_traced`` in all. Draws where either way is not finite
        (``-inf``, ``inf``, NaN: overflow, or a model that raises there) are not compared. A model
        that does not vectorise is traced one draw at a time from then on, with a warning giving
        the reason.
        """
        if self.vectorized is not None:
            return
        sample = latents[:probe].detach().to("cpu", torch.float32)
        first = sample[:k]
        seq = self._sequential(first)
        if seq.num_failed == first.shape[0]:  # no draw can be traced at all: a bug in the model, not a region
            self.trace(self._values(first[:1], batched=False), None)
        try:
            ll_vec, _ = self._vectorized(first)
        except ModelStructureError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure means "not vectorisable"
            reason = f"tracing it under a vectorising pyro.plate failed ({type(err).__name__}: {err})"
        else:
            ll_seq = seq.log_likelihood
            both = torch.isfinite(ll_vec) & torch.isfinite(ll_seq)
            if int(both.sum()) < k and sample.shape[0] > k:
                ll_vec, ll_seq = self._more_draws(sample[k:], ll_vec, ll_seq, k - int(both.sum()),
                                                  max_traced - first.shape[0])
                both = torch.isfinite(ll_vec) & torch.isfinite(ll_seq)
            if both.any():
                if torch.allclose(ll_vec[both], ll_seq[both], **_TOLERANCE):
                    self.vectorized = True
                    return
                reason = (
                    "its log-likelihood under a vectorising pyro.plate differs from draw-by-draw "
                    f"tracing ({ll_vec[both].tolist()} vs {ll_seq[both].tolist()})"
                )
            elif not torch.isfinite(ll_seq).any():  # not finite either way at any draw tried: nothing contradicts it
                self.vectorized = True
                return
            else:
                reason = (
                    "its log-likelihood under a vectorising pyro.plate is not finite at any of the first "
                    f"{sample.shape[0]} draws, while draw-by-draw tracing gives finite values "
                    f"({ll_vec.tolist()} vs {ll_seq.tolist()})"
                )
        self.vectorized = False
        warnings.warn(
            f"The model is traced one draw at a time because {reason}. This is much slower; to "
            "vectorise, write the model so every site broadcasts over an extra batch dimension on "
            "the left (use pyro.plate for data, .to_event() for vector latents, torch ops not Python "
            "loops or float()).",
            stacklevel=4,
        )

    def _more_draws(self, sample: torch.Tensor, ll_vec: torch.Tensor, ll_seq: torch.Tensor, need: int,
                    budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ll_vec``, ``ll_seq`` extended by up to ``need`` draws of ``sample`` with a finite
        vectorised log-likelihood (the highest first), traced one by one until ``need`` of them are
        finite both ways or ``budget`` draws are traced."""
        try:
            more, _ = self._vectorized(sample)
        except ModelStructureError:
            raise
        except Exception:  # noqa: BLE001 - a batch holding a failing draw: decide on the first draws
            return ll_vec, ll_seq
        order = torch.argsort(torch.nan_to_num(more, nan=-math.inf), descending=True)
        order = order[torch.isfinite(more[order])][: max(budget, 0)]
        vec, seq = [ll_vec], [ll_seq]
        for i in order.tolist():
            if need <= 0:
                break
            value = self._sequential(sample[i : i + 1]).log_likelihood
            vec.append(more[i : i + 1])
            seq.append(value)
            need -= int(torch.isfinite(value).all())
        return torch.cat(vec), torch.cat(seq)

    def _vectorized(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = latents.shape[0]
        trace = self.trace(self._values(latents), n)
        dim = -self.max_plate_nesting - 1
        log_lik = torch.zeros(n, dtype=torch.float64)
        for name in self.observed:
            log_lik += _per_draw(trace.nodes[name]["log_prob"], n, dim)
        return log_lik, self._pack(trace, n)[1]

    def _sequential(self, latents: torch.Tensor) -> Evaluation:
        n = latents.shape[0]
        log_lik = torch.full((n,), math.nan, dtype=torch.float64)
        log_prior = torch.full((n,), math.nan, dtype=torch.float64)
        failed, first = 0, None
        for i in range(n):
            try:
                trace = self.trace(self._values(latents[i : i + 1], batched=False), None)
                log_prior[i] = self._pack(trace, None)[1][0]
            except ModelStructureError:
                raise
            except Exception as err:  # noqa: BLE001 - a simulator that fails in a region of the prior
                failed += 1
                first = first or f"{type(err).__name__}: {err}"
                continue
            log_lik[i] = sum(float(trace.nodes[k]["log_prob"].sum()) for k in self.observed)
        return Evaluation(log_lik, log_prior, failed, first)

    def pointwise_log_likelihood(self, latents: torch.Tensor, totals: torch.Tensor,
                                 chunk_size: int = 10_000) -> dict[str, torch.Tensor]:
        """``{observed site: (N, *data_shape)}`` log-probs at ``(N, D)`` latents.

        Traced in one vectorised pass per chunk; if the per-draw sums disagree with ``totals``
        (:meth:`log_densities`' checked per-draw log-likelihoods), one draw at a time instead.
        """
        n = latents.shape[0]
        one = self.trace(self._values(latents[:1], batched=False), None)
        shapes = {k: one.nodes[k]["log_prob"].shape for k in self.observed}
        try:
            parts = [self._pointwise(latents[i : i + chunk_size], shapes) for i in range(0, n, chunk_size)]
            out = {k: torch.cat([p[k] for p in parts]) for k in shapes}
            total = sum(v.double().reshape(n, -1).sum(-1) for v in out.values())
            if not torch.allclose(total, totals, **_TOLERANCE):
                raise ValueError("vectorised pointwise log-likelihood disagrees with the per-draw totals")
        except (RuntimeError, ValueError) as err:
            if self.vectorized:
                warnings.warn(f"Tracing the pointwise log-likelihood one draw at a time ({err}).", stacklevel=3)
            rows = [self.trace(self._values(latents[i : i + 1], batched=False), None) for i in range(n)]
            out = {k: torch.stack([r.nodes[k]["log_prob"] for r in rows]) for k in shapes}
        return out

    def _pointwise(self, latents: torch.Tensor, shapes: dict) -> dict[str, torch.Tensor]:
        m = latents.shape[0]
        trace = self.trace(self._values(latents), m)
        out = {}
        for name in self.observed:
            lp = trace.nodes[name]["log_prob"]
            while lp.dim() < self.max_plate_nesting + 1:
                lp = lp.unsqueeze(0)
            lp = lp.expand((m,) + tuple(lp.shape[1:])).reshape(m, -1)
            if lp.shape[1] != math.prod(shapes[name]):
                raise ValueError(f"site '{name}' has log-prob shape {tuple(lp.shape)} under vectorisation")
            out[name] = lp.reshape((m,) + tuple(shapes[name]))
        return out

    @torch.no_grad()
    def observed_values(self) -> dict[str, np.ndarray]:
        """``{site: value}`` of the observed sites that carry data (``pyro.factor`` sites carry none)."""
        trace = self.trace(None, None)
        return {
            name: trace.nodes[name]["value"].detach().cpu().numpy()
            for name in self.observed
            if not trace.nodes[name]["infer"].get("is_auxiliary") and trace.nodes[name]["value"].numel() > 0
        }

    # -- packing ----------------------------------------------------------------------------

    def _values(self, latents: torch.Tensor, batched: bool = True) -> dict[str, torch.Tensor]:
        values = self.layout.unpack(latents)
        if batched:
            return self.layout.batched(values, self.max_plate_nesting)
        return {k: v[0] for k, v in values.items()}

    def _pack(self, trace: poutine.Trace, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``((n, D) unconstrained latents, (n,) float64 log prior)`` of a trace's latent sites;
        ``n=None`` for an unbatched trace (one draw)."""
        dim = -self.max_plate_nesting - 1
        rows = 1 if n is None else n
        if n is None:
            _check_structure(trace, self.layout)
        log_prior = torch.zeros(rows, dtype=torch.float64)
        packed = []
        for s in self.layout:
            site = trace.nodes[s.name]
            value = site["value"]
            if value.numel() != rows * math.prod(s.shape):
                raise RuntimeError(f"site '{s.name}' has shape {tuple(value.shape)} under vectorisation")
            u = s.transform.inv(value)
            ladj = s.transform.log_abs_det_jacobian(u, value)
            if n is None:
                log_prior = log_prior + (site["log_prob"].sum() + ladj.sum()).double()
            else:
                ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + site["fn"].event_dim)
                log_prior += _per_draw(site["log_prob"] + ladj, n, dim)
            packed.append(u.reshape(rows, -1))
        return torch.cat(packed, -1), log_prior


# -- checks -----------------------------------------------------------------------------------


def _check_observed_data(trace: poutine.Trace, observed: list[str]) -> None:
    for name in observed:
        site = trace.nodes[name]
        if site["infer"].get("is_auxiliary"):  # a pyro.factor: its value is the log-likelihood itself
            continue
        value = site["value"]
        if value.is_floating_point() and not torch.isfinite(value).all():
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            raise ValueError(
                f"The data observed at site '{name}' hold {nan} NaN and {inf} infinite values (of "
                f"{value.numel()}), so every draw's likelihood would be NaN. Drop those points, or fill "
                f"them and mask them out: pyro.sample('{name}', dist.Normal(...).mask(torch.isfinite(y)), "
                "obs=y.nan_to_num())."
            )


def _check_subsampling(trace: poutine.Trace) -> None:
    for name, site in trace.nodes.items():
        fn = site.get("fn")
        if site["type"] == "sample" and isinstance(fn, _Subsample) and fn.subsample_size is not None \
                and fn.subsample_size < fn.size:
            data = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]
                    and any(f.name == name for f in s["cond_indep_stack"])]
            raise ModelStructureError(
                f"Plate '{name}' draws a random subsample (subsample_size={fn.subsample_size} of {fn.size}) "
                f"each time the model runs, so the likelihood of {data or 'its sites'} would be a different "
                "random estimate for every draw and the weights would be noise. Remove subsample_size= for "
                "fitting: each draw is weighted by one vectorised pass over the data, so minibatching saves "
                "nothing here (a fixed subsample= is used as given)."
            )


def _support_parameters(c: constraints.Constraint) -> list[torch.Tensor]:
    out = []
    for key, value in sorted(vars(c).items()):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, constraints.Constraint):
            out.extend(_support_parameters(value))
        elif isinstance(value, (int, float)) and key not in ("reinterpreted_batch_ndims", "_event_dim"):
            out.append(torch.tensor(float(value)))
    return out


def _check_supports(trace: poutine.Trace, layout: Layout) -> None:
    """Every site's support is the prototype's: not a function of another latent's value."""
    _check_structure(trace, layout)
    for s in layout:
        now, then = _support_parameters(trace.nodes[s.name]["fn"].support), _support_parameters(s.support)
        same = len(now) == len(then) and all(
            torch.allclose(*torch.broadcast_tensors(a.double(), b.double()), rtol=1e-6, atol=0, equal_nan=True)
            for a, b in zip(now, then, strict=True)
        )
        if not same:
            raise ModelStructureError(
                f"The support of latent site '{s.name}' ({s.support}) changes from draw to draw: it depends "
                "on another latent site. Like Pyro's AutoContinuous, AutoLWFlow fixes each support at the "
                "prototype trace, so its draws would leave the true support. Give the site a fixed support "
                f"and rescale it, e.g. {s.name}_unit = pyro.sample('{s.name}_unit', dist.Uniform(0., 1.)) and "
                f"{s.name} = pyro.deterministic('{s.name}', low + (high - low) * {s.name}_unit)."
            )


def _check_structure(trace: poutine.Trace, layout: Layout) -> None:
    """The trace has exactly the layout's latent sites, with the prototype's shapes (latents the trace
    was conditioned on count as latent)."""
    present = {name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)}
    for s in layout:
        if s.name not in present:
            raise ModelStructureError(
                f"Latent site '{s.name}' is missing from a trace of the model: the model's latent sites "
                "change with the drawn values (dynamic structure), which a flow of fixed dimension cannot "
                "represent. Write the model so every run samples the same sites with the same shapes "
                "(e.g. sample the largest set and mask the unused ones)."
            )
        shape = trace.nodes[s.name]["value"].shape
        if shape != s.shape:
            raise ModelStructureError(
                f"Latent site '{s.name}' has shape {tuple(shape)} in one draw and {tuple(s.shape)} in the "
                "prototype trace: its shape changes with the drawn values (dynamic structure), which a flow "
                "of fixed dimension cannot represent. Give it a fixed shape (e.g. the largest, masked)."
            )
    extra = [name for name, site in trace.iter_stochastic_nodes()
             if name not in layout.names and not site_is_subsample(site)]
    if extra:
        raise ModelStructureError(
            f"Latent site(s) {extra} appear in a trace of the model but not in the prototype trace: the "
            "model's latent sites change with the drawn values (dynamic structure), which a flow of fixed "
            "dimension cannot represent. Write the model so every run samples the same sites."
        )


class _LatentsDrawn(Exception):
    """Raised by :class:`_StopAfterLatents` to end a prior trace early."""


class _StopAfterLatents(Messenger):
    """Stops the model (by raising :class:`_LatentsDrawn`) once every named site has a value.

    Enter it inside ``poutine.trace`` so the trace records the last site before the stop.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = frozenset(names)
        self.pending: set[str] = set()

    def __enter__(self):
        self.pending = set(self.names)
        return super().__enter__()

    def _pyro_post_sample(self, msg: dict) -> None:
        self.pending.discard(msg["name"])
        if not self.pending:
            raise _LatentsDrawn


def _compute_log_prob(trace: poutine.Trace) -> None:
    """``trace.compute_log_prob()``, re-raising any error with the failing site's name."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"] and not isinstance(site["value"], torch.Tensor):
            raise ValueError(
                f"The data observed at site '{name}' is a {type(site['value']).__name__}, not a tensor; pass "
                "obs=torch.as_tensor(...) there."
            )
        try:
            trace.compute_log_prob(site_filter=lambda n, _s, name=name: n == name)
        except (RuntimeError, ValueError) as err:
            observed = "observed " if site["is_observed"] else ""
            raise ValueError(
                f"Computing the log-prob of {observed}site '{name}' failed: {err}. Check that the data "
                f"passed for '{name}' has the shape the model's distribution there expects "
                f"(batch {tuple(site['fn'].batch_shape)}, event {tuple(site['fn'].event_shape)})."
            ) from err


def _per_draw(log_prob: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Sum a site's log-prob over every dimension but the particle dimension ``dim``."""
    log_prob = log_prob.double()
    while log_prob.dim() < -dim:
        log_prob = log_prob.unsqueeze(0)
    log_prob = log_prob.movedim(dim, 0).reshape(log_prob.shape[dim], -1).sum(-1)
    return log_prob.expand(n)
