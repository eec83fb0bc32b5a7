"""Pyro model → weighted draws: prior traces, packed unconstrained latents, log-likelihoods."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to
from tqdm.auto import tqdm

from . import evaluation
from .draws import WeightedDraws

__all__ = ["LatentSite", "PriorAdapter", "latent_sites", "observed_site_names"]

_PARTICLES = "_lwflow_particles"


@dataclass(frozen=True)
class LatentSite:
    """One continuous latent site of the model and its slice of the packed vector."""

    name: str
    shape: torch.Size  # constrained value shape in the prototype trace
    event_dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def observed_site_names(trace: poutine.Trace) -> list[str]:
    """Names of every observed site (``obs=`` and ``pyro.factor``) in trace order."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"]
    ]


def latent_sites(trace: poutine.Trace) -> list[LatentSite]:
    """The packing layout of the continuous latent sites, in Pyro's prototype-trace order.

    Raises a clear error for the latent sites the method cannot handle.
    """
    layout, pos = [], 0
    for name, site in trace.iter_stochastic_nodes():
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"Latent site '{name}' is discrete ({type(fn).__name__}); AutoLWFlow needs every "
                "latent site to be continuous. Marginalise it out in the model (e.g. a mixture "
                "written with MixtureSameFamily), or observe it."
            )
        if isinstance(fn, dist.ImproperUniform) or _is_unsampleable(fn):
            raise ValueError(
                f"Latent site '{name}' has an improper prior ({type(fn).__name__}) that cannot be "
                "sampled; likelihood weighting draws from the prior, so give it a proper prior "
                "(e.g. dist.Normal(0, 10) or dist.Uniform(low, high))."
            )
        unconstrained = biject_to(fn.support).inv(site["value"])
        size = unconstrained.numel()
        layout.append(LatentSite(name, site["value"].shape, fn.event_dim, pos, pos + size))
        pos += size
    return layout


def _is_unsampleable(fn: dist.Distribution) -> bool:
    try:
        fn.sample()
    except NotImplementedError:
        return True
    return False


def _max_plate_nesting(trace: poutine.Trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


class PriorAdapter:
    """Evaluates a Pyro model for many latent draws at once.

    :param model: the Pyro model.
    :param prototype: a trace of the model's latent sites (``guide.prototype_trace``); its order
        is the packing order.
    :param args, kwargs: the model's arguments (the observed data).
    :param chunk_size: number of draws traced in one vectorised call; with an ``executor``, also the
        number of draws per task (pick it so every worker gets several chunks).
    :param executor: a :class:`concurrent.futures.Executor` (a process pool, or a Dask
        ``distributed.Client(...).get_executor()``) that evaluates the likelihood chunk by chunk;
        see :mod:`pyro_lwflow.evaluation`. The model and its arguments must be picklable (a process
        pool uses plain pickle: the model must be importable; Dask uses cloudpickle).
    :param cache_dir: a folder for one ``.npz`` per evaluated chunk, so an interrupted run resumes.
    :param seed: seeds the chunked path: chunk ``i`` is drawn from its own generator seeded by
        ``(seed, i)``, so the draws do not depend on the executor or on resumption. Giving any of
        ``executor``, ``cache_dir`` or ``seed`` selects that path; with none of them :meth:`sample`
        traces the model in-process on the global RNG stream, as before.
    :param retries: re-submissions of a chunk whose evaluation fails before giving up.
    :param max_in_flight: chunks submitted at once (bounds memory); default twice the workers.
    """

    def __init__(
        self,
        model: Callable,
        prototype: poutine.Trace,
        args: tuple = (),
        kwargs: dict | None = None,
        chunk_size: int = 100_000,
        *,
        executor: Executor | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int | None = None,
        retries: int = 2,
        max_in_flight: int | None = None,
    ) -> None:
        self.model = model
        self.args = args
        self.kwargs = kwargs or {}
        self.layout = latent_sites(prototype)
        full = self._trace(None, None)  # also surfaces data-shape errors, naming the site
        self.observed = observed_site_names(full)
        if not self.observed:
            raise ValueError(
                "The model has no observed site, so there is nothing to weight the prior draws by. "
                "Pass the data as obs= to the likelihood's pyro.sample, or add the log-likelihood "
                "with pyro.factor('loglik', value)."
            )
        self.dim = self.layout[-1].stop
        self.max_plate_nesting = _max_plate_nesting(full)
        self.chunk_size = chunk_size
        self.vectorized: bool | None = None  # decided on the first chunk
        self.prior_vectorized: bool | None = None  # the same, for the prior part alone
        self.executor = executor
        self.cache_dir = cache_dir
        self.seed = seed
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.num_evaluated = 0  # likelihood evaluations paid by the last sample() (cache hits excluded)
        self._store: dict = {}  # chunks evaluated by a sample() call that failed, reused by its retry
        self._supports = {s.name: prototype.nodes[s.name]["fn"].support for s in self.layout}
        self._unconstrained_shapes = {
            s.name: biject_to(self._supports[s.name]).inv(prototype.nodes[s.name]["value"]).shape
            for s in self.layout
        }

    # -- public ---------------------------------------------------------------------------

    def sample(self, num_samples: int, progress: bool = False, seed: int | None = None) -> WeightedDraws:
        """Draw ``num_samples`` prior traces, weighted by their likelihood.

        :param seed: overrides the adapter's ``seed`` for this call.
        :returns: :class:`WeightedDraws` with ``log_proposal == log_prior``.
        """
        seed = self.seed if seed is None else seed
        if self.executor is not None or self.cache_dir is not None or seed is not None:
            return evaluation.sample_chunked(
                self, num_samples, seed=seed, executor=self.executor, cache_dir=self.cache_dir,
                retries=self.retries, max_in_flight=self.max_in_flight, progress=progress,
            )
        self.num_evaluated = num_samples
        parts = [
            self._run(n, values=None)
            for n in _chunks(num_samples, self.chunk_size, progress, "prior draws")
        ]
        latents, log_lik, log_prior = (torch.cat(x) for x in zip(*parts, strict=True))
        return WeightedDraws(latents, log_lik, log_prior, log_prior.clone())

    def evaluate(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood and log prior density of given packed unconstrained latents.

        :param latents: ``(N, D)`` unconstrained latents.
        :returns: ``(log_likelihood, log_prior)``, each ``(N,)`` float64.
        """
        if self.executor is not None:
            return evaluation.evaluate_chunked(self, latents, self.executor, self.retries, self.max_in_flight)
        return self.evaluate_in_process(latents)

    def evaluate_in_process(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`evaluate` in this process, whatever the executor (what each worker runs)."""
        out_lik, out_prior, pos = [], [], 0
        for n in _chunks(latents.shape[0], self.chunk_size, False, ""):
            _, log_lik, log_prior = self._run(n, values=latents[pos : pos + n])
            out_lik.append(log_lik)
            out_prior.append(log_prior)
            pos += n
        return torch.cat(out_lik), torch.cat(out_prior)

    def draw_latents(self, num_samples: int) -> torch.Tensor:
        """``(num_samples, D)`` float32 prior draws of the packed unconstrained latents, cheaply.

        Runs the model only until its last latent site has a value, so the likelihood is not
        computed. Vectorised under the particle plate when the prior part of the model allows it
        (checked once on a few draws against draw-by-draw tracing), else one trace per draw. Uses
        the global torch RNG.
        """
        if self.prior_vectorized is None:
            with torch.random.fork_rng(devices=[]):  # the check must not shift the caller's stream
                self.prior_vectorized = self._prior_vectorization_works()
        if self.prior_vectorized:
            return self._pack(self._prior_trace(num_samples, None), num_samples)[0]
        parts = [self._pack(self._prior_trace(None, None), None)[0] for _ in range(num_samples)]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    def __getstate__(self) -> dict:
        # What an executor ships to its workers: never the executor itself, nor kept results.
        state = dict(self.__dict__)
        state.update(executor=None, _store={})
        return state

    def unpack(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(N, D)`` unconstrained latents → ``{site: (N, *shape)}`` constrained values."""
        return {
            s.name: biject_to(self._supports[s.name])(
                latents[:, s.start : s.stop].reshape((-1,) + tuple(self._unconstrained_shapes[s.name]))
            ).reshape((-1,) + tuple(s.shape))
            for s in self.layout
        }

    # -- internals --------------------------------------------------------------------------

    def _run(self, n: int, values: torch.Tensor | None):
        if self.vectorized is None:
            self.vectorized = self._vectorization_works(n, values)
        if self.vectorized:
            return self._run_vectorized(n, values)
        return self._run_sequential(n, values)

    @torch.no_grad()
    def _trace(self, n: int | None, values: dict[str, torch.Tensor] | None) -> poutine.Trace:
        # Validation off: a NaN log-likelihood must reach check_weights (which drops the draw)
        # instead of failing the whole batch; shape errors still surface, naming the site.
        model = self.model if values is None else poutine.condition(self.model, values)
        model = poutine.block(model, hide_types=["param"])
        with pyro.validation_enabled(False):
            if n is None:
                trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
            else:
                with pyro.plate(_PARTICLES, n, dim=-self.max_plate_nesting - 1):
                    trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
            _compute_log_prob(trace)
        return trace

    @torch.no_grad()
    def _prior_trace(self, n: int | None, values: dict[str, torch.Tensor] | None) -> poutine.Trace:
        """Like :meth:`_trace`, but stops the model once every latent site has a value."""
        model = self.model if values is None else poutine.condition(self.model, values)
        tracer = poutine.trace(_StopAfterLatents([s.name for s in self.layout])(
            poutine.block(model, hide_types=["param"])
        ))
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

    def _prior_vectorization_works(self, k: int = 3) -> bool:
        """Whether prior draws under the particle plate match draw-by-draw prior traces."""
        try:
            lat, lp_vec = self._pack(self._prior_trace(k, None), k)
        except Exception:  # noqa: BLE001 - any failure means "not vectorisable"
            return False
        lp_seq = torch.cat([
            self._pack(self._prior_trace(None, self._values(lat[i : i + 1], batched=False)), None)[1]
            for i in range(k)
        ])
        return bool(torch.allclose(lp_vec, lp_seq, rtol=1e-4, atol=1e-3, equal_nan=True))

    def _pack(self, trace: poutine.Trace, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``((n, D) float32 unconstrained latents, (n,) float64 log prior)`` of a trace's latent
        sites; ``n=None`` for an unbatched trace (one draw)."""
        dim = -self.max_plate_nesting - 1
        rows = 1 if n is None else n
        log_prior = torch.zeros(rows, dtype=torch.float64)
        packed = []
        for s in self.layout:
            site = trace.nodes[s.name]
            value = site["value"]
            if value.numel() != rows * math.prod(s.shape):
                raise RuntimeError(f"site '{s.name}' has shape {tuple(value.shape)} under vectorisation")
            transform = biject_to(site["fn"].support)
            u = transform.inv(value)
            ladj = transform.log_abs_det_jacobian(u, value)
            if n is None:
                log_prior += float(site["log_prob"].sum() + ladj.sum())
            else:
                ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + site["fn"].event_dim)
                log_prior += _per_draw(site["log_prob"] + ladj, n, dim)
            packed.append(u.reshape(rows, -1))
        return torch.cat(packed, -1).float(), log_prior

    def _values(self, latents: torch.Tensor | None, batched: bool) -> dict | None:
        if latents is None:
            return None
        values = self.unpack(latents)
        if batched:
            pad = (1,) * self.max_plate_nesting
            return {
                s.name: values[s.name].reshape(
                    (-1,) + pad[: max(0, self.max_plate_nesting - len(s.shape) + s.event_dim)]
                    + tuple(s.shape)
                )
                for s in self.layout
            }
        return {k: v[0] for k, v in values.items()}

    def _run_vectorized(self, n: int, latents: torch.Tensor | None):
        trace = self._trace(n, self._values(latents, batched=True))
        dim = -self.max_plate_nesting - 1
        log_lik = torch.zeros(n, dtype=torch.float64)
        for name in self.observed:
            log_lik += _per_draw(trace.nodes[name]["log_prob"], n, dim)
        packed, log_prior = self._pack(trace, n)
        return (packed if latents is None else latents.float()), log_lik, log_prior

    def _run_sequential(self, n: int, latents: torch.Tensor | None):
        out = []
        for i in range(n):
            values = None if latents is None else self._values(latents[i : i + 1], batched=False)
            trace = self._trace(None, values)
            log_lik = sum(float(trace.nodes[k]["log_prob"].sum()) for k in self.observed)
            packed, log_prior = self._pack(trace, None)
            out.append((packed[0], log_lik, float(log_prior[0])))
        lat = torch.stack([o[0] for o in out]).float() if latents is None else latents.float()
        return (
            lat,
            torch.tensor([o[1] for o in out], dtype=torch.float64),
            torch.tensor([o[2] for o in out], dtype=torch.float64),
        )

    def _vectorization_works(self, n: int, latents: torch.Tensor | None) -> bool:
        """Trace a few draws both ways; fall back to one trace per draw if they disagree."""
        k = min(n, 3)
        try:
            lat, ll_vec, lp_vec = self._run_vectorized(k, latents[:k] if latents is not None else None)
        except Exception as err:  # noqa: BLE001 - any failure means "not vectorisable"
            reason = f"tracing it under a vectorising pyro.plate failed ({type(err).__name__}: {err})"
        else:
            ll_seq = self._run_sequential(k, lat)[1]
            if torch.allclose(ll_vec, ll_seq, rtol=1e-4, atol=1e-3, equal_nan=True):
                return True
            reason = (
                "its log-likelihood under a vectorising pyro.plate differs from draw-by-draw "
                f"tracing ({ll_vec.tolist()} vs {ll_seq.tolist()})"
            )
        # Surface genuine model errors (e.g. data of the wrong shape) from a plain trace.
        self._run_sequential(1, None)
        warnings.warn(
            f"The model is traced one draw at a time because {reason}. This is much slower; to "
            "vectorise, write the model so every site broadcasts over an extra batch dimension on "
            "the left (use pyro.plate for data, .to_event() for vector latents, torch ops not Python "
            "loops or float()).",
            stacklevel=4,
        )
        return False


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


def _chunks(total: int, size: int, progress: bool, desc: str) -> Iterator[int]:
    with tqdm(total=total, disable=not progress, desc=desc, unit="draw", leave=False) as bar:
        done = 0
        while done < total:
            n = min(size, total - done)
            yield n
            done += n
            bar.update(n)
