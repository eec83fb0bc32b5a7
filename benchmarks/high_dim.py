"""Beyond the paper: automatic mode discovery and adaptive rounds in 5 to 20 dimensions.

    python benchmarks/high_dim.py [--quick] [--targets gmm_5d gmm_10d ...] [--no-dynesty | --dynesty-targets ...]
                                  [--seed 0] [--seeds 1] [--out benchmarks/results]

For each target (``models/high_dim.py``: separated Gaussian mixtures in d = 5, 10, 20 and a
5-D banana; ``models/paper_targets.py``: the paper's five) it runs, at a budget of at most
``--max-evals`` model evaluations (likelihood plus gradient):

* ``one-shot``: the paper's method — all the budget as prior draws, one round, true K
  (``Schedule.one_shot(max_evals)``);
* ``adaptive``: ``fit(model)``'s defaults (gradient-informed start where the model allows it, K
  chosen automatically, tempered rounds) with ``Schedule(budget=max_evals, num_steps=steps)``;
* ``adaptive, true K``: the same with the true mode count given;
* ``dynesty``: dynesty's static nested sampler (optional ``bench`` extra) at the same budget,
  its posterior draws resampled to equal weights.

and reports the chosen K, mode_weight_error, w1_avg (with the 20,000-sample noise floor),
bridge_mass, |log Ẑ − log Z|, model evaluations (``evals``: likelihood plus gradient; the rows
also keep ``likelihood_evals`` and ``gradient_evals`` apart) and wall time. Writes
``high_dim.md`` and ``high_dim.json`` (with ``--seeds`` > 1, also the mean over seeds per target and
method).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro_lwflow import Schedule, fit, metrics
from pyro_lwflow.model_files import BUNDLED_MODELS, load_model

HIGH_DIM = ("gmm_5d", "gmm_10d", "gmm_20d", "banana_5d")
PAPER = ("single_mode_2d", "two_mode_2d", "three_mode_2d", "three_mode_3d", "non_gaussian_3d")
NUM_SAMPLES = 20_000


def _load(name: str):
    path = "high_dim.py" if name in HIGH_DIM else "paper_targets.py"
    return load_model(f"{BUNDLED_MODELS / path}:{name}")


def _score(truth, approx: torch.Tensor, log_z: float, likelihood_evals: int, gradient_evals: int, seconds: float,
           k: int | None) -> dict:
    exact = truth.sample(NUM_SAMPLES, seed=1)
    return {
        "num_components": k,
        "mode_weight_error": metrics.mode_weight_error(truth.component_log_probs, truth.weights, approx),
        "w1_avg": metrics.w1_avg(exact, approx),
        "bridge_mass": metrics.bridge_mass(truth.log_prob, exact, approx),
        "log_evidence_error": abs(log_z - truth.log_evidence),
        "evals": likelihood_evals + gradient_evals,
        "likelihood_evals": likelihood_evals,
        "gradient_evals": gradient_evals,
        "seconds": seconds,
    }


def run_lwflow(model, label: str, schedule: Schedule, seed: int, **kwargs) -> dict:
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # low-ESS / tempering warnings are reported in the table
        result = fit(model, schedule=schedule, seed=seed, progress=False, **kwargs)
    approx = result.sample(NUM_SAMPLES)["theta"]
    row = _score(model.truth, approx, result.log_evidence, result.num_likelihood_evals, result.num_gradient_evals,
                 result.wall_time, result.num_components)
    row.update(method=label, rounds=len(result.rounds), final_beta=result.rounds[-1].beta,
               pareto_k=result.pareto_k, log_evidence_stderr=result.log_evidence_stderr)
    return row


def run_dynesty(model, max_evals: int, seed: int) -> dict | None:
    try:
        import dynesty
    except ImportError:
        return None
    truth = model.truth
    low, high, dim = truth.low, truth.high, truth.dim

    def log_lik(x):
        return float(truth.likelihood(torch.as_tensor(x, dtype=torch.float32)))

    start = time.perf_counter()
    sampler = dynesty.NestedSampler(log_lik, lambda u: low + (high - low) * u, dim, nlive=500,
                                    rstate=np.random.default_rng(seed))
    sampler.run_nested(maxcall=max_evals, print_progress=False)
    res = sampler.results
    weights = np.exp(res.logwt - res.logz[-1])
    draws = dynesty.utils.resample_equal(res.samples, weights / weights.sum(), rstate=np.random.default_rng(seed))
    idx = np.random.default_rng(seed).choice(len(draws), NUM_SAMPLES)
    approx = torch.as_tensor(draws[idx], dtype=torch.float32)
    # dynesty integrates L over the unit cube with the uniform prior's density folded in, so its Z
    # is the model's evidence as it stands
    log_z = float(res.logz[-1])
    row = _score(truth, approx, log_z, int(np.sum(res.ncall)), 0, time.perf_counter() - start, None)
    row.update(method="dynesty", log_evidence_stderr=float(res.logzerr[-1]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (for CI)")
    parser.add_argument("--targets", nargs="*", default=list(HIGH_DIM + PAPER))
    parser.add_argument("--max-evals", type=int, default=1_000_000,
                        help="model evaluations (likelihood plus gradient) per fit")
    parser.add_argument("--steps", type=int, default=Schedule().num_steps,
                        help="gradient steps of the adaptive fits' first training (default: Schedule's); "
                             "the one-shot fit trains twice as long")
    parser.add_argument("--no-dynesty", action="store_true")
    parser.add_argument("--dynesty-targets", nargs="*", help="run dynesty on these targets only (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="run seeds --seed … --seed + seeds − 1 and summarise them")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    max_evals, steps = (50_000, 100) if args.quick else (args.max_evals, args.steps)
    rows = []
    for name in args.targets:
        model = _load(name)
        k = model.truth.num_modes
        noise = metrics.noise_floor(model.truth.sample, metrics.w1_avg, NUM_SAMPLES, repeats=3 if args.quick else 5)
        settings = [
            ("one-shot (paper)", Schedule.one_shot(max_evals, num_steps=2 * steps), {"num_components": k}),
            ("adaptive, auto K", Schedule(budget=max_evals, num_steps=steps), {}),
            ("adaptive, true K", Schedule(budget=max_evals, num_steps=steps), {"num_components": k}),
        ]
        for seed in range(args.seed, args.seed + args.seeds):
            found = [run_lwflow(model, label, schedule, seed, **kw) for label, schedule, kw in settings]
            if not args.no_dynesty and (args.dynesty_targets is None or name in args.dynesty_targets):
                found.append(run_dynesty(model, max_evals, seed))
            for row in filter(None, found):
                row.update(target=name, dim=model.truth.dim, true_modes=k, w1_noise_floor=noise, seed=seed)
                rows.append(row)
                print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}),
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "seeds": list(range(args.seed, args.seed + args.seeds)),
    }
    (out / ("high_dim_quick.json" if args.quick else "high_dim.json")).write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    (out / ("high_dim_quick.md" if args.quick else "high_dim.md")).write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))


def _markdown(rows: list[dict], meta: dict) -> str:
    head = ("| target | d | modes | method | seed | K found | mode wt err | w1_avg | w1 floor | w1/floor | bridge | "
            "abs logZ err | logZ stderr | k̂ | evals | seconds |")
    lines = [
        "# Beyond the paper: auto K, adaptive rounds, evidence (vs. dynesty)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, pyro {meta['pyro']}",
        "",
        "`evals`: model evaluations, likelihood plus gradient (the gradient start's L-BFGS points; dynesty: its "
        "likelihood calls).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        def f(key, fmt="{:.4f}", r=r):
            v = r.get(key)
            return "–" if v is None else fmt.format(v)

        lines.append(
            f"| {r['target']} | {r['dim']} | {r['true_modes']} | {r['method']} | {r.get('seed', 0)} | "
            f"{f('num_components', '{}')} | "
            f"{f('mode_weight_error')} | {f('w1_avg')} | {f('w1_noise_floor')} | "
            f"{r['w1_avg'] / r['w1_noise_floor']:.2f} | {f('bridge_mass')} | {f('log_evidence_error')} | "
            f"{f('log_evidence_stderr')} | {f('pareto_k', '{:.2f}')} | {r['evals']:,} | "
            f"{r['seconds']:.1f} |"
        )
    if len(meta.get("seeds", [0])) > 1:
        lines += ["", *_summary(rows)]
    return "\n".join(lines) + "\n"


def _summary(rows: list[dict]) -> list[str]:
    """Per target and method: the mean over seeds, and how often K was the true mode count."""
    lines = [
        "## Mean over seeds",
        "",
        "| target | method | seeds with K = true | mode wt err | w1/floor | abs logZ err | evals | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    for (target, method), rs in groups.items():
        def mean(key, rs=rs):
            return float(np.mean([r[key] for r in rs]))

        hits = "–" if rs[0].get("num_components") is None else (
            f"{sum(r['num_components'] == r['true_modes'] for r in rs)} / {len(rs)}")
        lines.append(
            f"| {target} | {method} | {hits} | {mean('mode_weight_error'):.4f} | "
            f"{np.mean([r['w1_avg'] / r['w1_noise_floor'] for r in rs]):.2f} | {mean('log_evidence_error'):.4f} | "
            f"{mean('evals'):,.0f} | {mean('seconds'):.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
