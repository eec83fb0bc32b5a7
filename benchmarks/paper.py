"""Reproduce the study of arXiv:2512.04954 end to end: its tables, figures and base-topology ablation.

    python benchmarks/paper.py [--quick] [--seeds 3] [--out benchmarks/results] [--targets ...]
                               [--marginal-bins 16|none]

Fits every (target, base components, seed) once with :func:`pyro_lwflow.fit` and, on the very same
likelihood-weighted prior draws and budget, the paper's own stack (a ``normflows`` RealNVP trained in
θ space), then writes

* ``paper.json``: every per-seed record, the aggregates, the noise floors, machine and versions;
* ``paper.md``: Table 1 (1-component base on the three 2-D targets), Table 2 (three_mode_2d with
  1/2/3 components), Table 3 (non_gaussian_3d with 1/2/3), the 3-D study (three_mode_3d with 1/2/3),
  each with the paper's published figure beside ours, and a check of the issue's targets;
* ``fig_*.png``: the truth densities and model draws for 1/2/3 base components (look for bridges).

``--quick`` runs tiny budgets (for CI; a couple of minutes); ``--targets`` restricts the targets.
``normflows`` is an optional ``bench`` extra: without it the comparison columns are skipped.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyro
import torch
from machine import cpu_name
from torch.distributions import biject_to, constraints

from pyro_lwflow import AutoLWFlow, Schedule, fit, metrics
from pyro_lwflow.model_files import BUNDLED_MODELS, load_model
from pyro_lwflow.modes import fit_gaussian_mixture

SPEC = json.loads((BUNDLED_MODELS / "paper_targets.json").read_text())
TARGETS = ("single_mode_2d", "two_mode_2d", "three_mode_2d", "non_gaussian_3d", "three_mode_3d")
# (key, title, [(target, num_components)], key of the paper's published numbers)
TABLES = [
    ("table1", "Table 1: Gaussian (1-component) base", [(t, 1) for t in TARGETS[:3]], "table1_gaussian_base"),
    ("table2", "Table 2: three_mode_2d by base components", [("three_mode_2d", k) for k in (1, 2, 3)],
     "table2_three_mode_2d_by_base_modes"),
    ("table3", "Table 3: non_gaussian_3d by base components", [("non_gaussian_3d", k) for k in (1, 2, 3)],
     "table3_non_gaussian_3d_by_base_modes"),
    ("study3d", "3-D study: three_mode_3d by base components", [("three_mode_3d", k) for k in (1, 2, 3)], None),
]
METRICS = ("kl", "w1_avg", "sliced_w", "bridge_mass", "mode_weight_error")
SPEC_W1_FLOOR = {"single_mode_2d": 0.014, "two_mode_2d": 0.032, "three_mode_2d": 0.039, "three_mode_3d": 0.034}
NUM_MODES = {name: len(t["weights"]) if "weights" in t else len(t["factors"][0]["weights"])
             for name, t in SPEC["targets"].items()}
TRUTH_BRIDGE = 0.001  # the truth's own bridge mass, by the metric's definition
NUM_TRANSFORMS, HIDDEN = 6, (64, 64)  # AutoLWFlow's defaults; the normflows stack matches them


@dataclass
class Budget:
    """What every fit gets (ours and normflows alike), the metric sample sizes, and our flow's
    marginal spline (``marginal_bins``; ``None``: the plain RealNVP of the paper)."""

    prior_samples: int = 1_000_000
    steps: int = 1500
    batch: int = 1024
    lr: float = 5e-3
    lr_decay: float = 0.1
    metric_samples: int = 20_000
    floor_repeats: int = 5
    marginal_bins: int | None = inspect.signature(AutoLWFlow).parameters["marginal_bins"].default


QUICK = Budget(prior_samples=50_000, steps=40, batch=256, lr=1e-2, metric_samples=4000, floor_repeats=2)


# -- metrics ----------------------------------------------------------------------------------


def evaluate(truth, exact: torch.Tensor, approx: torch.Tensor, log_q_exact: torch.Tensor) -> dict:
    """The spec's five metrics of model draws ``approx`` against exact draws ``exact`` (both ``(N, d)``)."""
    approx = approx.detach().float()
    return {
        "kl": metrics.kl_divergence(truth.log_prob(exact), log_q_exact.detach()),
        "w1_avg": metrics.w1_avg(exact, approx),
        "sliced_w": metrics.sliced_w(exact, approx),
        "bridge_mass": metrics.bridge_mass(truth.log_prob, exact, approx),
        "mode_weight_error": metrics.mode_weight_error(truth.component_log_probs, truth.weights, approx),
    }


def noise_floors(truth, budget: Budget) -> dict:
    """Each metric between two independent exact sample sets (median of repeats); KL is 0 by definition."""
    def one(metric):
        return metrics.noise_floor(truth.sample, metric, budget.metric_samples, budget.floor_repeats)

    return {
        "kl": 0.0,
        "w1_avg": one(metrics.w1_avg),
        "sliced_w": one(metrics.sliced_w),
        "bridge_mass": one(lambda a, b: metrics.bridge_mass(truth.log_prob, a, b)),
        "mode_weight_error": one(lambda a, b: metrics.mode_weight_error(truth.component_log_probs, truth.weights, b)),
    }


# -- the two implementations --------------------------------------------------------------------


def run_ours(model, k: int, budget: Budget, seed: int):
    """Fit AutoLWFlow with ``k`` components, one shot (the paper's method: prior draws only, no
    adaptive rounds); returns (timing record, guide, the weighted draws it trained on)."""
    pyro.clear_param_store()
    guide = AutoLWFlow(model, num_components=k, num_transforms=NUM_TRANSFORMS, hidden_dims=HIDDEN,
                       marginal_bins=budget.marginal_bins)
    schedule = Schedule.one_shot(budget.prior_samples, num_steps=budget.steps)
    result = fit(model, guide=guide, schedule=schedule, batch_size=budget.batch, lr=budget.lr,
                 lr_decay=budget.lr_decay, seed=seed, progress=False)
    train_s = sum(r.seconds for r in result.rounds)  # placing + training + refit (the prior draws come before)
    record = {"draw_s": result.wall_time - train_s, "train_s": train_s, "wall_s": result.wall_time,
              "likelihood_evals": result.num_likelihood_evals, "ess": result.ess,
              "skipped_steps": result.num_skipped_steps}
    return record, guide, result.draws


def theta_draws(draws) -> torch.Tensor:
    """Map the guide's unconstrained latents back to θ in the Uniform(low, high) prior box."""
    box = constraints.interval(SPEC["prior"]["low"], SPEC["prior"]["high"])
    return biject_to(box)(draws.latents)


def normflows_realnvp(nf, dim: int, init: torch.Tensor, k: int, seed: int):
    """The paper's stack: normflows RealNVP (``NUM_TRANSFORMS`` affine couplings, ``HIDDEN`` MLPs
    starting at the identity, swap permutations) on a DiagGaussian (k=1) or GaussianMixture base.

    Its base starts where ours does: EM (k-means++ seeding) on ``init``, draws resampled by weight.
    """
    torch.manual_seed(seed)
    gmm = fit_gaussian_mixture(init, k, generator=torch.Generator().manual_seed(seed))
    scales = torch.diagonal(gmm.covariances, dim1=-2, dim2=-1).sqrt()
    if k == 1:
        base = nf.distributions.DiagGaussian(dim)
        base.loc.data.copy_(gmm.means.reshape(1, dim))
        base.log_scale.data.copy_(scales.log().reshape(1, dim))
    else:
        base = nf.distributions.GaussianMixture(k, dim, loc=gmm.means.numpy(), scale=scales.numpy(),
                                                weights=gmm.weights.numpy(), trainable=True)
    split = (dim + 1) // 2  # normflows' channel split puts the larger half first
    flows = []
    for _ in range(NUM_TRANSFORMS):
        net = nf.nets.MLP([split, *HIDDEN, 2 * (dim - split)], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="swap")]
    return nf.NormalizingFlow(base, flows).float()


def run_normflows(nf, draws, k: int, budget: Budget, seed: int):
    """Train the normflows stack with the likelihood-weighted loss on the same draws, in θ space.

    Minibatches are resampled in proportion to the weights; the optimiser, schedule, gradient
    clipping and budget are those of :func:`pyro_lwflow.fit`.
    """
    start = time.perf_counter()
    theta = theta_draws(draws)
    cdf = torch.cumsum(draws.weights, 0)
    gen = torch.Generator().manual_seed(seed)

    def batch(n):
        u = torch.rand(n, dtype=cdf.dtype, generator=gen) * cdf[-1]
        return theta[torch.searchsorted(cdf, u).clamp_(max=len(theta) - 1)]

    flow = normflows_realnvp(nf, theta.shape[1], batch(20_000), k, seed)
    params = [p for p in flow.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=budget.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optim, budget.lr_decay ** (1.0 / max(budget.steps, 1)))
    skipped = 0
    for _ in range(budget.steps):
        optim.zero_grad(set_to_none=True)
        loss = flow.forward_kld(batch(budget.batch))
        if not torch.isfinite(loss):
            skipped += 1
            continue
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 10.0)
        if not torch.isfinite(grad_norm):
            skipped += 1
            continue
        optim.step()
        schedule.step()
    return {"train_s": time.perf_counter() - start, "skipped_steps": skipped}, flow


# -- the study -------------------------------------------------------------------------------------


def runs_needed(targets) -> list[tuple[str, int]]:
    """Each (target, k) once, in table order, however many tables it appears in."""
    out = []
    for _, _, cells, _ in TABLES:
        out += [cell for cell in cells if cell[0] in targets and cell not in out]
    return out


def run_one(target: str, k: int, seed: int, budget: Budget, with_normflows: bool = True) -> list[dict]:
    """Fit (target, k, seed) with ours and then, on the same draws, normflows; returns their records
    (metrics, timings and, for seed 0, the model draws under ``"draws"`` for the figures)."""
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and the machine is shared
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports ~1 s of modules: not timed
    nf = _import_normflows()[0] if with_normflows else None
    model = load_model(BUNDLED_MODELS / f"paper_targets.py:{target}")
    truth = model.truth
    exact = truth.sample(budget.metric_samples, seed=10_000 + seed)
    cell = {"target": target, "k": k, "seed": seed}
    timing, guide, draws = run_ours(model, k, budget, seed)
    with torch.no_grad():
        approx = guide.sample_posterior(budget.metric_samples)["theta"]
        row = evaluate(truth, exact, approx, guide.log_density({"theta": exact}))
    records = [{"impl": "pyro_lwflow", **cell, **row, **timing, "draws": approx if seed == 0 else None}]
    if nf is not None:
        timing_nf, flow = run_normflows(nf, draws, k, budget, seed)
        with torch.no_grad():
            approx, _ = flow.sample(budget.metric_samples)
            row = evaluate(truth, exact, approx, flow.log_prob(exact))
        records.append({"impl": "normflows", **cell, **row, **timing, **timing_nf,
                        "wall_s": timing["draw_s"] + timing_nf["train_s"], "draws": approx if seed == 0 else None})
    return records


def run_study(targets, seeds: int, budget: Budget, with_normflows: bool, workers: int = 1, log=print):
    """Fit every needed (target, k, seed), ``workers`` at a time, each in one process (so ours and
    normflows share a process and their timings compare); returns (records, noise floors)."""
    jobs = [(t, k, s) for t, k in runs_needed(targets) for s in range(seeds)]
    jobs.sort(key=lambda j: -SPEC["targets"][j[0]]["dim"])  # the slow 3-D fits first
    records = []
    if workers <= 1:
        results = (run_one(*job, budget, with_normflows) for job in jobs)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(run_one, *job, budget, with_normflows) for job in jobs]
        results = (f.result() for f in as_completed(futures))
    for rows in results:
        for r in rows:
            log(_fmt(r))
        records += rows
    if workers > 1:
        pool.shutdown()
    records.sort(key=lambda r: (TARGETS.index(r["target"]), r["k"], r["seed"], r["impl"] != "pyro_lwflow"))
    floors = {t: noise_floors(load_model(BUNDLED_MODELS / f"paper_targets.py:{t}").truth, budget)
              for t in TARGETS if t in targets}
    return records, floors


def _fmt(r: dict) -> str:
    return (f"{r['impl']:>11} {r['target']:>15} k={r['k']} seed={r['seed']}: KL {r['kl']:.4f} "
            f"w1 {r['w1_avg']:.4f} sw {r['sliced_w']:.4f} bridge {r['bridge_mass']:.4f} "
            f"mwe {r['mode_weight_error']:.4f} train {r['train_s']:.1f}s")


def aggregate(records: list[dict]) -> dict:
    """``{impl: {target: {k: {metric: {"mean", "std", "min", "max", "n"}}}}}`` over seeds."""
    out: dict = {}
    for r in records:
        out.setdefault(r["impl"], {}).setdefault(r["target"], {}).setdefault(str(r["k"]), []).append(r)
    for impl in out.values():
        for target in impl.values():
            for k, rows in target.items():
                target[k] = {
                    m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                        "median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                        "n": len(v)}
                    for m in (*METRICS, "wall_s", "train_s", "draw_s", "likelihood_evals", "ess")
                    for v in [[row[m] for row in rows]]
                }
    return out


def paper_value(paper_key: str | None, target: str, k: int, metric: str) -> float | None:
    """The paper's published figure for this cell, if it printed one."""
    if paper_key is None:
        return None
    table = SPEC["paper_reported"][paper_key]
    cell = table.get(target) if paper_key == "table1_gaussian_base" else table.get(str(k))
    return (cell or {}).get(metric)


# -- checks against the targets ------------------------------------------------------------


def target_checks(agg: dict, floors: dict) -> list[dict]:
    """The issue's quantitative targets at matched components (k = number of modes), on seed means."""
    ours = agg.get("pyro_lwflow", {})
    checks = []

    def add(name, value, bound, ok):
        checks.append({"check": name, "value": value, "bound": bound, "met": bool(ok)})

    for target, by_k in ours.items():
        k = str(NUM_MODES[target])
        if k not in by_k:
            continue
        cell = by_k[k]
        floor = SPEC_W1_FLOOR.get(target, floors[target]["w1_avg"])
        add(f"{target} k={k}: w1_avg ≤ 1.5 × noise floor", cell["w1_avg"]["mean"], 1.5 * floor,
            cell["w1_avg"]["mean"] <= 1.5 * floor)
        if SPEC["targets"][target]["dim"] == 2:
            add(f"{target} k={k}: KL ≤ 0.01", cell["kl"]["mean"], 0.01, cell["kl"]["mean"] <= 0.01)
        add(f"{target} k={k}: bridge_mass ≤ 2 × 0.1 %", cell["bridge_mass"]["mean"], 2 * TRUTH_BRIDGE,
            cell["bridge_mass"]["mean"] <= 2 * TRUTH_BRIDGE)
        theirs = agg.get("normflows", {}).get(target, {}).get(k)
        if theirs is not None:
            for metric in ("kl", "w1_avg", "bridge_mass"):
                add(f"{target} k={k}: {metric} ≤ normflows at the same budget", cell[metric]["mean"],
                    theirs[metric]["mean"], cell[metric]["mean"] <= theirs[metric]["mean"])
    for target, by_k in ours.items():  # every cell the paper published, whatever its k
        for key, _, cells, paper_key in TABLES:
            for t, kk in cells:
                if t != target or str(kk) not in by_k:
                    continue
                for metric in ("kl", "w1_avg", "sliced_w"):
                    published = paper_value(paper_key, t, kk, metric)
                    if published is not None:
                        ours_v = by_k[str(kk)][metric]["mean"]
                        add(f"{t} k={kk}: {metric} better than the paper ({key})", ours_v, published,
                            ours_v < published)
    for target, by_k in ours.items():  # the paper's qualitative findings
        modes = NUM_MODES[target]
        if modes < 2 or "1" not in by_k or str(modes) not in by_k:
            continue
        one, matched = by_k["1"]["bridge_mass"]["mean"], by_k[str(modes)]["bridge_mass"]["mean"]
        add(f"{target}: a 1-component base bridges (bridge_mass k=1 > 3 × k={modes})", one, 3 * matched,
            one > 3 * matched)
        for metric in ("kl", "w1_avg"):
            best = min(by_k, key=lambda k, metric=metric: by_k[k][metric]["mean"])
            add(f"{target}: {metric} is best with k = modes = {modes} (value: the best k)", float(best),
                float(modes), best == str(modes))
    # dedupe (a cell can appear in two tables with the same published numbers)
    seen, unique = set(), []
    for c in checks:
        if c["check"] not in seen:
            seen.add(c["check"])
            unique.append(c)
    return unique


# -- reporting -----------------------------------------------------------------------------------


def _pm(stat: dict, digits: int = 4) -> str:
    """``mean ± std``; where one seed is an outlier (max > 10 × median) the median is added."""
    text = f"{stat['mean']:.{digits}g} ± {stat['std']:.{digits}g}" if stat["mean"] > 1e3 else \
        f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat["max"] > 10 * stat["median"] > 0:
        text += f" (median {stat['median']:.{digits}f})"
    return text


def markdown(agg: dict, floors: dict, checks: list[dict], meta: dict) -> str:
    """The tables of ``paper.md``."""
    lines = [
        "# Reproducing arXiv:2512.04954 (likelihood-weighted normalizing flows)",
        "",
        f"Produced by `{meta['command']}` in {meta['total_wall_s'] / 60:.1f} min on {meta['machine']}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        "",
        f"Budget per fit (ours and normflows alike): {meta['budget']['prior_samples']:,} prior draws, "
        f"{meta['budget']['steps']} Adam steps of batch {meta['budget']['batch']}, lr {meta['budget']['lr']} "
        f"decaying ×{meta['budget']['lr_decay']} over the run, gradient-norm clip 10; flows of "
        f"{NUM_TRANSFORMS} affine couplings with {HIDDEN} hidden units"
        + (f" (ours then an elementwise spline of {bins} bins)" if (bins := meta["budget"].get("marginal_bins")) else
           " (ours without the marginal spline: the paper's plain RealNVP)") + ". Metrics on "
        f"{meta['budget']['metric_samples']:,} exact and {meta['budget']['metric_samples']:,} model draws; "
        f"{meta['seeds']} seeds, shown as mean ± standard deviation over seeds (per-seed values in "
        "`paper.json`).",
        "",
        "`floor` is each metric between two independent exact sample sets (`metrics.noise_floor`, median of "
        f"{meta['budget']['floor_repeats']}); `spec floor` is the spec's measured w1_avg floor. `paper` is the "
        "published figure (blank where the paper printed none). `nf` rows are the paper's own stack "
        "(normflows RealNVP in θ space, base initialised by the same EM as ours) on the same weighted draws; "
        "`time` is the wall time of drawing (shared) plus training, `evals` the likelihood evaluations.",
        "",
    ]
    for _, title, cells, paper_key in TABLES:
        cells = [c for c in cells if c[0] in agg.get("pyro_lwflow", {})]
        if not cells:
            continue
        lines += [f"## {title}", "",
                  "| target | k | impl | KL | paper KL | w1_avg | paper w1 | floor w1 | spec floor w1 | sliced_w | "
                  "paper sliced | floor sliced | bridge_mass | floor bridge | mode_weight_error | floor mwe | "
                  "time (s) | evals |",
                  "|" + "---|" * 18]
        for target, k in cells:
            fl = floors[target]
            for impl, short in (("pyro_lwflow", "ours"), ("normflows", "nf")):
                cell = agg.get(impl, {}).get(target, {}).get(str(k))
                if cell is None:
                    continue

                def pv(metric, cell_key=(paper_key if impl == "pyro_lwflow" else None, target, k)):
                    v = paper_value(*cell_key, metric)
                    return "" if v is None else f"{v:.4f}"

                spec_floor = SPEC_W1_FLOOR.get(target)
                lines.append(
                    f"| {target} | {k} | {short} | {_pm(cell['kl'])} | {pv('kl')} | {_pm(cell['w1_avg'])} | "
                    f"{pv('w1_avg')} | {fl['w1_avg']:.4f} | {'' if spec_floor is None else spec_floor} | "
                    f"{_pm(cell['sliced_w'])} | {pv('sliced_w')} | {fl['sliced_w']:.4f} | "
                    f"{_pm(cell['bridge_mass'])} | {fl['bridge_mass']:.4f} | {_pm(cell['mode_weight_error'])} | "
                    f"{fl['mode_weight_error']:.4f} | {_pm(cell['wall_s'], 1)} | "
                    f"{int(cell['likelihood_evals']['mean']):,} |"
                )
        lines.append("")
    if "normflows" in agg:
        lines += ["## pyro_lwflow vs normflows at the same budget", "",
                  "Ratios of seed means (ours / normflows): below 1 means ours is lower (better, or faster).", "",
                  "| target | k | KL ours | KL nf | w1 ours | w1 nf | bridge ours | bridge nf | train s ours | "
                  "train s nf | train time ratio |", "|" + "---|" * 11]
        for target, k in runs_needed(agg["pyro_lwflow"].keys()):
            a, b = agg["pyro_lwflow"][target][str(k)], agg["normflows"][target][str(k)]
            lines.append(
                f"| {target} | {k} | {a['kl']['mean']:.4f} | {b['kl']['mean']:.4f} | {a['w1_avg']['mean']:.4f} | "
                f"{b['w1_avg']['mean']:.4f} | {a['bridge_mass']['mean']:.4f} | {b['bridge_mass']['mean']:.4f} | "
                f"{a['train_s']['mean']:.1f} | {b['train_s']['mean']:.1f} | "
                f"{a['train_s']['mean'] / b['train_s']['mean']:.2f} |"
            )
        lines.append("")
    else:
        lines += [f"normflows comparison skipped: {meta['normflows']}", ""]
    lines += ["## The issue's targets (seed means, matched components)", "", "| check | ours | bound | met |",
              "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']:.4f} | {c['bound']:.4f} | {'yes' if c['met'] else '**no**'} |"
              for c in checks]
    lines += ["", "## Figures", "",
              "Seed-0 model draws (blue) over the true density's contours (2-D) or over exact draws (grey, 3-D).", ""]
    shown = [n for n in meta["figures"] if "truth" in n or "by_components" in n or n.count("_k") == 0]
    lines += [f"![{name}]({name})" for name in shown]
    lines += ["", "Each panel on its own: " + ", ".join(f"[{n}]({n})" for n in meta["figures"] if n not in shown)]
    return "\n".join(lines) + "\n"


def figures(figure_draws: dict, targets, out: Path) -> list[str]:
    """Truth densities and seed-0 model draws for 1/2/3 base components; returns the file names."""
    from pyro_lwflow.plots import pair_plot  # noqa: I001 (first: it selects a non-interactive backend)

    import matplotlib.pyplot as plt

    names = []
    limits = (-11.5, 11.5)

    def save(fig, name):
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)

    # Figure 2 analogue: the true posteriors
    truths = [t for t in TARGETS if t in targets]
    two_d = [t for t in truths if SPEC["targets"][t]["dim"] == 2]
    if two_d:
        fig, axes = plt.subplots(1, len(two_d), figsize=(4.2 * len(two_d), 4), squeeze=False)
        for ax, target in zip(axes[0], two_d, strict=True):
            truth = load_model(BUNDLED_MODELS / f"paper_targets.py:{target}").truth
            g = np.linspace(*limits, 300)
            gx, gy = np.meshgrid(g, g)
            grid = torch.tensor(np.stack([gx, gy], -1).reshape(-1, 2), dtype=torch.float32)
            ax.imshow(truth.log_prob(grid).exp().reshape(gx.shape).numpy(), origin="lower", extent=(*limits, *limits),
                      cmap="viridis")
            ax.set_title(f"{target}: true posterior")
        fig.tight_layout()
        save(fig, "fig_truth_2d.png")
    for target in truths:
        truth = load_model(BUNDLED_MODELS / f"paper_targets.py:{target}").truth
        dim = SPEC["targets"][target]["dim"]
        exact = truth.sample(5000, seed=1)
        if dim == 3:
            save(pair_plot(exact, limits=limits, title=f"{target}: exact draws"), f"fig_truth_{target}.png")
        for impl in ("pyro_lwflow", "normflows"):
            for k in (1, 2, 3):
                draws = figure_draws.get((impl, target, k))
                if draws is None:
                    continue
                title = f"{target}, {k}-component base ({'ours' if impl == 'pyro_lwflow' else 'normflows'})"
                contours = truth.log_prob if dim == 2 else None  # 3-D: the exact draws show the truth
                fig = pair_plot(draws, contours, reference=exact, limits=limits, title=title)
                save(fig, f"fig_{target}_k{k}_{'ours' if impl == 'pyro_lwflow' else 'normflows'}.png")
    return names + compose_by_components(out, names)


def compose_by_components(out: Path, names: list[str]) -> list[str]:
    """Put the 1/2/3-component figures of each (target, implementation) side by side, so the bridges
    of the smaller bases stand beside the matched one; returns the new file names."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    composed = []
    for target in TARGETS:
        for impl in ("ours", "normflows"):
            parts = [f"fig_{target}_k{k}_{impl}.png" for k in (1, 2, 3) if f"fig_{target}_k{k}_{impl}.png" in names]
            if len(parts) < 2:
                continue
            fig, axes = plt.subplots(1, len(parts), figsize=(4.5 * len(parts), 4.6))
            for ax, part in zip(axes, parts, strict=True):
                ax.imshow(mpimg.imread(out / part))
                ax.axis("off")
            fig.tight_layout()
            name = f"fig_{target}_by_components_{impl}.png"
            fig.savefig(out / name, dpi=130)
            plt.close(fig)
            composed.append(name)
    return composed


def machine() -> str:
    cpu = cpu_name(platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores (nproc), {cpu}"


def versions(nf) -> dict:
    import ot

    out = {"python": platform.python_version(), "torch": torch.__version__, "pyro-ppl": pyro.__version__,
           "numpy": np.__version__, "pot": ot.__version__}
    if nf is not None:
        out["normflows"] = nf.__version__
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for CI")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workers", type=int, default=2, help="fits run in parallel, one process each")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild paper.md and the composed figures from an existing paper.json, without fitting")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--marginal-bins", type=lambda v: None if v == "none" else int(v), default=Budget.marginal_bins,
                        help="bins of our flow's marginal spline; 'none' for the paper's plain RealNVP")
    args = parser.parse_args(argv)
    budget = replace(QUICK if args.quick else Budget(), marginal_bins=args.marginal_bins)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return rebuild_report(out)
    nf, nf_status = _import_normflows()
    if nf is None:
        print(nf_status, file=sys.stderr)
    torch.set_num_threads(1)
    start = time.perf_counter()
    records, floors = run_study(args.targets, args.seeds, budget, nf is not None, args.workers)
    figure_draws = {(r["impl"], r["target"], r["k"]): r.pop("draws") for r in records if r["draws"] is not None}
    for r in records:
        r.pop("draws", None)
    agg = aggregate(records)
    checks = target_checks(agg, floors)
    fig_names = figures(figure_draws, args.targets, out)
    meta = {
        "command": shlex.join(["python", "benchmarks/paper.py", *(sys.argv[1:] if argv is None else argv)]),
        "total_wall_s": time.perf_counter() - start,
        "machine": machine(),
        "workers": args.workers,
        "torch_threads_per_worker": 1,
        "versions": versions(nf),
        "normflows": nf_status,
        "budget": asdict(budget),
        "seeds": args.seeds,
        "targets": args.targets,
        "figures": fig_names,
        "spec_noise_floor_w1_avg": SPEC_W1_FLOOR,
        "paper_reported": SPEC["paper_reported"],
    }
    report = {"meta": meta, "noise_floors": floors, "aggregate": agg, "checks": checks, "records": records}
    (out / "paper.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / "paper.md").write_text(markdown(agg, floors, checks, meta))
    print(f"wrote {out}/paper.md, paper.json and {len(fig_names)} figures in {meta['total_wall_s']:.0f} s")
    return report


def rebuild_report(out: Path) -> dict:
    """Recompute the aggregates, checks, composed figures and ``paper.md`` from ``out/paper.json``."""
    report = json.loads((out / "paper.json").read_text())
    meta = report["meta"]
    singles = [n for n in meta["figures"] if "by_components" not in n]
    meta["figures"] = singles + compose_by_components(out, singles)
    report["aggregate"] = agg = aggregate(report["records"])
    report["checks"] = checks = target_checks(agg, report["noise_floors"])
    (out / "paper.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / "paper.md").write_text(markdown(agg, report["noise_floors"], checks, meta))
    print(f"rebuilt {out}/paper.md from paper.json")
    return report


def _import_normflows():
    """``(normflows module or None, a line saying which)``: normflows is an optional extra."""
    try:
        import normflows as nf
    except ImportError:
        return None, "normflows is not installed (pip install -e '.[bench]'); its columns are skipped"
    return nf, f"normflows {nf.__version__}"


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj)}")


if __name__ == "__main__":
    main()
