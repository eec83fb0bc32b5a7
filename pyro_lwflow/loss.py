"""LikelihoodWeightedKL: the forward-KL loss on cached likelihood-weighted prior draws."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch
from pyro.infer import ELBO

from .adapter import PriorAdapter
from .diagnostics import check_weights
from .draws import WeightedDraws

__all__ = ["LikelihoodWeightedKL"]

ESTIMATORS = ("resample", "weighted")


class LikelihoodWeightedKL(ELBO):
    """The paper's objective ``−Σᵢ w̄ᵢ log q(θᵢ)`` as a loss for :class:`pyro.infer.SVI`.

    On first use it draws ``num_prior_samples`` prior traces of the model and weights each by
    its likelihood (the summed log-prob of every observed site, ``pyro.factor`` included).
    Minimising the loss minimises ``KL(posterior ‖ q)``, which covers every mode. The draws
    are cached and redrawn only when the model's arguments change.

    :param num_prior_samples: number of prior draws ``N``.
    :param batch_size: draws per gradient step.
    :param estimator: ``"resample"`` (default) draws each minibatch in proportion to the
        weights and averages ``−log q``; ``"weighted"`` draws it uniformly and averages
        ``−N·w̄ᵢ log q``. Both are unbiased (tests/test_loss.py). Resampling is the default
        because a uniform minibatch mostly holds draws of weight ≈ 0 when few draws carry the
        weight (a prior box around small modes); its gradient variance is not yet benchmarked.
    :param chunk_size: draws traced in one vectorised call (bounds memory).
    :param min_ess: warn when the draws' effective sample size is below this.
    :param progress: show a progress bar while drawing.
    :param executor, cache_dir, seed, retries: evaluate the likelihood in seeded chunks on a
        :class:`concurrent.futures.Executor` (e.g. a Dask client's ``get_executor()``), caching each
        chunk in ``cache_dir``; see :class:`~pyro_lwflow.adapter.PriorAdapter` and
        :mod:`pyro_lwflow.evaluation`. Default: in-process, vectorised.
    """

    def __init__(
        self,
        num_prior_samples: int = 100_000,
        batch_size: int = 1024,
        estimator: str = "resample",
        chunk_size: int = 100_000,
        min_ess: float = 100.0,
        progress: bool = False,
        *,
        executor: Executor | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int | None = None,
        retries: int = 2,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if num_prior_samples < 1 or batch_size < 1:
            raise ValueError("num_prior_samples and batch_size must be positive")
        super().__init__()
        self.num_prior_samples = num_prior_samples
        self.batch_size = batch_size
        self.estimator = estimator
        self.chunk_size = chunk_size
        self.min_ess = min_ess
        self.progress = progress
        self.executor = executor
        self.cache_dir = cache_dir
        self.seed = seed
        self.retries = retries
        self.draws: WeightedDraws | None = None
        self.num_likelihood_evals = 0
        self._args_seen: tuple | None = None
        self._cdf: torch.Tensor | None = None

    def prepare(self, model: Callable, guide, *args, **kwargs) -> WeightedDraws:
        """Draw and weight the prior draws (once per distinct model arguments) and place the
        guide's mixture components on them the first time."""
        if guide.prototype_trace is None:
            guide.setup(*args, **kwargs)
        if self.draws is None or not _same_args(self._args_seen, (args, kwargs)):
            adapter = self.make_adapter(model, guide.prototype_trace, args, kwargs)
            draws = adapter.sample(self.num_prior_samples, progress=self.progress)
            self.num_likelihood_evals += adapter.num_evaluated
            self.set_draws(check_weights(draws, self.min_ess))
            self._args_seen = _snapshot((args, kwargs))
        if not guide.initialized:
            guide.initialize(self.draws)
        return self.draws

    def make_adapter(self, model: Callable, prototype, args: tuple = (), kwargs: dict | None = None) -> PriorAdapter:
        """The :class:`~pyro_lwflow.adapter.PriorAdapter` with this loss's chunking and executor."""
        return PriorAdapter(
            model, prototype, args, kwargs, self.chunk_size,
            executor=self.executor, cache_dir=self.cache_dir, seed=self.seed, retries=self.retries,
        )

    def set_draws(self, draws: WeightedDraws, model_args: tuple | None = None) -> None:
        """Train on these weighted draws from now on.

        :param model_args: ``(args, kwargs)`` of the model the draws belong to; the draws are
            kept until the model is called with different ones.
        """
        self.draws = draws
        self._cdf = torch.cumsum(draws.weights, 0)
        if model_args is not None:
            self._args_seen = _snapshot(model_args)

    def differentiable_loss(self, model: Callable, guide, *args, **kwargs) -> torch.Tensor:
        """A minibatch estimate of ``−E_posterior[log q]`` (the cross-entropy; KL + const)."""
        draws = self.prepare(model, guide, *args, **kwargs)
        like = guide.component_loc
        if self.estimator == "resample":
            u = torch.rand(self.batch_size, dtype=self._cdf.dtype) * self._cdf[-1]
            idx = torch.searchsorted(self._cdf, u).clamp_(max=len(draws) - 1)
            scale = None
        else:
            idx = torch.randint(len(draws), (self.batch_size,))
            scale = (draws.weights[idx] * len(draws)).to(like)
        log_q = guide.latent_log_prob(draws.latents[idx].to(like))
        return -(log_q.mean() if scale is None else (scale * log_q).mean())

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("LikelihoodWeightedKL trains on cached prior draws, not on guide traces")

    def loss(self, model: Callable, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def _snapshot(obj):
    """A detached copy of the model arguments, to tell when they change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    return obj


def _same_args(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and bool(torch.equal(a, b.to(a)))
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_args(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_args(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - uncomparable objects count as changed
        return False
