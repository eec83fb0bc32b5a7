"""Pyro model → weighted draws: prior draws of the packed latents, weighted by their likelihood.

Every draw goes one way, whatever evaluates it: ``N`` draws are split into chunks of
``chunk_size``; chunk ``i`` gets its prior latents in this process under the torch seed
:func:`~pyro_lwflow.evaluation.chunk_seed` ``(seed, i)`` (the model runs only up to its last latent),
and an executor — by default this process — computes their log-likelihood and log prior density
(:class:`~pyro_lwflow.tracing.ModelTracer`). The draws and weights therefore depend on the seed
and the chunk size only, never on the executor.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import torch
from pyro import poutine

from .draws import WeightedDraws
from .evaluation import TRACE_LOCK, ChunkCache, chunk_key, chunk_seed, run_chunks, run_digest
from .layout import Layout
from .tracing import Evaluation, ModelTracer

__all__ = ["PriorAdapter"]


class PriorAdapter:
    """Evaluates a Pyro model for many latent draws at once.

    :param model: the Pyro model.
    :param prototype: a trace of the model's latent sites (``guide.prototype_trace``); its order
        is the packing order.
    :param args, kwargs: the model's arguments (the observed data); NumPy arrays and lists of
        numbers become tensors.
    :param chunk_size: draws per chunk: traced in one vectorised call, and one task for an executor
        (pick it so every worker gets several chunks).
    :param executor: a :class:`concurrent.futures.Executor` (a process pool, or a Dask
        ``distributed.Client(...).get_executor()``) that evaluates the likelihood chunk by chunk;
        ``None`` evaluates the same chunks in this process. See :mod:`pyro_lwflow.evaluation`.
    :param cache_dir: a folder for one ``.npz`` per evaluated chunk, so an interrupted run resumes.
    :param seed: the seed of :meth:`sample`'s chunks; ``None`` draws one from the global torch RNG
        on each call (so ``pyro.set_rng_seed`` makes a run reproducible).
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
        self.layout = Layout.from_trace(prototype)
        self.tracer = ModelTracer(model, self.layout, args, kwargs)
        self.chunk_size = chunk_size
        self.executor = executor
        self.cache = ChunkCache(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.num_evaluated = 0  # likelihood evaluations paid by the last call (cache hits excluded)
        self._kept: dict[str, tuple] = {}  # chunks evaluated by a sample() call that failed, for its retry

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def observed(self) -> list[str]:
        return self.tracer.observed

    def unpack(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(N, D)`` unconstrained latents → ``{site: (N, *shape)}`` constrained values."""
        return self.layout.unpack(latents)

    def sample(self, num_samples: int, progress: bool = False, seed: int | None = None) -> WeightedDraws:
        """Draw ``num_samples`` prior draws, weighted by their likelihood.

        :param seed: overrides the adapter's ``seed`` for this call.
        :returns: :class:`WeightedDraws` with ``log_proposal == log_prior``.
        :raises ChunkFailedError: naming the chunk that failed ``retries + 1`` times; the chunks
            evaluated by then are kept, so the same call again evaluates only the missing ones.
        """
        seed = self.seed if seed is None else seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        run = run_digest(self.tracer, seed, self.chunk_size)
        latents = torch.empty(num_samples, self.dim, dtype=torch.float32)
        log_lik = torch.empty(num_samples, dtype=torch.float64)
        log_prior = torch.empty(num_samples, dtype=torch.float64)
        keys, items = {}, deque()
        for index, a in enumerate(range(0, num_samples, self.chunk_size)):
            b = min(a + self.chunk_size, num_samples)
            keys[index] = key = chunk_key(run, index, b - a)
            hit = self._kept.get(key)
            if hit is None and self.cache is not None:
                hit = self.cache.load(key, b - a, self.dim)
            if hit is None:
                items.append((index, a, b))
            else:
                latents[a:b], log_lik[a:b], log_prior[a:b] = (torch.as_tensor(x) for x in hit)

        def prepare(index: int, a: int, b: int) -> None:
            with TRACE_LOCK, torch.random.fork_rng(devices=[]):
                torch.manual_seed(chunk_seed(seed, index))
                latents[a:b] = self.tracer.prior_latents(b - a)
            self.tracer.check_vectorization(latents[a:b])  # once, here, so workers neither check nor warn

        def store(index: int, a: int, b: int) -> None:
            # views into the outputs (no copy): kept only if this call fails, for its retry
            self._kept[keys[index]] = (latents[a:b].numpy(), log_lik[a:b].numpy(), log_prior[a:b].numpy())
            if self.cache is not None:
                self.cache.save(keys[index], *self._kept[keys[index]])

        self._run(items, latents, log_lik, log_prior, prepare, store, progress)
        self._kept.clear()  # all done: nothing to resume
        return WeightedDraws(latents, log_lik, log_prior, log_prior.clone())

    def evaluate(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood and log prior density of given packed unconstrained latents, evaluated in
        chunks on the executor (with retries, nothing cached: the latents carry no seed).

        :param latents: ``(N, D)`` unconstrained latents.
        :returns: ``(log_likelihood, log_prior)``, each ``(N,)`` float64.
        """
        latents = latents.detach().to("cpu", torch.float32).contiguous()
        n = latents.shape[0]
        log_lik = torch.empty(n, dtype=torch.float64)
        log_prior = torch.empty(n, dtype=torch.float64)
        if n:
            self.tracer.check_vectorization(latents)
        items = deque((i, a, min(a + self.chunk_size, n)) for i, a in enumerate(range(0, n, self.chunk_size)))
        self._run(items, latents, log_lik, log_prior, lambda *_: None, lambda *_: None, False)
        return log_lik, log_prior

    def _run(self, items, latents, log_lik, log_prior, prepare, store, progress) -> None:
        """Evaluate ``items`` into the outputs; count the draws paid for and the ones the model raised on."""
        failed: list[tuple[int, str]] = []

        def on_done(index: int, a: int, b: int, evaluation: Evaluation) -> None:
            log_lik[a:b] = evaluation.log_likelihood
            log_prior[a:b] = evaluation.log_prior
            if evaluation.num_failed:
                failed.append((evaluation.num_failed, evaluation.first_error))
            store(index, a, b)

        self.num_evaluated = sum(b - a for _, a, b in items)
        run_chunks(self.tracer, items, latents, prepare, on_done, self.executor, self.retries, self.max_in_flight,
                   progress)
        num_failed = sum(k for k, _ in failed)
        if not num_failed:
            return
        if num_failed == self.num_evaluated:
            raise ValueError(f"The model raised for all {num_failed} draws; the first error: {failed[0][1]}")
        warnings.warn(
            f"The model raised for {num_failed} of {self.num_evaluated} draws (first: {failed[0][1]}); their "
            "likelihood counts as NaN and they are dropped. If the model should be defined there, fix it; if "
            "the likelihood is zero there, return -inf instead of raising.",
            stacklevel=4,
        )
