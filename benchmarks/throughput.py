"""Throughput benchmark: likelihood evaluations, training steps and sampling per second; peak memory.

    .venv/bin/python benchmarks/throughput.py            # the default run (a few minutes)
    .venv/bin/python benchmarks/throughput.py --quick    # smaller sizes, for a smoke test

Writes ``benchmarks/results/throughput.md`` and ``.json`` (machine, versions, command, tables).

Sections
  1. likelihood evaluations / s of a vectorisable 10-D Gaussian model (in-process vectorised, and
     a plain Python loop over draws), and of a deliberately slow black-box NumPy likelihood
     (~1 ms ``time.sleep`` per draw, traced draw by draw) in-process, on a process pool and on a
     Dask ``LocalCluster`` with 1 and 2 process workers (start-up excluded);
  2. training steps / s of AutoLWFlow vs batch size and dimension, next to normflows' RealNVP
     (``MaskedAffineFlow`` couplings) with the same number of layers and hidden widths;
  3. sampling draws / s, AutoLWFlow vs normflows;
  4. peak resident memory and time of ``PriorAdapter.sample(N)`` for N = 10⁴ … 10⁶ on the 10-D
     model, one subprocess per N (``resource.getrusage`` ``ru_maxrss``).

normflows is the optional ``bench`` extra; Dask the ``dask`` extra. Sections needing them are
skipped when they are missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL  # noqa: E402
from pyro_lwflow.adapter import PriorAdapter  # noqa: E402

DIM = 10
NUM_OBS = 20


# -- models (module level: picklable by reference for process pools) ---------------------------


def gaussian_model(y):
    """theta ~ N(0, 3² I_D); y_j ~ N(theta, I_D), j = 1..NUM_OBS. Vectorisable."""
    theta = pyro.sample("theta", dist.Normal(0.0, 3.0).expand([y.shape[-1]]).to_event(1))
    with pyro.plate("data", y.shape[0], dim=-1):
        pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)


def slow_model(y):
    """The same prior with a black-box NumPy likelihood that takes ~1 ms per draw (a sleep)."""
    theta = pyro.sample("theta", dist.Normal(0.0, 3.0).expand([y.shape[-1]]).to_event(1))
    time.sleep(1e-3)
    t = theta.detach().numpy()
    pyro.factor("loglik", torch.tensor(-0.5 * float(np.sum((y.numpy() - t) ** 2))))


def data(dim: int = DIM, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.0 + torch.randn(NUM_OBS, dim, generator=gen)


def adapter_for(model, y, **kwargs) -> PriorAdapter:
    guide = AutoLWFlow(model, num_components=1)
    guide.setup(y)
    return PriorAdapter(model, guide.prototype_trace, (y,), **kwargs)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


# -- 1. likelihood evaluation ---------------------------------------------------------------


def bench_likelihood(quick: bool) -> list[dict]:
    rows = []
    y = data()
    n_vec = 20_000 if quick else 200_000
    adapter = adapter_for(gaussian_model, y)
    adapter.sample(1000)  # warm-up and vectorisation check
    seconds, _ = timed(adapter.sample, n_vec)
    rows.append(dict(likelihood="10-D Gaussian, 20 obs", path="in-process, vectorised", workers=1, draws=n_vec,
                     seconds=seconds, draws_per_s=n_vec / seconds))
    n_loop = 200 if quick else 1000
    adapter.tracer.vectorized = False  # the plain Python loop: one trace per draw
    seconds, _ = timed(adapter.sample, n_loop)
    rows.append(dict(likelihood="10-D Gaussian, 20 obs", path="in-process, Python loop over draws", workers=1,
                     draws=n_loop, seconds=seconds, draws_per_s=n_loop / seconds))

    n_slow, chunk = (100, 10) if quick else (2000, 200)  # tasks of ~0.3 s: Dask's per-task overhead is ~ms
    seed = 1

    def run(executor, label, workers):
        a = adapter_for(slow_model, y, chunk_size=chunk, executor=executor)
        a.tracer.vectorized = False  # known: a black box (skip the check's warning)
        a.sample(2 * chunk * max(workers, 1), seed=seed + 1)  # warm-up: workers import torch/pyro
        seconds, draws = timed(a.sample, n_slow, seed=seed)
        rows.append(dict(likelihood="NumPy black box, ~1 ms sleep/draw", path=label, workers=workers, draws=n_slow,
                         chunk=chunk, seconds=seconds, draws_per_s=n_slow / seconds))
        return draws

    reference = run(None, "in-process (draw by draw)", 1)
    with ProcessPoolExecutor(2) as pool:
        same = run(pool, "ProcessPoolExecutor", 2)
    assert torch.equal(same.log_weights, reference.log_weights)
    try:
        import distributed
    except ImportError:
        print("distributed is not installed: Dask rows skipped")
        return rows
    for workers in (1, 2):
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=40) as cluster, \
                distributed.Client(cluster) as client:
            same = run(client.get_executor(), "Dask LocalCluster (processes)", workers)
        assert torch.equal(same.log_weights, reference.log_weights)
    return rows


# -- 2, 3. training and sampling vs normflows ------------------------------------------------


def _normflows_realnvp(dim: int, layers: int, hidden: int):
    import normflows as nf

    flows = []
    for i in range(layers):
        mask = torch.tensor([(j + i) % 2 for j in range(dim)], dtype=torch.float32)
        s = nf.nets.MLP([dim, hidden, hidden, dim], init_zeros=True)
        t = nf.nets.MLP([dim, hidden, hidden, dim], init_zeros=True)
        flows.append(nf.flows.MaskedAffineFlow(mask, t, s))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), flows)


def _target(dim: int):
    def model():
        theta = pyro.sample("theta", dist.Normal(0.0, 3.0).expand([dim]).to_event(1))
        pyro.factor("loglik", dist.Normal(1.0, 0.5).expand([dim]).to_event(1).log_prob(theta))

    return model


def _ours_step(optim, loss, model, guide) -> None:
    optim.zero_grad()
    loss.differentiable_loss(model, guide).backward()
    optim.step()


def _nf_step(nf_model, nf_optim, latents, batch) -> None:
    idx = torch.randint(len(latents), (batch,))
    nf_optim.zero_grad()
    nf_model.forward_kld(latents[idx]).backward()
    nf_optim.step()


def bench_training(quick: bool) -> list[dict]:
    rows = []
    layers, hidden = 6, 64
    steps = 5 if quick else 15  # best of 3 repeats: the machine may be shared
    dims = (2, 10) if quick else (2, 10, 50)
    batches = (256, 1024) if quick else (256, 1024, 4096)
    try:
        import normflows  # noqa: F401
        have_nf = True
    except ImportError:
        have_nf = False
    for dim in dims:
        model = _target(dim)
        pyro.clear_param_store()
        guide = AutoLWFlow(model, num_components=1, num_transforms=layers, hidden_dims=(hidden, hidden))
        loss = LikelihoodWeightedKL(num_prior_samples=20_000, min_ess=0)
        draws = loss.prepare(model, guide)
        params = [p for p in guide.parameters()]
        n_ours = sum(p.numel() for p in params)
        optim = torch.optim.Adam(params, lr=1e-3)
        nf_model = _normflows_realnvp(dim, layers, hidden) if have_nf else None
        nf_optim = torch.optim.Adam(nf_model.parameters(), lr=1e-3) if have_nf else None
        for batch in batches:
            loss.batch_size = batch
            ours_step = partial(_ours_step, optim, loss, model, guide)
            nf_step = partial(_nf_step, nf_model, nf_optim, draws.latents, batch) if have_nf else None
            for name, step, n_params in (("pyro_lwflow AutoLWFlow", ours_step, n_ours),
                                         ("normflows RealNVP", nf_step, None)):
                if step is None:
                    continue
                if n_params is None:
                    n_params = sum(p.numel() for p in nf_model.parameters())
                step()  # warm-up
                seconds = min(timed(lambda s=step: [s() for _ in range(steps)])[0] for _ in range(3))
                rows.append(dict(library=name, dim=dim, batch=batch, params=n_params, steps=steps,
                                 steps_per_s=steps / seconds, draws_per_s=steps * batch / seconds))
    return rows


def bench_sampling(quick: bool) -> list[dict]:
    rows = []
    dim, n = DIM, (20_000 if quick else 100_000)
    model = _target(dim)
    pyro.clear_param_store()
    guide = AutoLWFlow(model, num_components=1)
    LikelihoodWeightedKL(num_prior_samples=5000, min_ess=0).prepare(model, guide)
    guide.sample_posterior(100)
    seconds, _ = timed(guide.sample_posterior, n)
    rows.append(dict(library="pyro_lwflow AutoLWFlow.sample_posterior", dim=dim, draws=n, draws_per_s=n / seconds))
    with torch.no_grad():
        latent = guide.get_posterior()
        seconds, _ = timed(latent.sample, (n,))
    rows.append(dict(library="pyro_lwflow guide.get_posterior().sample (packed)", dim=dim, draws=n,
                     draws_per_s=n / seconds))
    try:
        nf_model = _normflows_realnvp(dim, 6, 64)
    except ImportError:
        return rows
    with torch.no_grad():
        nf_model.sample(100)
        seconds, _ = timed(nf_model.sample, n)
    rows.append(dict(library="normflows RealNVP.sample", dim=dim, draws=n, draws_per_s=n / seconds))
    return rows


# -- 4. peak memory vs N -----------------------------------------------------------------------


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _memory_child(n: int, chunked: bool) -> None:
    """Run in a subprocess: weight ``n`` prior draws, print JSON with peak RSS and time."""
    torch.set_num_threads(1)
    y = data()
    adapter = adapter_for(gaussian_model, y)
    adapter.sample(10)
    try:  # reset the peak-RSS mark (Linux), so the peak is the sampling's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, peak_of = _rss_mb("VmRSS"), (lambda: _rss_mb("VmHWM"))
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    seconds, draws = timed(adapter.sample, n, seed=0 if chunked else None)
    peak = peak_of()
    out_mb = (draws.latents.nbytes + 3 * draws.log_likelihood.nbytes + draws.source.nbytes) / 2**20
    print(json.dumps(dict(n=n, path="chunked, seeded" if chunked else "default", seconds=seconds,
                          draws_per_s=n / seconds, peak_rss_mb=peak, baseline_rss_mb=base,
                          increase_mb=peak - base, output_mb=out_mb)))


def bench_memory(quick: bool) -> list[dict]:
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    rows = []
    for chunked in (False, True):
        for n in sizes:
            if chunked and n != sizes[-1]:
                continue
            cmd = [sys.executable, __file__, "--memory-child", str(n)] + (["--chunked"] if chunked else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# -- report --------------------------------------------------------------------------------------


def _growth(rows: list[dict], x: str, y: str) -> str:
    """Log-log slope of ``y`` against ``x`` between the first and last row (1 = linear)."""
    if len(rows) < 2 or rows[0][y] <= 0 or rows[-1][y] <= 0:
        return "n/a"
    slope = math.log(rows[-1][y] / rows[0][y]) / math.log(rows[-1][x] / rows[0][x])
    return f"{slope:.2f}"


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    import normflows

    versions = {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
                "numpy": np.__version__, "normflows": normflows.__version__}
    try:
        import dask
        import distributed

        versions.update(dask=dask.__version__, distributed=distributed.__version__)
    except ImportError:
        pass
    cpu = cpu_name(platform.processor() or platform.machine())
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput"))
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.chunked)
        return
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    info = machine()
    command = "python benchmarks/throughput.py" + (" --quick" if args.quick else "")
    results = {}
    for name, fn in (("likelihood", bench_likelihood), ("training", bench_training), ("sampling", bench_sampling),
                     ("memory", bench_memory)):
        t0 = time.perf_counter()
        results[name] = fn(args.quick)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    total = time.perf_counter() - start

    lik = results["likelihood"]
    mem = [r for r in results["memory"] if r["path"] == "default"]
    slow = [r for r in lik if "black box" in r["likelihood"]]
    dask_rows = [r for r in slow if r["path"].startswith("Dask")]
    md = [
        "# Throughput benchmark",
        "",
        f"Command: `{command}` ({total:.0f} s in all). Machine: {info['cpu']}, {info['cpu_count']} cores "
        f"(shared; load average at start {info['load_average_at_start'][0]:.1f}), torch threads "
        f"{info['torch_threads']}, CUDA {info['cuda']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "",
        "## 1. Likelihood evaluations per second",
        "",
        _table(lik, ["likelihood", "path", "workers", "draws", "seconds", "draws_per_s"]),
        "",
        f"Vectorised vs Python loop: {lik[0]['draws_per_s'] / lik[1]['draws_per_s']:.0f}× more draws per second.",
    ]
    if len(dask_rows) == 2:
        md.append(f"Dask, 2 workers vs 1: {dask_rows[1]['draws_per_s'] / dask_rows[0]['draws_per_s']:.2f}× "
                  f"(tasks of {dask_rows[0]['chunk']} draws). Every executor gave weights identical to the "
                  "in-process run (asserted).")
    md += [
        "",
        "## 2. Training steps per second (6 couplings, hidden 64×64, CPU)",
        "",
        _table(results["training"], ["library", "dim", "batch", "params", "steps_per_s", "draws_per_s"]),
        "",
    ]
    for lib in sorted({r["library"] for r in results["training"]}):
        rows = [r for r in results["training"] if r["library"] == lib]
        for dim in sorted({r["dim"] for r in rows}):
            sub = [r for r in rows if r["dim"] == dim]
            md.append(f"- {lib}, D={dim}: steps/s ∝ batch^{_growth(sub, 'batch', 'steps_per_s')} "
                      f"(0 = fixed overhead dominates, −1 = compute-bound)")
    md += [
        "",
        "## 3. Sampling draws per second (D = 10)",
        "",
        _table(results["sampling"], ["library", "dim", "draws", "draws_per_s"]),
        "",
        "## 4. Peak memory and time of PriorAdapter.sample(N), 10-D model with 20 observations",
        "",
        "One subprocess per row, `OMP_NUM_THREADS=1`. Baseline = resident memory after importing torch and "
        "Pyro and tracing the model once; peak = `VmHWM` after resetting it (`/proc/self/clear_refs`), i.e. "
        "the whole process's peak resident memory during `sample(N)`; output = the WeightedDraws arrays.",
        "",
        _table(results["memory"], ["n", "path", "seconds", "draws_per_s", "baseline_rss_mb", "peak_rss_mb",
                                   "increase_mb", "output_mb"]),
        "",
        f"Growth (default path, log-log slope from N={mem[0]['n']:,} to N={mem[-1]['n']:,}): time "
        f"∝ N^{_growth(mem, 'n', 'seconds')}, memory increase ∝ N^{_growth(mem, 'n', 'increase_mb')} — the "
        "increase is one chunk's trace (bounded by chunk_size=100,000) plus the output arrays "
        "(36 bytes per draw at D=10 for latents and log densities, 8 for the source).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps(dict(command=command, seconds=total, machine=info, **results),
                                                   indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
