"""Wall time of a fit whose likelihood is expensive: in-process against a 2-worker Dask cluster.

    python benchmarks/dask_wall_time.py [--cost-ms 10] [--workers 2] [--chunk-size 250]
                                        [--budget 6000] [--busy] [--seed 0] [--out benchmarks/results]

The model is ``ode_models:lotka_volterra`` (a SciPy ODE behind ``pyro.factor``) with an artificial
cost added to its likelihood: ``--cost-ms`` milliseconds **per draw** evaluated (a call with ``n``
draws waits ``n × cost``), as if each simulation took that long. By default the wait is
``time.sleep`` (a simulator whose time is spent elsewhere: an external program, I/O, a remote
service), so the cluster's speed-up is not confounded by other jobs on a small machine; ``--busy``
spins the CPU instead (a CPU-bound simulator: then the speed-up is bounded by free cores).

Four fits with the same small schedule (a wall-time check, not a quality one: the fit stops at
the budget with β < 1, which it says in a warning recorded here), the first three as
``fit(model, y, loss=LikelihoodWeightedKL(chunk_size=--chunk-size, executor=…), schedule=…, seed=…)``:

* ``inline, no added cost``: the fit's own time (ODE solves, training, bookkeeping);
* ``inline``: the same with the added cost, evaluated chunk by chunk in this process;
* ``dask``: the same on ``distributed.LocalCluster(n_workers=--workers, threads_per_worker=1)`` via
  ``client.get_executor()``; the cluster's start (and one import of the model on each worker) is
  timed apart and not in the fit's seconds;
* ``dask, fit(executor=) alone``: ``fit(model, y, executor=client.get_executor(), …)`` with the
  loss's default chunk size (``--skip-default-chunks`` leaves it out). A round's draws are split
  into chunks of that size, and each chunk is one task, so a chunk as large as a round leaves
  every worker but one idle.

Each chunk has its own seed, so runs with the same chunk size evaluate the same draws and end with
the same log Ẑ (checked and reported). Writes ``dask_wall_time.md`` and ``.json`` (command,
machine, versions, settings, rows) into ``--out``. A small untimed fit runs first (warm-up). No
timing is asserted anywhere.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core per process (before numpy)
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import cpu_name, git_commit  # noqa: E402

from pyro_lwflow import LikelihoodWeightedKL, Schedule, fit, models  # noqa: E402

MODEL_NAME = "ode_models:lotka_volterra"
om = importlib.import_module("pyro_lwflow.models.ode_models")


def costly_lotka_volterra(y, cost_ms=0.0, busy=False):
    """``ode_models.lotka_volterra`` whose likelihood also takes ``cost_ms`` per draw it evaluates
    (sleeping, or spinning the CPU with ``busy``); the same sites, values and factor."""
    rates = [pyro.sample(s, dist.LogNormal(om.PRIOR_LOC[s], om.PRIOR_SCALE)) for s in om.SITES]
    rates = torch.broadcast_tensors(*rates)
    theta = torch.stack(rates, -1).reshape(-1, 4).numpy()
    value = om.log_likelihood(theta, torch.as_tensor(y).numpy())
    _wait(float(cost_ms) * 1e-3 * theta.shape[0], bool(busy))
    pyro.factor("likelihood", torch.as_tensor(value, dtype=rates[0].dtype).reshape(rates[0].shape))


def _wait(seconds: float, busy: bool) -> None:
    if seconds <= 0:
        return
    if not busy:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_fit(label: str, y: torch.Tensor, cost_ms: float, args: argparse.Namespace, executor=None,
            chunk_size: int | None = None) -> dict:
    """One fit; ``chunk_size=None``: ``fit(..., executor=executor)`` as it is (its loss's default chunks),
    else ``fit(..., loss=LikelihoodWeightedKL(chunk_size=chunk_size, executor=executor))``."""
    schedule = Schedule(budget=args.budget, initial_draws=args.initial_draws, max_draws=args.initial_draws,
                        num_steps=args.steps, warm_steps=args.steps // 2, starts="prior")
    if chunk_size is None:
        how = {"executor": executor}
    else:
        how = {"loss": LikelihoodWeightedKL(chunk_size=chunk_size, executor=executor, progress=False)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        result = fit(costly_lotka_volterra, y, model_kwargs={"cost_ms": cost_ms, "busy": args.busy}, schedule=schedule,
                     num_components=1, seed=args.seed, progress=False, **how)
        seconds = time.perf_counter() - t0
    calls = int(result.num_likelihood_evals)
    row = {"run": label, "cost_ms_per_draw": cost_ms, "chunk_size": chunk_size, "calls": calls,
           "rounds": len(result.rounds),
           "seconds": seconds, "calls_per_s": calls / seconds, "log_evidence": float(result.log_evidence),
           "ess": float(result.ess), "beta": float(result.rounds[-1].beta),
           "round_seconds": [float(r.seconds) for r in result.rounds],
           "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})}
    print(f"  {label}: {calls:,} calls in {seconds:.1f} s ({row['calls_per_s']:.0f} calls/s), "
          f"{row['rounds']} rounds, log Z {row['log_evidence']:.4f}", flush=True)
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Wall time of an expensive likelihood: in-process against a Dask cluster",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, pyro {meta['pyro']}, "
        f"dask/distributed {meta['distributed']}  ",
        f"Commit: {meta['commit']}; seed {meta['seed']}",
        "",
        f"Model: `{MODEL_NAME}` (SciPy ODE behind `pyro.factor`) plus {meta['cost_ms']:g} ms per draw evaluated "
        f"({'CPU spin' if meta['busy'] else 'time.sleep'}); schedule: budget {meta['budget']:,} calls, round 0 "
        f"{meta['initial_draws']:,} prior draws, {meta['steps']} training steps (later rounds at most "
        f"{meta['steps'] // 2}), chunks of {meta['chunk_size']} draws, one mixture component. Dask: "
        f"`LocalCluster(n_workers={meta['workers']}, threads_per_worker=1)`, started in "
        f"{meta['cluster_start_s']:.1f} s (not in the fit's seconds).",
        "",
        "| run | added cost per draw | chunk size | calls | rounds | wall time (s) | calls / s | "
        "speed-up vs inline | log Ẑ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    inline = next((r for r in rows if r["run"] == "inline"), None)
    for r in rows:
        speed = "–" if inline is None or r["cost_ms_per_draw"] == 0 else f"{inline['seconds'] / r['seconds']:.2f}×"
        chunk = "fit's default" if r["chunk_size"] is None else f"{r['chunk_size']:,}"
        lines.append(f"| {r['run']} | {r['cost_ms_per_draw']:g} ms | {chunk} | {r['calls']:,} | {r['rounds']} | "
                     f"{r['seconds']:.1f} | {r['calls_per_s']:.0f} | {speed} | {r['log_evidence']:.4f} |")
    lines += ["", "Runs with the same chunk size evaluate the same draws (each chunk has its own seed): log Ẑ "
              f"identical within each chunk size: {meta['same_log_evidence']}."]
    if inline is not None:
        ideal = inline["calls"] * meta["cost_ms"] * 1e-3
        lines.append(f"The added cost alone is {ideal:.1f} s of the inline run's {inline['seconds']:.1f} s; "
                     f"on {meta['workers']} workers it is at best {ideal / meta['workers']:.1f} s.")
    notes = sorted({w for r in rows for w in r["warnings"]})
    if notes:
        lines += ["", "Warnings (the small budget is deliberate):"] + [f"- {w}" for w in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-ms", type=float, default=10.0, help="added cost per draw (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=250, help="draws per chunk (one task)")
    parser.add_argument("--budget", type=int, default=6000, help="likelihood calls of each fit")
    parser.add_argument("--initial-draws", type=int, default=2000, help="draws of round 0 (and the most of a round)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of round 0")
    parser.add_argument("--busy", action="store_true", help="spin the CPU instead of sleeping")
    parser.add_argument("--skip-default-chunks", action="store_true",
                        help="no run of fit(executor=) with the loss's default chunk size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import distributed

    y = models.load(MODEL_NAME).example_data()
    with warnings.catch_warnings():  # warm-up, not timed: first-call costs (imports, allocations) out of the rows
        warnings.simplefilter("ignore")
        fit(costly_lotka_volterra, y, schedule=Schedule.one_shot(500, num_steps=5), num_components=1, progress=False)
    rows = [run_fit("inline, no added cost", y, 0.0, args, chunk_size=args.chunk_size),
            run_fit("inline", y, args.cost_ms, args, chunk_size=args.chunk_size)]
    t0 = time.perf_counter()
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        client.run(torch.set_num_threads, 1)
        client.run(importlib.import_module, "pyro_lwflow.models.ode_models")
        cluster_start = time.perf_counter() - t0
        print(f"  cluster of {args.workers} workers ready in {cluster_start:.1f} s", flush=True)
        executor = client.get_executor()
        rows.append(run_fit(f"dask, {args.workers} workers", y, args.cost_ms, args, executor, args.chunk_size))
        if not args.skip_default_chunks:
            rows.append(run_fit(f"dask, {args.workers} workers, fit(executor=) alone", y, args.cost_ms, args,
                                executor))
    cpu = cpu_name(platform.processor() or platform.machine())
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "machine": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
            "python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
            "numpy": np.__version__, "distributed": distributed.__version__, "commit": git_commit(),
            "seed": args.seed, "cost_ms": args.cost_ms, "busy": args.busy, "workers": args.workers,
            "chunk_size": args.chunk_size, "budget": args.budget, "initial_draws": args.initial_draws,
            "steps": args.steps, "cluster_start_s": cluster_start,
            "same_log_evidence": all(len({r["log_evidence"] for r in rows if r["chunk_size"] == c}) == 1
                                     for c in {r["chunk_size"] for r in rows}),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dask_wall_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = _markdown(rows, meta)
    (out / "dask_wall_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
