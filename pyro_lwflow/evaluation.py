"""Chunked, seeded, resumable likelihood evaluation: executors, retries and an on-disk cache.

:meth:`PriorAdapter.sample <pyro_lwflow.adapter.PriorAdapter.sample>` comes here when it is given an
``executor``, a ``cache_dir`` or a ``seed``. For ``N`` draws split into chunks of ``chunk_size``:

1. main process: chunk ``i`` of ``n`` draws gets its prior latents from
   :meth:`~pyro_lwflow.adapter.PriorAdapter.draw_latents` under the torch seed
   :func:`chunk_seed` ``(seed, i)`` — ``(n, D)`` float32; the model runs only up to its last latent,
   so this is cheap;
2. executor: :func:`evaluate_chunk` conditions the model on those latents and returns their
   log-likelihood and log prior density, ``(n,)`` float64 each (nats);
3. main process: the results go into preallocated output arrays, so the working set is the
   output (``N·(4·D + 32)`` bytes with the log-proposal and source columns) plus at most
   ``max_in_flight`` chunks.

Any :class:`concurrent.futures.Executor` works: a ``ProcessPoolExecutor`` (plain pickle: the model
must be importable, e.g. defined at module level in an installed or importable module), a Dask
``distributed.Client(...).get_executor()`` (cloudpickle: closures and ``__main__`` functions work
too), or ``None`` for in-process evaluation of the same chunks. Because each chunk has its own seed,
the weights are identical whichever executor evaluates them. Pyro's effect stack is global to a
process, so thread workers (a ``ThreadPoolExecutor``, Dask with ``processes=False`` or several threads
per worker) are correct but trace one chunk at a time per process: use processes for a speed-up.
:meth:`PriorAdapter.evaluate <pyro_lwflow.adapter.PriorAdapter.evaluate>` of given latents (e.g. the
guide's draws in fit's adaptive rounds) goes through the executor too, with retries but no cache.

A chunk whose evaluation raises is re-submitted up to ``retries`` times; after that,
:class:`ChunkFailedError` names it (chunk index and draw range). The chunks finished by then are
kept — on the adapter, and in ``cache_dir`` if given — so calling ``sample`` again with the same
seed evaluates only the missing ones. ``cache_dir`` holds one ``.npz`` per chunk, keyed by a hash
of the seed, the chunk index and size and the model's identity (qualified name, bytecode, closure
values) and arguments, so an interrupted run resumes where it stopped.
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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .draws import WeightedDraws

if TYPE_CHECKING:
    from .adapter import PriorAdapter

__all__ = [
    "ChunkCache",
    "ChunkFailedError",
    "InlineExecutor",
    "chunk_seed",
    "evaluate_chunk",
    "evaluate_chunked",
    "object_digest",
    "sample_chunked",
]


# Pyro's effect-handler stack is global to a process, so two threads must never trace a model at
# once: thread-based workers (a ThreadPoolExecutor, Dask with processes=False or several threads per
# worker) stay correct but evaluate one chunk at a time per process. Use processes for speed-up.
_TRACE_LOCK = threading.RLock()


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


def evaluate_chunk(adapter: PriorAdapter, latents: np.ndarray, attempt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Worker side: ``(n, D)`` float32 latents → ``(log_likelihood, log_prior)``, ``(n,)`` float64.

    ``attempt`` only makes each re-submission a distinct task (Dask reuses the result of an
    identical "pure" call, including a failed one).
    """
    with _TRACE_LOCK:
        log_lik, log_prior = adapter.evaluate_in_process(torch.from_numpy(np.ascontiguousarray(latents)))
    return log_lik.numpy(), log_prior.numpy()


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


def _run_digest(adapter: PriorAdapter, seed: int) -> str:
    h = hashlib.sha256(b"pyro_lwflow-run-v1")
    object_digest(adapter.model, h)
    object_digest(adapter.args, h)
    object_digest(adapter.kwargs, h)
    object_digest([(s.name, tuple(s.shape), s.start, s.stop) for s in adapter.layout], h)
    h.update(f"seed={seed};chunk={adapter.chunk_size}".encode())
    return h.hexdigest()


def _chunk_key(run: str, index: int, n: int) -> str:
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


def _draw(adapter: PriorAdapter, seed: int, index: int, n: int) -> torch.Tensor:
    with _TRACE_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(chunk_seed(seed, index))
        return adapter.draw_latents(n)


def _run_chunks(
    adapter: PriorAdapter,
    items: deque[tuple[int, int, int, str]],
    latents: torch.Tensor,
    log_lik: torch.Tensor,
    log_prior: torch.Tensor,
    prepare: Callable[[int, int, int], None],
    executor: Executor | None,
    retries: int,
    max_in_flight: int | None,
    progress: bool,
    on_done: Callable[[str, int, int], None] = lambda key, a, b: None,
) -> None:
    """Evaluate chunks ``(index, start, stop, key)`` into the output rows ``start:stop``.

    ``prepare(index, start, stop)`` fills ``latents[start:stop]`` just before the chunk is
    submitted (so only ``max_in_flight`` chunks are pending); ``on_done`` is told of each finished
    chunk. Failed chunks are re-submitted up to ``retries`` times; after a final failure nothing
    new is submitted, the running chunks are collected, and :class:`ChunkFailedError` is raised.
    """
    pool = executor if executor is not None else InlineExecutor()
    max_in_flight = max_in_flight or 2 * _num_workers(executor)
    running: dict[Future, tuple[int, int, int, str, int]] = {}
    failure: tuple[int, int, int, int, BaseException] | None = None
    num_done = 0

    def submit(index: int, a: int, b: int, key: str, attempt: int) -> None:
        nonlocal failure
        try:
            future = pool.submit(evaluate_chunk, adapter, latents[a:b].numpy(), attempt)
        except Exception as err:  # noqa: BLE001 - e.g. a broken or shut-down pool
            failure = failure or (index, a, b, attempt + 1, err)
            return
        running[future] = (index, a, b, key, attempt)

    total = sum(b - a for _, a, b, _ in items)
    with tqdm(total=total, disable=not progress, desc="likelihood", unit="draw", leave=False) as bar:
        while items or running:
            while items and failure is None and len(running) < max_in_flight:
                index, a, b, key = items.popleft()
                prepare(index, a, b)
                submit(index, a, b, key, 0)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                index, a, b, key, attempt = running.pop(future)
                try:
                    ll, lp = future.result()
                except Exception as err:  # noqa: BLE001 - a worker's error or a lost worker
                    if failure is None and attempt < retries:
                        submit(index, a, b, key, attempt + 1)
                    else:
                        failure = failure or (index, a, b, attempt + 1, err)
                    continue
                log_lik[a:b] = torch.as_tensor(ll)
                log_prior[a:b] = torch.as_tensor(lp)
                on_done(key, a, b)
                num_done += 1
                bar.update(b - a)
    if failure is not None:
        index, a, b, attempts, err = failure
        raise ChunkFailedError(index, a, b, attempts, num_done, err) from err


def evaluate_chunked(
    adapter: PriorAdapter,
    latents: torch.Tensor,
    executor: Executor | None = None,
    retries: int = 2,
    max_in_flight: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_likelihood, log_prior)``, ``(N,)`` float64, of given ``(N, D)`` latents, evaluated in
    chunks of ``adapter.chunk_size`` on ``executor`` (nothing cached: the latents carry no seed).
    """
    latents = latents.detach().to("cpu", torch.float32).contiguous()
    n = latents.shape[0]
    log_lik = torch.empty(n, dtype=torch.float64)
    log_prior = torch.empty(n, dtype=torch.float64)
    items = deque(
        (index, a, min(a + adapter.chunk_size, n), "") for index, a in enumerate(range(0, n, adapter.chunk_size))
    )
    if items and adapter.vectorized is None:
        _, a, b, _ = items[0]
        with _TRACE_LOCK:
            adapter.vectorized = adapter._vectorization_works(min(3, b - a), latents[a:b])
    _run_chunks(adapter, items, latents, log_lik, log_prior, lambda *_: None, executor, retries, max_in_flight,
                progress)
    return log_lik, log_prior


def sample_chunked(
    adapter: PriorAdapter,
    num_samples: int,
    seed: int | None = None,
    executor: Executor | None = None,
    cache_dir: str | os.PathLike | None = None,
    retries: int = 2,
    max_in_flight: int | None = None,
    progress: bool = False,
) -> WeightedDraws:
    """``num_samples`` prior draws weighted by their likelihood, evaluated chunk by chunk.

    :param adapter: the model's :class:`~pyro_lwflow.adapter.PriorAdapter`; its ``chunk_size`` is
        the number of draws per chunk (and per task).
    :param seed: the run's seed; ``None`` draws one from the global torch RNG (so
        ``pyro.set_rng_seed`` makes the run reproducible).
    :param executor: where :func:`evaluate_chunk` runs; ``None`` evaluates in this process.
    :param cache_dir: where evaluated chunks are stored and looked up (see :class:`ChunkCache`).
    :param retries: re-submissions of a failing chunk before :class:`ChunkFailedError`.
    :param max_in_flight: chunks submitted and not yet collected; default twice the workers.
    :returns: :class:`WeightedDraws` with ``log_proposal == log_prior``; sets
        ``adapter.num_evaluated`` to the number of draws whose likelihood was computed.
    :raises ChunkFailedError: naming the chunk that failed ``retries + 1`` times.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    size, dim = adapter.chunk_size, adapter.dim
    cache = ChunkCache(cache_dir) if cache_dir is not None else None
    run = _run_digest(adapter, seed)
    latents = torch.empty(num_samples, dim, dtype=torch.float32)
    log_lik = torch.empty(num_samples, dtype=torch.float64)
    log_prior = torch.empty(num_samples, dtype=torch.float64)

    items: deque[tuple[int, int, int, str]] = deque()
    for index, a in enumerate(range(0, num_samples, size)):
        b = min(a + size, num_samples)
        key = _chunk_key(run, index, b - a)
        hit = adapter._store.get(key)
        if hit is None and cache is not None:
            hit = cache.load(key, b - a, dim)
        if hit is None:
            items.append((index, a, b, key))
            continue
        latents[a:b], log_lik[a:b], log_prior[a:b] = (torch.as_tensor(x) for x in hit)
    adapter.num_evaluated = sum(b - a for _, a, b, _ in items)

    drawn: set[int] = set()
    if items and adapter.vectorized is None:
        # Decide vectorisation once, here, so workers neither re-check nor warn.
        index, a, b, _ = items[0]
        latents[a:b] = _draw(adapter, seed, index, b - a)
        drawn.add(index)
        with _TRACE_LOCK:
            adapter.vectorized = adapter._vectorization_works(min(3, b - a), latents[a:b])

    def prepare(index: int, a: int, b: int) -> None:
        if index not in drawn:
            latents[a:b] = _draw(adapter, seed, index, b - a)

    def on_done(key: str, a: int, b: int) -> None:
        # views into the outputs (no copy): kept only if this call fails, for its retry
        adapter._store[key] = (latents[a:b].numpy(), log_lik[a:b].numpy(), log_prior[a:b].numpy())
        if cache is not None:
            cache.save(key, *adapter._store[key])
        done_keys.append(key)

    done_keys: list[str] = []
    _run_chunks(adapter, items, latents, log_lik, log_prior, prepare, executor, retries, max_in_flight, progress,
                on_done)
    for key in done_keys:  # all done: nothing to resume, free the views
        adapter._store.pop(key, None)
    return WeightedDraws(latents, log_lik, log_prior, log_prior.clone())
