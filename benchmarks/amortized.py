"""Amortized inference on three SBI-benchmark tasks: our conditional flow against sbi's NPE.

For each task (``two_moons``, ``slcp``, ``gaussian_linear``: ``models/sbi_tasks.py``, sbibm 1.1.0's
priors and simulators) and each simulation budget, the prior predictive is simulated ONCE with a
fixed seed per task × budget (recorded, with a fingerprint of the simulations), and both methods
train on those same simulations:

- ``sbi``: sbi's neural posterior estimation with its defaults, ``NPE(prior)``, then
  ``append_simulations(theta, x).train()`` and ``build_posterior()``. sbibm 1.1.0 pins
  ``sbi<0.22``, where NPE is still called ``SNPE`` (the same class, ``SNPE_C``, with the same
  defaults: a MAF); the script takes ``NPE`` where it exists and ``SNPE`` otherwise.
- ``lwflow``: ``pyro_lwflow.amortize(model, simulations=(theta, x), seed=seed)``, then per
  observation ``.condition(x_o).sample(n)`` (amortized draws) and ``.check(x_o, num_draws=n)``
  (draws importance-weighted by the model's likelihood, PSIS-resampled: corrected draws).
- ``lwflow-x2``, ``lwflow-x3`` (only when asked for): the same with ``amortize(..., ensemble=2)`` (or 3),
  members trained side by side on the same simulations, their equal mixture the answer.

Each is scored on sbibm's 10 observations by C2ST (``sbibm.metrics.c2st``; 0.5 = indistinguishable)
of 10,000 draws against the 10,000 reference posterior draws. Columns: mean C2ST over the
observations (amortized draws; for lwflow also the corrected draws), the extra likelihood
evaluations per observation of the check, the median importance efficiency (ESS / draws), training
seconds, milliseconds per new observation for 10,000 draws. The JSON has the per-observation table.

Results merge: a run updates only the rows (task × budget × method) it ran and keeps the others of
an existing ``amortized.json``, so ``--methods lwflow`` adds our rows beside sbi's from an earlier run
(the fingerprints say whether both saw the same simulations).

Needs the bench environment (``make bench-amortized`` builds it: sbi, sbibm==1.1.0, future)::

    python benchmarks/amortized.py                                   # all tasks, 10^4 and 10^5 sims
    python benchmarks/amortized.py --methods sbi --sims 10000        # sbi's side only
    python benchmarks/amortized.py --methods lwflow                  # ours, merged beside sbi's
    python benchmarks/amortized.py --quick                           # smoke test: amortized_quick.*
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core per run (before numpy)
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import cpu_name, git_commit  # noqa: E402
from pyro_lwflow.models import sbi_tasks  # noqa: E402

TASKS = ("two_moons", "slcp", "gaussian_linear")
METHODS = ("lwflow", "lwflow-x2", "lwflow-x3", "sbi")
DEFAULT_METHODS = ("lwflow", "sbi")
LWFLOW_METHODS = tuple(m for m in METHODS if m.startswith("lwflow"))
SIMS = (10_000, 100_000)
NUM_DRAWS = 10_000
OBSERVATIONS = tuple(range(1, 11))
QUICK = {"tasks": ["two_moons"], "sims": [2_000], "observations": [1, 2], "draws": 1_000, "sbi_max_epochs": 20}


def simulation_seed(task: str, sims: int) -> int:
    """The fixed seed of the simulations of ``task`` at budget ``sims`` (the same in every run)."""
    return zlib.crc32(f"amortized:{task}:{sims}".encode()) % 2**31


def simulate(task: str, sims: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(theta (sims, D), x (sims, d), info)`` from the task's prior predictive, seeded."""
    seed = simulation_seed(task, sims)
    pyro.set_rng_seed(seed)
    with torch.no_grad(), pyro.plate("simulations", sims, dim=-1):
        trace = poutine.trace(poutine.uncondition(sbi_tasks.MODELS[task])).get_trace()
    theta, x = trace.nodes["theta"]["value"].detach(), trace.nodes["x"]["value"].detach()
    info = {"seed": seed, "fingerprint": [round(float(theta.double().sum()), 6), round(float(x.double().sum()), 6)]}
    return theta, x, info


@contextlib.contextmanager
def _quiet():
    """Swallow the libraries' progress printing (sbi 0.21 writes its epochs to stdout)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Reference:
    """sbibm's observations and reference posterior draws of one task."""

    def __init__(self, task: str):
        import sbibm

        self.task = sbibm.get_task(task)

    def observation(self, i: int) -> torch.Tensor:
        return self.task.get_observation(num_observation=i).reshape(-1)

    def draws(self, i: int) -> torch.Tensor:
        return self.task.get_reference_posterior_samples(num_observation=i)


def c2st(reference: torch.Tensor, draws: torch.Tensor, seed: int) -> float:
    """sbibm's C2ST of ``draws`` against as many ``reference`` draws."""
    from sbibm.metrics import c2st as sbibm_c2st

    n = min(len(reference), len(draws))
    gen = torch.Generator().manual_seed(seed)
    ref = reference[torch.randperm(len(reference), generator=gen)[:n]]
    with _quiet():
        return float(sbibm_c2st(ref.float(), draws[:n].float(), seed=seed))


def _npe_class():
    try:
        from sbi.inference import NPE
    except ImportError:  # sbi < 0.23 (sbibm 1.1.0 pins sbi < 0.22): the same class as SNPE
        from sbi.inference import SNPE as NPE
    return NPE


def run_sbi(task: str, theta, x, ref: Reference, observations, draws: int, seed: int, quick: bool = False) -> dict:
    NPE = _npe_class()
    max_epochs = QUICK["sbi_max_epochs"] if quick else None
    torch.manual_seed(seed)
    inference = NPE(prior=ref.task.get_prior_dist())
    train_kwargs = {} if max_epochs is None else {"max_num_epochs": max_epochs}
    start = time.perf_counter()
    with _quiet():
        inference.append_simulations(theta, x).train(**train_kwargs)
        posterior = inference.build_posterior()
    train_s = time.perf_counter() - start
    epochs = getattr(inference, "_summary", {}).get("epochs_trained", [None])
    per_obs = []
    for i in observations:
        x_o = ref.observation(i)
        start = time.perf_counter()
        with _quiet():
            samples = posterior.sample((draws,), x=x_o, show_progress_bars=False)
        ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        score = c2st(ref.draws(i), samples, seed)
        per_obs.append({"observation": i, "c2st": score, "ms": ms, "c2st_s": time.perf_counter() - start})
    return {
        "train_s": train_s,
        "epochs": epochs[-1] if epochs else None,
        "per_observation": per_obs,
        "c2st": statistics.fmean(o["c2st"] for o in per_obs),
        "ms_per_observation": statistics.median(o["ms"] for o in per_obs),
    }


def _num(v) -> float | None:
    if v is None:
        return None
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def run_lwflow(task: str, theta, x, ref: Reference, observations, draws: int, seed: int, quick: bool = False,
               ensemble: int = 1) -> dict:
    from pyro_lwflow import amortize, calibrate

    model = sbi_tasks.MODELS[task]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amortized = amortize(model, simulations=(theta, x), seed=seed, progress=False, ensemble=ensemble)
    train_s = time.perf_counter() - start
    calibration = calibrate(amortized, num_simulations=1_000, num_draws=99, seed=seed)
    per_obs = []
    for i in observations:
        x_o = ref.observation(i)
        start = time.perf_counter()
        samples = amortized.condition(x_o).sample(draws)["theta"].detach()
        ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        chk = amortized.check(x_o, num_draws=draws)
        corrected = chk.rejection_sample(generator=torch.Generator().manual_seed(seed))["theta"].detach()
        check_ms = 1e3 * (time.perf_counter() - start)
        reference = ref.draws(i)
        start = time.perf_counter()
        scores = c2st(reference, samples, seed), c2st(reference, corrected, seed)
        per_obs.append({
            "observation": i,
            "c2st": scores[0],
            "c2st_corrected": scores[1],
            "c2st_s": time.perf_counter() - start,
            "ms": ms,
            "check_ms": check_ms,
            "ess": _num(chk.ess),
            "efficiency": _num(chk.efficiency),
            "pareto_k": _num(chk.pareto_k),
            "log_evidence": _num(chk.log_evidence),
            "likelihood_evals": _num(chk.num_likelihood_evals),
            "corrected_draws": len(corrected),
        })
    return {
        "train_s": train_s,
        "per_observation": per_obs,
        "c2st": statistics.fmean(o["c2st"] for o in per_obs),
        "c2st_corrected": statistics.fmean(o["c2st_corrected"] for o in per_obs),
        "likelihood_evals_per_observation": statistics.fmean(o["likelihood_evals"] for o in per_obs),
        "median_efficiency": statistics.median(o["efficiency"] for o in per_obs),
        "median_corrected_draws": statistics.median(o["corrected_draws"] for o in per_obs),
        "ms_per_observation": statistics.median(o["ms"] for o in per_obs),
        "sbc_p_values": [float(p) for p in calibration.p_values()],
        "sbc_min_p": float(calibration.p_values().min()),
        "coverage_error": calibration.max_coverage_error,
    }


RUNNERS = {"lwflow": run_lwflow, "lwflow-x2": functools.partial(run_lwflow, ensemble=2),
           "lwflow-x3": functools.partial(run_lwflow, ensemble=3), "sbi": run_sbi}


# -- output ---------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_meta(argv: list[str]) -> dict:
    cpu = cpu_name(platform.processor() or platform.machine())
    return {
        "command": "python benchmarks/amortized.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
        "python": platform.python_version(),
        "versions": {k: _version(k) for k in ("torch", "pyro-ppl", "sbi", "sbibm", "scikit-learn")},
        "commit": git_commit(),
    }


def _key(task: str, sims: int, method: str) -> str:
    return f"{task}|{sims}|{method}"


def _fmt(v, fmt="{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def _markdown(data: dict) -> str:
    runs = data["runs"]
    lines = [
        "# Amortized inference on SBI-benchmark tasks: lwflow against sbi's NPE",
        "",
        "C2ST of 10,000 draws against sbibm's 10,000 reference posterior draws (0.5 = indistinguishable),",
        "mean over the observations; both methods train on the same simulations (seed and fingerprint per",
        "task × budget in the JSON). *corrected*: lwflow's 10,000 draws weighted by the model's likelihood and",
        "kept by rejection against their largest PSIS-smoothed weight (distinct posterior draws, median count",
        "*kept*), scored against as many reference draws (resampling with repeats would be caught by the",
        "classifier: exact 10-D draws resampled with replacement score 0.64); *evals/obs*: the likelihood",
        "evaluations that correction costs per observation (rows with no *kept* count come from runs before",
        "rejection sampling: their corrected draws were PSIS-resampled, repeats included);",
        "*eff.*: median ESS / draws over the observations; *ms/obs*: a new observation's 10,000 draws;",
        "*SBC p*: the smallest per-coordinate χ² p-value of rank uniformity over 1,000 held-out simulations",
        "(99 draws each), *cov. err.*: the largest gap between expected coverage and the credible level.",
        "*lwflow-x2*, *lwflow-x3*: `amortize(..., ensemble=2)` (or 3), members trained side by side on the same",
        "simulations, their equal mixture the answer.",
        "",
        "| task | sims | method | C2ST | C2ST corrected | kept | evals/obs | eff. | SBC p | cov. err. | train s "
        "| ms/obs | obs | run |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {t: i for i, t in enumerate(TASKS)}
    rows = sorted(data["rows"].values(), key=lambda r: (order.get(r["task"], 99), r["sims"], r["method"]))
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['task']} | {r['sims']:,} | {r['method']} | error: {r['error'][:60]} "
                         f"| | | | | | | | {r['run']} |")
            continue
        lines.append(
            f"| {r['task']} | {r['sims']:,} | {r['method']} | {_fmt(r['c2st'])} | {_fmt(r.get('c2st_corrected'))} "
            f"| {_fmt(r.get('median_corrected_draws'), '{:,.0f}')} "
            f"| {_fmt(r.get('likelihood_evals_per_observation'), '{:,.0f}')} "
            f"| {_fmt(r.get('median_efficiency'), '{:.2f}')} | {_fmt(r.get('sbc_min_p'), '{:.3f}')} "
            f"| {_fmt(r.get('coverage_error'), '{:.3f}')} | {_fmt(r['train_s'], '{:.0f}')} "
            f"| {_fmt(r['ms_per_observation'], '{:.0f}')} | {len(r['per_observation'])} | {r['run']} |")
    lines += _paired(rows)
    lines += ["", "## Runs", ""]
    for i, run in enumerate(runs):
        v = ", ".join(f"{k} {x}" for k, x in run["versions"].items() if x)
        lines.append(f"{i}. `{run['command']}` — {run['date']}; {run['machine']}; Python {run['python']}, {v}; "
                     f"commit {run['commit']}")
    lines += ["", "## Simulations", "", "| task | sims | seed | fingerprint (Σθ, Σx) |", "|---|---:|---:|---|"]
    for key, s in sorted(data["simulations"].items()):
        task, sims = key.split("|")
        lines.append(f"| {task} | {int(sims):,} | {s['seed']} | {s['fingerprint']} |")
    return "\n".join(lines) + "\n"


def _paired(rows: list[dict]) -> list[str]:
    """Mean C2ST of each method over the observations every method of a task × budget scored."""
    groups: dict = {}
    present = {r["method"] for r in rows if not r.get("error")}
    methods = [m for m in METHODS if m in present]
    lwflows = [m for m in methods if m in LWFLOW_METHODS]
    for r in rows:
        if not r.get("error"):
            groups.setdefault((r["task"], r["sims"]), []).append(r)
    out = ["", "## On the same observations", "",
           "Each method's mean C2ST over the observations that every method of the task and budget scored.", "",
           "| task | sims | observations | " + " | ".join(methods) + " | "
           + " | ".join(f"{m} corrected" for m in lwflows) + " |",
           "|---|---:|---|" + "---:|" * (len(methods) + len(lwflows))]
    for (task, sims), group in groups.items():
        if len(group) < 2:
            continue
        shared = set.intersection(*({o["observation"] for o in r["per_observation"]} for r in group))
        by_method = {r["method"]: r for r in group}
        cells = []
        for method in methods:
            r = by_method.get(method)
            values = [o["c2st"] for o in r["per_observation"] if o["observation"] in shared] if r else []
            cells.append(_fmt(statistics.fmean(values)) if values else "–")
        for method in lwflows:
            lw = by_method.get(method)
            corrected = [o["c2st_corrected"] for o in lw["per_observation"] if o["observation"] in shared] if lw else []
            cells.append(_fmt(statistics.fmean(corrected)) if corrected else "–")
        out.append(f"| {task} | {sims:,} | {', '.join(map(str, sorted(shared)))} | " + " | ".join(cells) + " |")
    return out


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "rows": {}, "simulations": {}}


def _write(out: Path, stem: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(_finite(data), indent=1, allow_nan=False))
    (out / f"{stem}.md").write_text(_markdown(data))


def _print_row(r: dict) -> None:
    if r.get("error"):
        print(f"{r['task']:>16} {r['sims']:>8,} {r['method']:>7}  error: {r['error']}", flush=True)
        return
    extra = ""
    if r["method"].startswith("lwflow"):
        extra = (f"  corrected {_fmt(r['c2st_corrected'])}  evals/obs {r['likelihood_evals_per_observation']:,.0f}"
                 f"  eff {_fmt(r['median_efficiency'], '{:.2f}')}")
    print(f"{r['task']:>16} {r['sims']:>8,} {r['method']:>7}  C2ST {r['c2st']:.3f}{extra}  train {r['train_s']:.0f} s"
          f"  {r['ms_per_observation']:.0f} ms/obs", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", choices=TASKS, default=None, help="default: all three")
    parser.add_argument("--sims", nargs="*", type=int, default=None, help="simulation budgets (default 10000 100000)")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="default: lwflow sbi (lwflow-x2, lwflow-x3: ensembles, amortize(..., ensemble=2 or 3))")
    parser.add_argument("--observations", nargs="*", type=int, default=None, help="sbibm observations (default 1..10)")
    parser.add_argument("--draws", type=int, default=None,
                        help=f"posterior draws per observation (default {NUM_DRAWS:,})")
    parser.add_argument("--quick", action="store_true", help="a smoke test: two_moons, 2,000 sims, 2 observations, "
                        "1,000 draws, sbi capped at 20 epochs; writes amortized_quick.*")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)

    tasks = args.tasks or (QUICK["tasks"] if args.quick else list(TASKS))
    budgets = args.sims or (QUICK["sims"] if args.quick else list(SIMS))
    observations = args.observations or (QUICK["observations"] if args.quick else list(OBSERVATIONS))
    draws = args.draws or (QUICK["draws"] if args.quick else NUM_DRAWS)
    stem = "amortized_quick" if args.quick else "amortized"
    out = Path(args.out)
    data = _load(out / f"{stem}.json")
    run_id = len(data["runs"])
    data["runs"].append({**_run_meta(argv), "observations": observations, "draws": draws})

    for task in tasks:
        ref = Reference(task)
        for sims in budgets:
            theta, x, info = simulate(task, sims)
            sim_key = f"{task}|{sims}"
            old = data["simulations"].get(sim_key)
            if old is not None and old != info:
                print(f"warning: {sim_key}: the simulations differ from the earlier run's ({old} vs {info}); "
                      "the other method's row is from different simulations", file=sys.stderr)
            data["simulations"][sim_key] = info
            for method in args.methods:
                row = {"task": task, "sims": sims, "method": method, "seed": info["seed"], "run": run_id}
                try:
                    row.update(RUNNERS[method](task, theta, x, ref, observations, draws, info["seed"], args.quick))
                except Exception as exc:  # noqa: BLE001 - one method's failure is a row, not the end of the run
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    row["traceback"] = traceback.format_exc(limit=-4)
                data["rows"][_key(task, sims, method)] = row
                _print_row(row)
                _write(out, stem, data)  # after every row: a long run keeps what it finished
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
