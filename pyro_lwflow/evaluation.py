"""Executors for chunked likelihood evaluation: seeds per chunk, retries and an on-disk cache.

:meth:`PriorAdapter.sample <pyro_lwflow.adapter.PriorAdapter.sample>` splits ``N`` draws into chunks of
``chunk_size``; chunk ``i`` draws its prior latents under the torch seed :func:`chunk_seed` ``(seed, i)``
in the main process, and :func:`evaluate_chunk` computes their log-likelihood and log prior density on
an executor. This module holds that machinery; it knows nothing of Pyro models beyond the
:class:`~pyro_lwflow.tracing.ModelTracer` it ships to the workers.

Any :class:`concurrent.futures.Executor` works: a ``ProcessPoolExecutor`` (plain pickle: the model
must be importable, e.g. defined at module level in an installed or importable module), a Dask
``distributed.Client(...).get_executor()`` (cloudpickle: closures and ``__main__`` functions work
too), a thread pool, or ``None``: the :class:`InlineExecutor`, which evaluates the same chunks in this
process. Because each chunk has its own seed, draws and weights are identical whichever executor
evaluates them. Pyro's effect stack is global to a process, so thread workers (a
``ThreadPoolExecutor``, Dask with ``processes=False`` or several threads per worker) are correct but
trace one chunk at a time per process: use processes for a speed-up.

A chunk whose evaluation raises is re-submitted up to ``retries`` times; after that,
:class:`ChunkFailedError` names it (chunk index and draw range). The chunks finished by then are
kept — by the adapter, and in ``cache_dir`` if given — so calling ``sample`` again with the same
seed evaluates only the missing ones. :class:`ChunkCache` holds one ``.npz`` per chunk, keyed by a
hash of the seed, the chunk index and size and the model's identity (qualified name, bytecode,
closure values) and arguments, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .tracing import Evaluation, ModelTracer

__all__ = [
    "TRACE_LOCK",
    "ChunkCache",
    "ChunkFailedError",
    "InlineExecutor",
    "chunk_seed",
    "evaluate_chunk",
    "object_digest",
    "run_chunks",
    "run_digest",
]


# Pyro's effect-handler stack is global to a process, so two threads must never trace a model at
# once: thread-based workers (a ThreadPoolExecutor, Dask with processes=False or several threads per
# worker) stay correct but evaluate one chunk at a time per process. Use processes for speed-up.
TRACE_LOCK = threading.RLock()


class ChunkFailedError(RuntimeError):
    """A chunk's likelihood evaluation failed on every attempt.

    :param index: the chunk's index; :param start, stop: its draws are ``start … stop − 1``.
    """

    def __init__(self, index: int, start: int, stop: int, attempts: int, num_done: int, cause: BaseException):
        self.index, self.start, self.stop, self.attempts = index, start, stop, attempts
        super().__init__(
            f"Evaluating the likelihood of chunk {index} (draws {start}–{stop - 1}) failed {attempts} "
            f"time(s); last error: {type(cause).__name__}: {cause}. The {num_done} chunk(s) evaluated "
            "so far are kept: call sample() again with the same seed (or fit/prepare with the same "
            "arguments) to evaluate only the missing ones, or allow more retries=."
        )


class InlineExecutor(Executor):
    """Runs each submitted call at once in the calling thread (the in-process executor)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - delivered through the future, like any executor
            future.set_exception(err)
        return future


def chunk_seed(seed: int, index: int) -> int:
    """The torch seed (63 bits) of chunk ``index`` of a run seeded with ``seed``."""
    digest = hashlib.sha256(f"pyro_lwflow-chunk:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def evaluate_chunk(tracer: ModelTracer, latents: np.ndarray, attempt: int = 0) -> Evaluation:
    """Worker side: ``(n, D)`` float32 latents → their :class:`~pyro_lwflow.tracing.Evaluation`.

    ``attempt`` only makes each re-submission a distinct task (Dask reuses the result of an
    identical "pure" call, including a failed one).
    """
    with TRACE_LOCK:
        return tracer.log_densities(torch.from_numpy(np.ascontiguousarray(latents)))


# -- cache keys ------------------------------------------------------------------------------


def object_digest(obj: Any, h: Any = None) -> Any:
    """Feed a stable description of ``obj`` into the hash ``h`` (a new sha256 if ``None``).

    Tensors and arrays by dtype, shape and bytes; containers recursively; functions by qualified
    name, bytecode, defaults and closure values; anything else by ``repr``.
    """
    h = hashlib.sha256() if h is None else h
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            object_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            object_digest(item, h)
    elif callable(obj) and hasattr(obj, "__code__"):
        code = obj.__code__
        h.update(f"F{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}".encode())
        h.update(code.co_code)
        h.update(repr([c for c in code.co_consts if isinstance(c, (int, float, str, bytes, bool))]).encode())
        object_digest(list(obj.__defaults__ or ()), h)
        for cell in obj.__closure__ or ():
            try:
                object_digest(cell.cell_contents, h)
            except ValueError:  # an empty cell
                h.update(b"empty")
    elif callable(obj) and hasattr(type(obj), "forward"):  # an nn.Module / PyroModule model
        h.update(f"M{type(obj).__module__}.{type(obj).__qualname__}".encode())
        object_digest(obj.forward, h)
        object_digest({k: v for k, v in obj.state_dict().items()}, h)
    else:
        h.update(f"R{type(obj).__qualname__}:{obj!r}".encode())
    return h


def run_digest(tracer: ModelTracer, seed: int, chunk_size: int) -> str:
    """A hash of everything that determines a seeded run's draws: model, data, layout, seed, chunking."""
    h = hashlib.sha256(b"pyro_lwflow-run-v1")
    object_digest(tracer.model, h)
    object_digest(tracer.args, h)
    object_digest(tracer.kwargs, h)
    object_digest([(s.name, tuple(s.shape), s.start, s.stop) for s in tracer.layout], h)
    h.update(f"seed={seed};chunk={chunk_size}".encode())
    return h.hexdigest()


def chunk_key(run: str, index: int, n: int) -> str:
    return hashlib.sha256(f"{run}:{index}:{n}".encode()).hexdigest()[:32]


class ChunkCache:
    """One ``chunk-<key>.npz`` per evaluated chunk in ``directory`` (created if missing).

    Each file holds ``latents`` ``(n, D)`` float32 and ``log_likelihood``, ``log_prior``
    ``(n,)`` float64. Files are written atomically (temporary file, then rename), and a file that
    cannot be read back counts as missing.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"chunk-{key}.npz"

    def load(self, key: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with np.load(path) as f:
                out = f["latents"], f["log_likelihood"], f["log_prior"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if out[0].shape != (n, dim) or out[1].shape != (n,) or out[2].shape != (n,):
            return None
        return out

    def save(self, key: str, latents: np.ndarray, log_lik: np.ndarray, log_prior: np.ndarray) -> None:
        path = self.path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, latents=latents, log_likelihood=log_lik, log_prior=log_prior)
        os.replace(tmp, path)


# -- the driver ------------------------------------------------------------------------------


def _num_workers(executor: Executor | None) -> int:
    if executor is None or isinstance(executor, InlineExecutor):
        return 1
    client = getattr(executor, "_client", None)  # distributed.cfexecutor.ClientExecutor
    if client is not None:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a guess for sizing only
            return 4
    return int(getattr(executor, "_max_workers", 4) or 4)


def run_chunks(
    tracer: ModelTracer,
    items: deque[tuple[int, int, int]],
    latents: torch.Tensor,
    prepare: Callable[[int, int, int], None],
    on_done: Callable[[int, int, int, Evaluation], None],
    executor: Executor | None = None,
    retries: int = 2,
    max_in_flight: int | None = None,
    progress: bool = False,
) -> None:
    """Evaluate chunks ``(index, start, stop)`` of ``latents`` on ``executor`` (``None``: in this process).

    ``prepare(index, start, stop)`` fills ``latents[start:stop]`` just before the chunk is
    submitted (so only ``max_in_flight`` chunks are pending); ``on_done(index, start, stop,
    evaluation)`` receives each finished chunk. Failed chunks are re-submitted up to ``retries``
    times; after a final failure nothing new is submitted, the running chunks are collected, and
    :class:`ChunkFailedError` is raised.
    """
    pool = executor if executor is not None else InlineExecutor()
    max_in_flight = max_in_flight or 2 * _num_workers(executor)
    running: dict[Future, tuple[int, int, int, int]] = {}
    failure: tuple[int, int, int, int, BaseException] | None = None
    num_done = 0

    def submit(index: int, a: int, b: int, attempt: int) -> None:
        nonlocal failure
        try:
            future = pool.submit(evaluate_chunk, tracer, latents[a:b].numpy(), attempt)
        except Exception as err:  # noqa: BLE001 - e.g. a broken or shut-down pool
            failure = failure or (index, a, b, attempt + 1, err)
            return
        running[future] = (index, a, b, attempt)

    total = sum(b - a for _, a, b in items)
    with tqdm(total=total, disable=not progress, desc="likelihood", unit="draw", leave=False) as bar:
        while items or running:
            while items and failure is None and len(running) < max_in_flight:
                index, a, b = items.popleft()
                prepare(index, a, b)
                submit(index, a, b, 0)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                index, a, b, attempt = running.pop(future)
                try:
                    evaluation = future.result()
                except Exception as err:  # noqa: BLE001 - a worker's error or a lost worker
                    if failure is None and attempt < retries:
                        submit(index, a, b, attempt + 1)
                    else:
                        failure = failure or (index, a, b, attempt + 1, err)
                    continue
                on_done(index, a, b, evaluation)
                num_done += 1
                bar.update(b - a)
    if failure is not None:
        index, a, b, attempts, err = failure
        raise ChunkFailedError(index, a, b, attempts, num_done, err) from err
