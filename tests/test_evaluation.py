"""Chunked likelihood evaluation: executors (in-process, process pool, Dask), retries, on-disk cache."""

import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL, Schedule, fit
from pyro_lwflow.adapter import PriorAdapter
from pyro_lwflow.evaluation import ChunkFailedError

from .toy_models import factor_model, numpy_factor_model

TARGET = torch.tensor([0.5, -1.0])
CHUNK = 50
_STATE = {"calls": 0, "fail_on": set()}


def flaky_model(target):
    """Vectorised; counts its full-chunk likelihood evaluations and raises on the ones listed."""
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    if theta.dim() == 2 and theta.shape[0] == CHUNK:
        _STATE["calls"] += 1
        if _STATE["calls"] in _STATE["fail_on"]:
            raise RuntimeError("simulated lost worker")
    pyro.factor("loglik", dist.Normal(target, 1.0).to_event(1).log_prob(theta))


@pytest.fixture(autouse=True)
def _reset_counter():
    _STATE.update(calls=0, fail_on=set())


def _adapter(model, *args, **kwargs):
    guide = AutoLWFlow(model)
    guide.setup(*args)
    return PriorAdapter(model, guide.prototype_trace, args, chunk_size=CHUNK, **kwargs)


def _sample_numpy_model(executor, n=200, seed=7):
    with pytest.warns(UserWarning, match="one draw at a time"):
        return _adapter(numpy_factor_model, TARGET, executor=executor).sample(n, seed=seed)


def _assert_identical(a, b):
    for name in ("latents", "log_likelihood", "log_prior", "log_proposal"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_seeded_chunks_are_reproducible_and_correct():
    first = _adapter(factor_model, TARGET).sample(230, seed=3)
    _assert_identical(first, _adapter(factor_model, TARGET).sample(230, seed=3))
    assert not torch.equal(first.latents, _adapter(factor_model, TARGET).sample(230, seed=4).latents)
    theta = torch.sigmoid(first.latents.double()) * 10 - 5
    assert torch.allclose(first.log_likelihood, dist.Normal(TARGET.double(), 1.0).to_event(1).log_prob(theta),
                          atol=1e-4)
    assert first.latents.dtype == torch.float32 and first.log_weights.dtype == torch.float64


@contextmanager
def _local_cluster():
    """Two in-process Dask workers (process workers take ~30 s to start and stop on a busy 2-core box)."""
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # sockets closed by the cluster's teardown
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            assert len(client.nthreads()) == 2
            yield client


def test_numpy_likelihood_on_a_dask_cluster_matches_in_process():
    reference = _sample_numpy_model(None)
    expected = -0.5 * ((reference.latents.double() - TARGET.double()) ** 2).sum(-1)
    assert torch.allclose(reference.log_likelihood, expected, atol=1e-4)
    with _local_cluster() as client:
        draws = _sample_numpy_model(client.get_executor())
        _STATE.update(calls=0, fail_on={2})  # and a chunk lost on a worker is re-run
        flaky = _adapter(flaky_model, TARGET, executor=client.get_executor()).sample(200, seed=1)
        assert _STATE["calls"] == 5
    _assert_identical(draws, reference)
    assert torch.equal(draws.log_weights, reference.log_weights)
    _assert_identical(flaky, _adapter(flaky_model, TARGET).sample(200, seed=1))


def test_process_pool_matches_in_process():
    reference = _sample_numpy_model(None, n=120)
    with ProcessPoolExecutor(2) as pool:  # fork on Linux: fast; "forkserver" works too (~15 s here)
        draws = _sample_numpy_model(pool, n=120)
    _assert_identical(draws, reference)


def test_a_failing_chunk_is_retried():
    reference = _adapter(flaky_model, TARGET).sample(200, seed=1)
    _STATE.update(calls=0, fail_on={2})
    draws = _adapter(flaky_model, TARGET, retries=1).sample(200, seed=1)
    assert _STATE["calls"] == 5  # four chunks, one of them twice
    _assert_identical(draws, reference)


def test_a_chunk_that_keeps_failing_is_named_and_the_others_are_kept():
    reference = _adapter(flaky_model, TARGET).sample(200, seed=1)
    _STATE.update(calls=0, fail_on={3})
    adapter = _adapter(flaky_model, TARGET, retries=0)  # in-process: chunks run in order
    with pytest.raises(ChunkFailedError, match="chunk 2 \\(draws 100–149\\) failed 1 time") as info:
        adapter.sample(200, seed=1)
    assert (info.value.index, info.value.start, info.value.stop) == (2, 100, 150)
    _STATE["calls"] = 0
    draws = adapter.sample(200, seed=1)  # the same call again: only the lost chunk is evaluated
    assert _STATE["calls"] == 1 and adapter.num_evaluated == CHUNK
    _assert_identical(draws, reference)


def test_an_interrupted_run_resumes_from_the_disk_cache(tmp_path):
    reference = _adapter(flaky_model, TARGET).sample(200, seed=2)
    _STATE.update(calls=0, fail_on={3})
    with pytest.raises(ChunkFailedError):
        _adapter(flaky_model, TARGET, cache_dir=tmp_path, retries=0).sample(200, seed=2)
    assert len(list(tmp_path.glob("chunk-*.npz"))) == 3
    _STATE["calls"] = 0
    resumed = _adapter(flaky_model, TARGET, cache_dir=tmp_path)  # a new process would start here
    draws = resumed.sample(200, seed=2)
    assert _STATE["calls"] == 1 and resumed.num_evaluated == CHUNK
    _assert_identical(draws, reference)
    again = _adapter(flaky_model, TARGET, cache_dir=tmp_path)
    _assert_identical(again.sample(200, seed=2), reference)
    assert _STATE["calls"] == 1 and again.num_evaluated == 0
    # other data is another key
    _STATE["fail_on"] = set()
    _adapter(flaky_model, TARGET + 1, cache_dir=tmp_path).sample(200, seed=2)
    assert _STATE["calls"] == 5


def test_threads_are_safe_though_serial():
    """Pyro's effect stack is global to a process: the evaluator serialises tracing across threads."""
    reference = _adapter(flaky_model, TARGET).sample(300, seed=5)
    with ThreadPoolExecutor(3) as pool:
        _assert_identical(_adapter(flaky_model, TARGET, executor=pool).sample(300, seed=5), reference)


def test_loss_and_fit_pass_the_executor_down():
    with ThreadPoolExecutor(2) as pool:
        loss = LikelihoodWeightedKL(num_prior_samples=2000, chunk_size=500, executor=pool, seed=11)
        draws = loss.prepare(factor_model, AutoLWFlow(factor_model, num_components=1), TARGET)
        guide = AutoLWFlow(factor_model)
        guide.setup(TARGET)
        reference = PriorAdapter(factor_model, guide.prototype_trace, (TARGET,), chunk_size=500).sample(2000, seed=11)
        assert len(draws) == 2000 and loss.num_likelihood_evals == 2000
        _assert_identical(draws, reference)  # the pool ran the same chunks the in-process run does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 5 steps: small-ESS / fit-quality advice
            result = fit(factor_model, TARGET, num_components=1, schedule=Schedule.one_shot(2000, num_steps=5),
                         batch_size=64, progress=False, executor=pool, device="cpu")
    assert result.num_likelihood_evals >= 2000 and torch.isfinite(torch.tensor(result.losses)).all()
    assert result.guide.component_loc.device.type == "cpu" and result.draws.latents.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_keeps_the_draws_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 20 steps: fit-quality advice
        result = fit(factor_model, TARGET, num_components=2, schedule=Schedule.one_shot(2000, num_steps=20),
                     batch_size=128, progress=False, device="cuda")
    assert result.guide.component_loc.device.type == "cuda"
    assert result.draws.latents.device.type == "cpu"
    assert all(torch.isfinite(torch.tensor(result.losses)))
    samples = result.sample(1000)["theta"]
    assert samples.shape == (1000, 2) and torch.isfinite(samples).all()


def _fit_with(executor):
    loss = LikelihoodWeightedKL(num_prior_samples=1200, batch_size=128, chunk_size=300, executor=executor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 15 steps: fit-quality advice
        schedule = Schedule(num_rounds=2, initial_draws=1200, max_draws=600, num_steps=15, starts="prior")
        return fit(factor_model, TARGET, num_components=2, schedule=schedule, seed=3, progress=False, loss=loss)


def test_one_seed_one_result_whatever_the_executor():
    """fit(seed=...) gives the same draws, weights and guide in-process, on threads, processes and Dask."""
    reference = _fit_with(None)
    assert len(reference.draws) == 1800 and reference.draws.source.max() == 1  # a prior round and a guide round
    results = {}
    with ThreadPoolExecutor(2) as pool:
        results["threads"] = _fit_with(pool)
    with ProcessPoolExecutor(2) as pool:
        results["processes"] = _fit_with(pool)
    with _local_cluster() as client:
        results["dask"] = _fit_with(client.get_executor())
    for name, result in results.items():
        _assert_identical(result.draws, reference.draws)
        assert torch.equal(result.draws.log_weights, reference.draws.log_weights), name
        assert result.losses == reference.losses, name
        with torch.random.fork_rng():
            torch.manual_seed(0)
            a = result.sample(100)["theta"]
            torch.manual_seed(0)
            b = reference.sample(100)["theta"]
        assert torch.equal(a, b), name
