"""Efficiency: posterior quality against likelihood (and gradient) calls, every method side by side.

    python benchmarks/efficiency.py [--cases three_mode_2d linear_regression ...]
                                    [--methods lwflow nautilus pocomc dynesty nuts]
                                    [--seed 0] [--quick] [--schedule KEY=VALUE ...] [--score-draws 5]
                                    [--out benchmarks/results]

Cases: the paper's five targets (``models/paper_targets.py``), the ``gmm_5d``,
``gmm_10d``, ``gmm_20d`` mixtures (``high_dim.py``), the real-shaped models of
``real_models.py`` (linear and logistic regression, AR(5), eight schools centred and
non-centred) and ``lotka_volterra`` (``ode_models.py``: a SciPy ODE behind ``pyro.factor``, a
NumPy black box with no gradient). Methods, all run in this one process so their costs compare:

* ``lwflow``: ``fit(model, *data, schedule=Schedule(), seed=…, callback=…)``; the callback scores
  20,000 draws of the guide after every round, which gives a quality-against-calls trajectory
  (its time is not counted in the seconds). Calls = likelihood + gradient evaluations.
* ``nautilus`` 1.0.6, ``pocomc`` 1.2.6, ``dynesty`` 3.1: the settings of ``shared/benchmarks/peers.md``,
  on the model turned into a likelihood on the unit cube by ``benchmarks/peers.py`` (each latent
  site gets ``icdf(u)`` of its prior, in model order; for the Uniform(−12, 12)^d targets this is
  exactly peers.md's ``uniform(loc=-12, scale=24)`` prior). Their weighted draws are resampled
  (multinomial) to 20,000. Calls are counted inside the likelihood and checked against each
  library's own count. A library that is not installed is skipped with a note (``bench`` extra).
* ``nuts``: Pyro NUTS, 4 chains one after another (1,000 warm-up + 5,000 draws each, all 20,000
  draws kept); calls = potential-energy evaluations, gradient ones counted apart.

Scores. Mixtures (``.truth``): the mean (and sd) over ``K = --score-draws`` (default 5) independent
20,000-draw samples of the method, sample ``k`` against its own 20,000 exact draws
(``truth.sample(20000, seed=2k+1)``), of ``w1_avg``, mode-weight error and bridge mass (a single
sample's random split between the modes moves W1 by a whole noise floor). ``W1/floor`` is the mean
``w1_avg`` over the noise floor, the mean over the same ``K`` pairs of independent exact sets
(seeds ``2k+1``, ``2k+2``) of the same metric; its sd is that of the ``K`` ratios. lwflow's samples
come from the guide (per round too); a nested sampler's are ``K`` multinomial resamples of its
weighted draws (seeds ``seed … seed + K − 1``); NUTS keeps its one set of 20,000 draws (scored
against each of the ``K`` exact sets). Also |log Ẑ − log Z|; pass = mean W1 ≤ 1.5 × floor (for
gmm_20d also 2 ×). Real-shaped models: against a long NUTS reference
(4 chains × 5,000 draws after 1,000 warm-up, target accept 0.9, cached in
``<out>/reference/<case>.pt`` with its settings and reused while they match; eight schools centred
takes its reference from the non-centred parametrisation, whose NUTS run has no funnel), on the
flattened constrained parameter vector. ``lotka_volterra`` has no gradient, so NUTS can neither run
it nor give its reference: its reference is adaptive importance sampling without gradients
(``ode_models.reference_posterior``: Nelder–Mead to the mode, a finite-difference Laplace
covariance, 3 rounds of 20,000 multivariate-t(5) draws moved to the weighted moments, then
400,000 draws; weighted mean and sd, its ESS and Pareto k̂ recorded; cached the same way); its
log Z is scored too (|log Ẑ − ref log Z|, not part of pass). Mean err = max over coordinates of
|mean − ref mean| / ref sd,
sd ratios = sd / ref sd; pass = mean err ≤ 0.1 and every sd ratio in [0.9, 1.1]. "calls to pass":
for lwflow the calls of the first round whose draws pass; for a peer its total calls if its final
draws pass (real-shaped models score the first of the ``K`` samples only). lwflow's per-round
trajectory also has ``calls_per_ess`` (the round's calls per effective draw it added at β = 1) and
``total_calls_per_ess`` (cumulative calls per ESS), from its ``RoundSummary``.

Writes ``efficiency.md``, ``.json`` (command, machine, versions, settings, every row, lwflow's
per-round trajectory) and ``efficiency.png`` (one panel per case: quality against calls, log x;
``--quick`` writes ``efficiency_quick.*``), rewritten after every case. ``--quick`` uses tiny
budgets: a smoke test, not a result.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core per run (before numpy)
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import ast  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import cpu_name, git_commit  # noqa: E402
from peers import PEERS, PeerResult, UnitCube, available, nuts_settings, run_nuts  # noqa: E402

import pyro_lwflow  # noqa: E402
from pyro_lwflow import fit, metrics, models  # noqa: E402

PAPER = ("single_mode_2d", "two_mode_2d", "three_mode_2d", "three_mode_3d", "non_gaussian_3d")
HIGH_DIM = ("gmm_5d", "gmm_10d", "gmm_20d")
REAL = ("linear_regression", "logistic_regression", "ar_model", "eight_schools_centered",
        "eight_schools_noncentered")
ODE = ("lotka_volterra",)
FILES = {**dict.fromkeys(PAPER, "paper_targets"), **dict.fromkeys(HIGH_DIM, "high_dim"),
         **dict.fromkeys(REAL, "real_models"), **dict.fromkeys(ODE, "ode_models")}
METHODS = ("lwflow", "nautilus", "pocomc", "dynesty", "nuts")
NUM_DRAWS = 20_000
SCORE_DRAWS = 5  # independent NUM_DRAWS-draw samples a mixture's quality is averaged over (--score-draws)
W1_PASS, W1_PASS_LOOSE = 1.5, 2.0  # × the noise floor; the loose one reported for gmm_20d
LOOSE_CASES = ("gmm_20d",)
MEAN_PASS, SD_PASS = 0.1, 0.1  # mean err ≤ 0.1 ref sd; every sd ratio within 1 ± 0.1
REFERENCE_SEED = 12_345
# the reference of a case from another model with the same posterior over the case's sites
REFERENCE_VIA = {
    "eight_schools_centered": (
        "eight_schools_noncentered",
        lambda s: {"mu": s["mu"], "tau": s["tau"], "theta": s["mu"].unsqueeze(-1) + s["tau"].unsqueeze(-1) * s["eta"]},
    ),
}


# the gradient-free reference of a black-box case: adaptive importance sampling (ode_models.reference_posterior)
IS_REFERENCE = {"lotka_volterra": "ode_models:lotka_volterra"}


def is_reference_settings(quick: bool) -> dict:
    if quick:
        return {"method": "importance sampling", "num_draws": 40_000, "stage_draws": 5_000, "stages": 3}
    return {"method": "importance sampling", "num_draws": 400_000, "stage_draws": 20_000, "stages": 3}


def reference_settings(quick: bool) -> dict:
    if quick:
        return {"num_chains": 4, "warmup_steps": 200, "num_samples": 500, "target_accept_prob": 0.9}
    return {"num_chains": 4, "warmup_steps": 1000, "num_samples": 5000, "target_accept_prob": 0.9}


# -- cases and scores -----------------------------------------------------------------------------


class Case:
    """A model, its data, its unit-cube form, and what its draws are scored against."""

    def __init__(self, name: str, quick: bool, out: Path, score_draws: int = SCORE_DRAWS) -> None:
        self.name, self.file = name, FILES[name]
        self.model = models.load(f"{self.file}:{name}")
        self.args = models.example_args(self.model)
        self.cube = UnitCube(self.model, self.args)
        self.dim = self.cube.dim
        self.truth = getattr(self.model, "truth", None)
        self.loose = name in LOOSE_CASES
        self.score_draws = score_draws
        if self.truth is not None:
            # K exact sets to score K method samples against, and the floor over K pairs of exact sets
            self.exacts = [self.truth.sample(NUM_DRAWS, seed=2 * k + 1) for k in range(score_draws)]
            self.exact = self.exacts[0]
            self.floors = [metrics.w1_avg(e, self.truth.sample(NUM_DRAWS, seed=2 * k + 2))
                           for k, e in enumerate(self.exacts)]
            self.floor = float(np.mean(self.floors))
            self.floor_sd = _sd(self.floors)
            self.reference = None
        else:
            self.reference = _reference(self, quick, out)

    @property
    def kind(self) -> str:
        return "mixture" if self.truth is not None else "real"

    def flatten(self, values: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return self.cube.flatten(values, n)

    def score(self, draws: torch.Tensor | list[torch.Tensor], log_z: float | None) -> dict:
        """The case's metrics of ``(N, d)`` flattened draws (or a list of independent such samples:
        mixtures average over them, sample ``k`` against exact set ``k``; one sample is scored
        against each of the ``K`` exact sets), ``pass`` and the plotted ``quality``."""
        samples = [d.float() for d in (draws if isinstance(draws, (list, tuple)) else [draws])]
        finite = all(bool(torch.isfinite(d).all()) for d in samples)
        log_z = None if log_z is None or not math.isfinite(log_z) else float(log_z)
        if self.truth is not None:
            if len(samples) == 1:
                pairs = [(samples[0], e) for e in self.exacts]
            else:
                pairs = [(d, self.exacts[k % len(self.exacts)]) for k, d in enumerate(samples)]
            w1s = [metrics.w1_avg(e, d) if finite else math.inf for d, e in pairs]
            mwes = [metrics.mode_weight_error(self.truth.component_log_probs, self.truth.weights, d)
                    for d in samples] if finite else None
            bridges = [metrics.bridge_mass(self.truth.log_prob, e, d) for d, e in pairs] if finite else None
            w1 = float(np.mean(w1s))
            ratio = w1 / self.floor
            row = {
                "w1_avg": w1,
                "w1_avg_sd": _sd(w1s),
                "w1_noise_floor": self.floor,
                "w1_noise_floor_sd": self.floor_sd,
                "w1_over_floor": ratio,
                "w1_over_floor_sd": _sd([w / self.floor for w in w1s]),
                "mode_weight_error": float(np.mean(mwes)) if finite else None,
                "mode_weight_error_sd": _sd(mwes) if finite else None,
                "bridge_mass": float(np.mean(bridges)) if finite else None,
                "score_samples": len(samples),
                "score_pairs": len(pairs),
                "log_evidence": log_z,
                "log_evidence_error": None if log_z is None else abs(log_z - self.truth.log_evidence),
                "quality": ratio,
                "pass": ratio <= W1_PASS,
            }
            if self.loose:
                row["pass_2x"] = ratio <= W1_PASS_LOOSE
            return row
        ref = self.reference
        draws = samples[0]
        mean, sd = draws.double().mean(0), draws.double().std(0)
        err = ((mean - ref["mean"]).abs() / ref["sd"])
        ratio = sd / ref["sd"]
        mean_err, lo, hi = float(err.max()), float(ratio.min()), float(ratio.max())
        if not finite:
            mean_err, lo, hi = math.inf, math.nan, math.nan
        quality = max(mean_err, abs(lo - 1.0), abs(hi - 1.0)) if finite else math.inf
        row = {
            "mean_err": mean_err,
            "mean_err_site": self.cube.labels[int(err.argmax())] if finite else None,
            "sd_ratio_min": lo,
            "sd_ratio_max": hi,
            "log_evidence": log_z,
            "quality": quality,
            "pass": finite and mean_err <= MEAN_PASS and abs(lo - 1.0) <= SD_PASS and abs(hi - 1.0) <= SD_PASS,
        }
        if ref.get("log_evidence") is not None:  # an importance-sampling reference also has log Z
            row["log_evidence_error"] = None if log_z is None else abs(log_z - ref["log_evidence"])
        return row


def _sd(values) -> float | None:
    """Sample sd (``ddof=1``) of finite ``values``; ``None`` for fewer than two."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _cached_reference(case: Case, quick: bool, out: Path, settings: dict) -> tuple[Path, dict | None]:
    """Where ``case``'s reference is cached, and the cached one if it was made with ``settings``."""
    path = out / "reference" / f"{case.name}{'_quick' if quick else ''}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        if cached.get("settings") == settings:
            print(f"  reference: {path} (cached)", flush=True)
            return path, cached
        print(f"  reference: {path} has other settings; recomputing", flush=True)
    return path, None


def _reference(case: Case, quick: bool, out: Path) -> dict:
    """The long-NUTS reference of a real-shaped case (importance sampling for a black box): cached,
    recomputed when its settings change."""
    if case.name in IS_REFERENCE:
        return _is_reference(case, quick, out)
    via, to_case = REFERENCE_VIA.get(case.name, (case.name, None))
    settings = {**reference_settings(quick), "seed": REFERENCE_SEED, "model": f"real_models:{via}",
                "labels": case.cube.labels}
    path, cached = _cached_reference(case, quick, out, settings)
    if cached is not None:
        return cached
    model = models.load(settings["model"])
    args = models.example_args(model)

    def flatten(samples: dict, n: int) -> torch.Tensor:
        return case.flatten(to_case(samples) if to_case else samples, n)

    print(f"  reference: NUTS {settings['num_chains']} × {settings['num_samples']} (+{settings['warmup_steps']} "
          f"warm-up) on {settings['model']} …", flush=True)
    res = run_nuts(model, args, flatten, REFERENCE_SEED, settings, method="reference")
    draws = res.draws.double()
    ref = {"settings": settings, "draws": draws.float(), "mean": draws.mean(0), "sd": draws.std(0),
           "gradient_evals": res.gradient_evals, "seconds": res.seconds, "divergences": res.extra["divergences"],
           "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    print(f"  reference: {res.seconds:.0f} s, {res.extra['divergences']} divergences → {path}", flush=True)
    return ref


def _is_reference(case: Case, quick: bool, out: Path) -> dict:
    """The gradient-free reference of a black-box case: ``model.reference_posterior`` (adaptive importance
    sampling), cached like the NUTS references."""
    settings = {**is_reference_settings(quick), "seed": REFERENCE_SEED, "model": IS_REFERENCE[case.name],
                "labels": case.cube.labels}
    path, cached = _cached_reference(case, quick, out, settings)
    if cached is not None:
        return cached
    model = models.load(settings["model"])
    print(f"  reference: importance sampling, {settings['num_draws']:,} draws after {settings['stages']} × "
          f"{settings['stage_draws']:,} adaptation on {settings['model']} …", flush=True)
    t0 = time.perf_counter()
    res = model.reference_posterior(*models.example_args(model), num_draws=settings["num_draws"],
                                    stage_draws=settings["stage_draws"], stages=settings["stages"],
                                    seed=REFERENCE_SEED)
    seconds = time.perf_counter() - t0
    samples = torch.as_tensor(res["samples"])
    idx = torch.multinomial(torch.as_tensor(res["log_weights"]).exp(), NUM_DRAWS, replacement=True,
                            generator=torch.Generator().manual_seed(REFERENCE_SEED))
    ref = {"settings": settings, "draws": samples[idx].float(), "mean": torch.as_tensor(res["mean"]),
           "sd": torch.as_tensor(res["sd"]), "ess": res["ess"], "pareto_k": res["pareto_k"],
           "log_evidence": res["log_evidence"], "log_evidence_stderr": res["log_evidence_stderr"],
           "likelihood_evals": res["calls"], "seconds": seconds, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    print(f"  reference: {seconds:.0f} s, ESS {res['ess']:,.0f}, k̂ {res['pareto_k']:.2f}, log Z "
          f"{res['log_evidence']:.4f} ± {res['log_evidence_stderr']:.4f} → {path}", flush=True)
    return ref


# -- our method -----------------------------------------------------------------------------------

# --quick budgets: fields of Schedule, and the arguments of the fit before it (legacy)
QUICK_SCHEDULE = {"budget": 40_000, "target_ess": 4_000, "round_ess": 1_000, "max_draws": 20_000, "num_steps": 150,
                  "warm_steps": 75, "max_rounds": 8}
QUICK_LEGACY = {"num_prior_samples": 10_000, "samples_per_round": 10_000, "max_likelihood_evals": 40_000,
                "num_steps": 100, "max_rounds": 4}


def _lwflow_api() -> str:
    """``"schedule"``: ``fit(…, schedule=Schedule(), callback=cb)``; ``"legacy"``: ``fit(…, num_steps=…)``."""
    params = inspect.signature(fit).parameters
    if hasattr(pyro_lwflow, "Schedule") and "schedule" in params and "callback" in params:
        return "schedule"
    return "legacy"


def _accepted(target, wanted: dict) -> tuple[dict, list[str]]:
    """The items of ``wanted`` that ``target``'s signature takes, and the names it does not."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(wanted), []
    return {k: v for k, v in wanted.items() if k in params}, [k for k in wanted if k not in params]


def _summary_dict(summary) -> dict:
    raw = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    return {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_lwflow(case: Case, seed: int, quick: bool, overrides: dict) -> dict:
    """Our ``fit``, scored after every round (the callback) and at the end."""
    api = _lwflow_api()
    trajectory: list[dict] = []
    scoring = [0.0]

    def draws_of(sampler, salt: int) -> list[torch.Tensor]:
        # on a forked RNG: scoring must not shift the fit's random stream; K independent samples for a
        # mixture (the first one the same as the single sample of before), one for a real-shaped model
        out = []
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for k in range(case.score_draws if case.truth is not None else 1):
                torch.manual_seed(seed * 7919 + salt + 100_003 * k)
                out.append(case.flatten(sampler(NUM_DRAWS), NUM_DRAWS))
        return out

    def callback(guide, summary) -> None:
        t0 = time.perf_counter()
        lik = int(getattr(summary, "num_likelihood_evals", 0) or 0)
        grad = int(getattr(summary, "num_gradient_evals", 0) or 0)
        point = {"round": len(trajectory), "likelihood_evals": lik, "gradient_evals": grad, "calls": lik + grad,
                 **{k: v for k, v in _summary_dict(summary).items()
                    if k in ("beta", "ess", "pareto_k", "log_evidence", "num_components", "calls_per_ess",
                             "total_calls_per_ess")}}
        point.update(case.score(draws_of(guide.sample_posterior, len(trajectory) + 1),
                                getattr(summary, "log_evidence", None)))
        trajectory.append(point)
        per_ess = point.get("calls_per_ess")
        print(f"    round {point['round']}: calls {point['calls']:,} (β={point.get('beta')}) "
              f"calls/ΔESS {_fmt(per_ess)} quality {point['quality']:.3g} pass {point['pass']}", flush=True)
        scoring[0] += time.perf_counter() - t0

    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if api == "schedule":
            schedule_cls = pyro_lwflow.Schedule
            wanted = {**(QUICK_SCHEDULE if quick else {}), **overrides}
            kwargs, ignored = _accepted(schedule_cls, wanted)
            if ignored:
                notes.append(f"Schedule takes no {ignored} (ignored)")
            schedule = schedule_cls(**kwargs)
            settings = {"api": api, "schedule": _schedule_repr(schedule), "seed": seed}
            result = fit(case.model, *case.args, schedule=schedule, seed=seed, progress=False, callback=callback)
        else:  # the API before Schedule: no callback, so only the final point
            wanted = {**(QUICK_LEGACY if quick else {}), **overrides}
            kwargs, ignored = _accepted(fit, wanted)
            if ignored:
                notes.append(f"fit takes no {ignored} (ignored)")
            notes.append("legacy fit API (no Schedule / callback): final point only, no gradient count")
            settings = {"api": api, "fit_kwargs": kwargs, "seed": seed}
            result = fit(case.model, *case.args, seed=seed, progress=False, **kwargs)
    lik = int(result.num_likelihood_evals)
    grad = int(getattr(result, "num_gradient_evals", 0) or 0)
    row = {"method": "lwflow", "likelihood_evals": lik, "gradient_evals": grad, "calls": lik + grad,
           "seconds": float(result.wall_time) - scoring[0], "scoring_seconds": scoring[0],
           "pareto_k": _float(getattr(result, "pareto_k", None)), "rounds": len(result.rounds),
           "round_summaries": [_summary_dict(r) for r in result.rounds], "settings": settings,
           "trajectory": trajectory}
    row.update(case.score(draws_of(result.sample, 0), _float(result.log_evidence)))
    if not trajectory:
        trajectory.append({"round": len(result.rounds) - 1, "likelihood_evals": lik, "gradient_evals": grad,
                           "calls": lik + grad, **{k: row[k] for k in ("quality", "pass")}})
    row["calls_to_pass"] = _first_pass(trajectory, row, "pass")
    if case.loose:
        for p in trajectory:
            p.setdefault("pass_2x", p["quality"] <= W1_PASS_LOOSE)
        row["calls_to_pass_2x"] = _first_pass(trajectory, row, "pass_2x")
    row["warnings"] = _warning_texts(caught)
    row["notes"] = notes
    return row


def _schedule_repr(schedule) -> dict | str:
    if dataclasses.is_dataclass(schedule):
        return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                for k, v in dataclasses.asdict(schedule).items()}
    return repr(schedule)


def _first_pass(trajectory: list[dict], final: dict, key: str) -> int | None:
    for p in trajectory:
        if p.get(key):
            return p["calls"]
    return final["calls"] if final.get(key) else None


# -- peers ----------------------------------------------------------------------------------------


def run_peer(case: Case, method: str, seed: int, quick: bool) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == "nuts":
            res: PeerResult = run_nuts(case.model, case.args, case.flatten, seed, nuts_settings(quick))
        else:
            res = PEERS[method](case.cube, NUM_DRAWS, seed, quick)
    calls = res.likelihood_evals + res.gradient_evals
    row = {"method": method, "likelihood_evals": res.likelihood_evals, "gradient_evals": res.gradient_evals,
           "calls": calls, "library_evals": res.library_evals, "seconds": res.seconds,
           "log_evidence_stderr": res.log_evidence_stderr, "num_draws": int(res.draws.shape[0]),
           "settings": res.settings, **res.extra}
    samples = [res.draws]
    if res.resample_draws is not None and case.truth is not None:
        samples += [res.resample_draws(NUM_DRAWS, seed + k) for k in range(1, case.score_draws)]
    row.update(case.score(samples, res.log_evidence))
    row["calls_to_pass"] = calls if row["pass"] else None
    if case.loose:
        row["calls_to_pass_2x"] = calls if row["pass_2x"] else None
    row["warnings"] = _warning_texts(caught)
    if res.library_evals is not None and res.library_evals != res.likelihood_evals:
        print(f"    note: {method} counts {res.library_evals:,} likelihood calls, our counter {res.likelihood_evals:,}",
              flush=True)
    return row


def _warning_texts(caught) -> list[str]:
    out = []
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message)[:300]}"
        if text not in out:
            out.append(text)
    return out[:10]


def _float(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# -- output ---------------------------------------------------------------------------------------


def _machine() -> dict:
    cpu = cpu_name(platform.processor() or platform.machine())
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "peers": available(),
        "commit": git_commit(),
    }


def _fmt(v, fmt="{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return fmt.format(v)


def _pm(sd, fmt: str) -> str:
    """`` ± sd`` for a table cell, or nothing without one."""
    return "" if sd is None or (isinstance(sd, float) and not math.isfinite(sd)) else " ± " + fmt.format(sd)


def _calls(r: dict) -> str:
    if r.get("error"):
        return "–"
    return f"{r['likelihood_evals']:,} / {r['gradient_evals']:,}"


def _to_pass(r: dict, key: str = "calls_to_pass") -> str:
    if r.get("error"):
        return "error"
    return "not reached" if r.get(key) is None else f"{r[key]:,}"


def _markdown(cases: dict, meta: dict) -> str:
    absent = [k for k, v in meta["peers"].items() if not v]
    missing = f" (not installed: {', '.join(absent)})" if absent else ""
    lines = [
        "# Efficiency: quality against likelihood and gradient calls",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, pyro {meta['pyro']}, "
        f"numpy {meta['numpy']}; peers {', '.join(f'{k} {v}' for k, v in meta['peers'].items() if v)}{missing}  ",
        f"Commit: {meta['commit']}; lwflow API: {meta['lwflow_api']}; seed {meta['seed']}"
        f"{'; QUICK (tiny budgets, a smoke test)' if meta['quick'] else ''}",
        "",
        "Calls = likelihood + gradient evaluations. Mixtures pass at W1 ≤ 1.5 × its 20,000-draw noise floor;",
        f"their W1/floor, mode-weight error and bridge mass are means ± sd over {meta.get('score_draws', 1)} "
        "independent 20,000-draw samples (lwflow: of the guide; nested samplers: resamples of their weighted draws; "
        "NUTS: its one set), each against its own exact set, the floor averaged over as many pairs of exact sets;",
        "real-shaped models at mean err ≤ 0.1 ref sd and sd ratios in [0.9, 1.1] against a long NUTS reference "
        "(a long importance-sampling one for a black box without gradients).",
        "",
        "## Calls to reach the pass criterion",
        "",
    ]
    methods = [m for m in METHODS if any(r["method"] == m for c in cases.values() for r in c["rows"])]
    lines += ["| case | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name, c in cases.items():
        by = {r["method"]: r for r in c["rows"]}
        cells = [_to_pass(by[m]) if m in by else "–" for m in methods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, c in cases.items():
        lines += ["", f"## {name} ({c['file']}, d = {c['dim']})", ""]
        if c["kind"] == "mixture":
            lines.append(f"W1 noise floor {c['w1_noise_floor']:.4f}{_pm(c.get('w1_noise_floor_sd'), '{:.4f}')}; "
                         f"exact log Z {c['log_evidence']:.4f}; "
                         f"pass: W1 ≤ {W1_PASS} × floor{f' (also {W1_PASS_LOOSE} ×)' if c['loose'] else ''}.")
            lines.append("")
            head = ["method", "calls (lik / grad)", "seconds", "W1/floor", "mode wt err", "bridge", "abs ΔlogZ",
                    "pass", "calls to pass"]
            if c["loose"]:
                head += [f"pass {W1_PASS_LOOSE}×", f"calls to pass {W1_PASS_LOOSE}×"]
        else:
            ref = c["reference"]
            if ref.get("method") == "importance sampling":
                lines.append(f"Reference (no gradient, so no NUTS): adaptive importance sampling on `{ref['model']}`, "
                             f"{ref['num_draws']:,} multivariate-t draws after {ref['stages']} × "
                             f"{ref['stage_draws']:,} adaptation, ESS {ref['ess']:,.0f}, Pareto k̂ "
                             f"{ref['pareto_k']:.2f}, log Z {ref['log_evidence']:.4f} ± "
                             f"{ref['log_evidence_stderr']:.4f}; coordinates {', '.join(ref['labels'])}.")
            else:
                lines.append(f"Reference: NUTS {ref['num_chains']} × {ref['num_samples']} after "
                             f"{ref['warmup_steps']} warm-up (target accept {ref['target_accept_prob']}) on "
                             f"`{ref['model']}`, {ref.get('divergences', '?')} divergences; coordinates "
                             f"{', '.join(ref['labels'])}.")
            lines.append("")
            head = ["method", "calls (lik / grad)", "seconds", "mean err (sd)", "worst coord", "sd ratio min",
                    "sd ratio max", "log Z", "pass", "calls to pass"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in c["rows"]:
            if r.get("error"):
                lines.append(f"| {r['method']} | error: {r['error'][:120]} |" + " |" * (len(head) - 2))
                continue
            cells = [r["method"], _calls(r), f"{r['seconds']:.1f}"]
            if c["kind"] == "mixture":
                cells += [_fmt(r["w1_over_floor"], "{:.2f}") + _pm(r.get("w1_over_floor_sd"), "{:.2f}"),
                          _fmt(r["mode_weight_error"], "{:.4f}") + _pm(r.get("mode_weight_error_sd"), "{:.4f}"),
                          _fmt(r["bridge_mass"], "{:.4f}"), _fmt(r["log_evidence_error"], "{:.4f}"),
                          _fmt(r["pass"]), _to_pass(r)]
                if c["loose"]:
                    cells += [_fmt(r["pass_2x"]), _to_pass(r, "calls_to_pass_2x")]
            else:
                cells += [_fmt(r["mean_err"], "{:.3f}"), r.get("mean_err_site") or "–",
                          _fmt(r["sd_ratio_min"], "{:.3f}"), _fmt(r["sd_ratio_max"], "{:.3f}"),
                          _fmt(r["log_evidence"], "{:.3f}"), _fmt(r["pass"]), _to_pass(r)]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{r['method']}: {n}" for r in c["rows"] for n in r.get("notes", [])]
        if c["kind"] != "mixture" and c["reference"].get("log_evidence") is not None:
            gaps = [f"{r['method']} {_fmt(r.get('log_evidence_error'), '{:.4f}')}" for r in c["rows"]
                    if not r.get("error")]
            notes.append(f"|log Ẑ − reference log Z| ({c['reference']['log_evidence']:.4f}): {', '.join(gaps)}")
        for r in c["rows"]:
            rounds = r.get("round_summaries") or []
            if r["method"] == "lwflow" and rounds and "calls_per_ess" in rounds[0]:
                per = ", ".join(_fmt(p.get("calls_per_ess"), "{:.3g}").replace("–", "∞") for p in rounds)
                notes.append(f"lwflow: calls per effective draw gained (ESS at β = 1), round by round: {per}; "
                             f"calls per ESS at the stop {_fmt(rounds[-1].get('total_calls_per_ess'), '{:.3g}')}")
        for r in c["rows"]:
            lib = r.get("library_evals")
            if lib is not None and lib != r["likelihood_evals"]:
                why = (" (its rwalk also counts the proposals that fall outside the unit cube, which are never "
                       "evaluated)") if r["method"] == "dynesty" else ""
                notes.append(f"{r['method']}: the library counts {lib:,} likelihood calls, our counter "
                             f"{r['likelihood_evals']:,}{why}; the table has our counter's")
            if r.get("divergences"):
                notes.append(f"{r['method']}: {r['divergences']:,} divergent transitions")
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


MARKERS = {"nautilus": "s", "pocomc": "^", "dynesty": "D", "nuts": "v"}


def _short(v: float, _pos=None) -> str:
    """Tick label: 7k, 1.5M, 0.05."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _ticks(axis, lo: float, hi: float) -> None:
    """Plain tick labels on a log axis; minor ones only when it spans less than about a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(_short))
    axis.set_minor_formatter(FuncFormatter(_short) if hi / lo < 12 else NullFormatter())


def _plot(cases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cases)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 6.5), 3.4 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        c = cases[name]
        mixture = c["kind"] == "mixture"
        for r in c["rows"]:
            if r.get("error"):
                continue
            if r["method"] == "lwflow":
                pts = [(p["calls"], p["quality"]) for p in r["trajectory"] if p["calls"] > 0
                       and math.isfinite(p["quality"])]
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o-", color="C0", label="lwflow (per round)", ms=4)
                if r["calls"] > 0 and math.isfinite(r["quality"]):
                    ax.plot(r["calls"], r["quality"], "*", color="C0", ms=11, label="lwflow (final)")
            elif r["calls"] > 0 and math.isfinite(r["quality"]):
                ax.plot(r["calls"], r["quality"], MARKERS.get(r["method"], "o"), ms=8, label=r["method"],
                        color=f"C{METHODS.index(r['method'])}")
        ax.axhline(W1_PASS if mixture else MEAN_PASS, color="k", ls="--", lw=1, label="pass threshold")
        if mixture and c["loose"]:
            ax.axhline(W1_PASS_LOOSE, color="k", ls=":", lw=1, label=f"{W1_PASS_LOOSE}× floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _ticks(ax.xaxis, *ax.get_xlim())
        _ticks(ax.yaxis, *ax.get_ylim())
        ax.set_title(f"{name} (d = {c['dim']})", fontsize=10)
        ax.set_xlabel("calls (likelihood + gradient)", fontsize=8)
        ax.set_ylabel("W1 / noise floor" if mixture else "max(mean err, |sd ratio − 1|)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 2 * cols + 1),
               fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out: Path, stem: str, cases: dict, meta: dict) -> None:
    data = _finite({"meta": meta, "cases": cases})
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=_json_default, allow_nan=False))
    (out / f"{stem}.md").write_text(_markdown(cases, meta))
    _plot(cases, out / f"{stem}.png")


def _finite(x):
    """``x`` with every NaN or infinite float as ``None`` (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return repr(x)


# -- main -----------------------------------------------------------------------------------------


def _case_name(name: str) -> str:
    stem = name.split(":")[-1]
    if stem not in FILES:
        raise SystemExit(f"unknown case {name!r}; the cases are {', '.join(FILES)}")
    return stem


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--schedule takes KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(FILES), help="case names (default: all 14)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    parser.add_argument("--schedule", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fields of lwflow's Schedule (e.g. num_steps=300)")
    parser.add_argument("--score-draws", type=int, default=SCORE_DRAWS, metavar="K",
                        help="independent 20,000-draw samples a mixture's W1, mode-weight error and bridge mass are "
                             "averaged over, against a noise floor averaged over K pairs of exact sets "
                             "(default %(default)s)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.score_draws < 1:
        raise SystemExit("--score-draws must be at least 1")
    torch.set_num_threads(1)
    overrides = _parse_overrides(args.schedule)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "efficiency_quick" if args.quick else "efficiency"
    versions = available()
    methods = []
    for m in args.methods:
        if m in PEERS and versions.get(m) is None:
            print(f"note: {m} is not installed (pip install -e '.[bench]'); skipping it", flush=True)
        else:
            methods.append(m)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), **_machine(),
            "lwflow_api": _lwflow_api(), "seed": args.seed, "quick": args.quick, "methods": methods,
            "schedule_overrides": overrides, "num_draws": NUM_DRAWS, "score_draws": args.score_draws,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if meta["lwflow_api"] != "schedule" and "lwflow" in methods:
        print("note: pyro_lwflow has no Schedule / callback yet: lwflow runs on the legacy fit API, final point only",
              flush=True)
    cases: dict[str, dict] = {}
    for raw in args.cases:
        name = _case_name(raw)
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        case = Case(name, args.quick, out, args.score_draws)
        entry = {"file": case.file, "dim": case.dim, "kind": case.kind, "loose": case.loose,
                 "labels": case.cube.labels, "vectorized": case.cube.vectorized, "rows": []}
        if case.truth is not None:
            entry.update(w1_noise_floor=case.floor, w1_noise_floor_sd=case.floor_sd, w1_noise_floors=case.floors,
                         log_evidence=case.truth.log_evidence, num_modes=case.truth.num_modes)
        else:
            entry["reference"] = {**case.reference["settings"], "divergences": case.reference.get("divergences"),
                                  "gradient_evals": case.reference.get("gradient_evals"),
                                  "seconds": case.reference.get("seconds"),
                                  "mean": case.reference["mean"].tolist(), "sd": case.reference["sd"].tolist()}
            for key in ("ess", "pareto_k", "log_evidence", "log_evidence_stderr", "likelihood_evals"):
                if key in case.reference:
                    entry["reference"][key] = case.reference[key]
        print(f"  set-up {time.perf_counter() - t0:.1f} s", flush=True)
        cases[name] = entry
        for method in methods:
            print(f"  {method} …", flush=True)
            try:
                row = run_lwflow(case, args.seed, args.quick, overrides) if method == "lwflow" else (
                    run_peer(case, method, args.seed, args.quick))
            except Exception as err:  # noqa: BLE001 - one failing method must not end the whole run
                traceback.print_exc()
                row = {"method": method, "error": f"{type(err).__name__}: {err}"}
            entry["rows"].append(row)
            if not row.get("error"):
                lib = row.get("library_evals")
                print(f"  {method}: calls {row['likelihood_evals']:,} lik / {row['gradient_evals']:,} grad"
                      f"{'' if lib is None else f' (library count {lib:,})'}, {row['seconds']:.1f} s, "
                      f"quality {row['quality']:.3g}, pass {row['pass']}", flush=True)
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            _write(out, stem, cases, meta)
    print(_markdown(cases, meta))


if __name__ == "__main__":
    main()
