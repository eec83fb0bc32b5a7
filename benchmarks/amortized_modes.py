"""Amortized multi-modal posteriors: a mixture base against a single-Gaussian base, across data sets.

The paper's Gaussian-mixture targets made amortized (``models/amortized_targets.py``: the data set
``x`` shifts every mode, the exact posterior is known for every ``x``). For each target, one
:func:`pyro_lwflow.amortize` with as many base components as modes and one with a single Gaussian
base train on the same simulations; each is then scored on ``--data-sets`` data sets drawn
uniformly from ``[-3, 3]^d`` (every mode well inside the prior box), against 20,000 exact draws:

- **bridge mass**: the share of the guide's draws where the exact density is below its own
  0.001-quantile (the truth: 0.001), and its ratio to the truth's;
- **W1 / floor**: mean over coordinates of the 1-D Wasserstein-1 distance, over the same distance
  between two exact samples;
- **mode-weight error** and the likelihood check's **efficiency** (ESS per draw) and **k̂**.

Bridge mass, W1 and the mode-weight error are means over ``--repeats`` independent 20,000-draw
samples of the guide (one sample's random split between modes moves W1 by a noise floor), the
floor over as many pairs of exact samples. Writes ``amortized_modes.md`` and ``.json``::

    python benchmarks/amortized_modes.py                          # all three targets, 20,000 simulations, seeds 0 and 1
    python benchmarks/amortized_modes.py --targets three_mode_2d --sims 5000 --data-sets 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import cpu_name  # noqa: E402

from pyro_lwflow import AmortizedLWFlow, amortize, metrics, models  # noqa: E402

TARGETS = ("two_mode_2d", "three_mode_2d", "three_mode_3d")
NUM_EXACT = 20_000


def data_sets(dim: int, num: int, seed: int) -> torch.Tensor:
    """``(num, dim)`` data sets uniform in ``[-3, 3]^dim``."""
    return torch.rand(num, dim, generator=torch.Generator().manual_seed(seed)) * 6 - 3


def score(guide, model, x: torch.Tensor, repeats: int, seed: int) -> dict:
    """The metrics of one data set, means over ``repeats`` guide samples."""
    truth = model.truth(x)
    bridge, w1, floor, mwe = [], [], [], []
    posterior = guide.condition(x)
    for r in range(repeats):
        torch.manual_seed(seed + r)
        exact = truth.sample(NUM_EXACT, seed=seed + 100 + r)
        other = truth.sample(NUM_EXACT, seed=seed + 200 + r)
        q = posterior.sample(NUM_EXACT)["theta"]
        bridge.append(metrics.bridge_mass(truth.log_prob, exact, q))
        w1.append(metrics.w1_avg(exact, q))
        floor.append(metrics.w1_avg(exact, other))
        mwe.append(metrics.mode_weight_error(truth.component_log_probs, truth.weights, q))
    check = guide.check(x, num_draws=10_000, seed=seed)
    return {
        "x": x.tolist(),
        "bridge_mass": statistics.mean(bridge),
        "w1_over_floor": statistics.mean(w1) / statistics.mean(floor),
        "mode_weight_error": statistics.mean(mwe),
        "efficiency": check.efficiency,
        "pareto_k": check.pareto_k,
    }


def run(target: str, sims: int, num_data_sets: int, repeats: int, seed: int, max_epochs: int = 500) -> list[dict]:
    model = models.load(f"amortized_targets:{target}")
    dim = model.dim
    num_modes = model.truth(torch.zeros(dim)).num_modes
    latents, simulated = AmortizedLWFlow(model).simulate(sims, seed=seed)  # the same simulations for both bases
    theta = AmortizedLWFlow(model).layout.unpack(latents)  # constrained values, as simulations= takes them
    rows = []
    for k in (num_modes, 1):
        start = time.perf_counter()
        guide = amortize(model, simulations=(theta, simulated), num_components=k, seed=seed, progress=False,
                         max_epochs=max_epochs)
        train_s = time.perf_counter() - start
        tests = data_sets(dim, num_data_sets, 0)  # the same data sets for every training seed
        per_data_set = [score(guide, model, x, repeats, seed + 7 * j) for j, x in enumerate(tests)]
        row = {
            "target": target, "sims": sims, "components": k, "seed": seed, "train_s": train_s,
            "epochs": len(guide.losses),
            "per_data_set": per_data_set,
        }
        for key in ("bridge_mass", "w1_over_floor", "mode_weight_error", "efficiency", "pareto_k"):
            values = [d[key] for d in per_data_set]
            row[key] = statistics.mean(values)
            row[key + "_max"] = max(values)
        row["bridge_ratio"] = row["bridge_mass"] / 0.001
        row["bridge_ratio_max"] = row["bridge_mass_max"] / 0.001
        rows.append(row)
        print(f"{target:>14} K={k} seed {seed}  bridge {row['bridge_mass']:.4f} ({row['bridge_ratio']:.1f}× truth, "
              f"worst "
              f"{row['bridge_ratio_max']:.1f}×)  W1/floor {row['w1_over_floor']:.2f}"
              f"  mwe {row['mode_weight_error']:.4f}"
              f"  eff {row['efficiency']:.2f}  k̂ {row['pareto_k']:.2f}  train {train_s:.0f} s", flush=True)
    return rows


def markdown(data: dict) -> str:
    lines = [
        "# Amortized multi-modal posteriors: mixture base against single-Gaussian base",
        "",
        "The paper's mixtures with data that move the modes (`models/amortized_targets.py`). Means over "
        f"{data['num_data_sets']} data sets uniform in [-3, 3]^d (worst data set in brackets); each metric is the mean "
        f"over {data['repeats']} independent 20,000-draw samples of the guide; each training seed draws its own "
        "simulations and trains both bases on them. Bridge mass: the truth's is 0.001. "
        "eff.: ESS per draw of the likelihood check (10,000 draws), k̂ its Pareto k.",
        "",
        "| target | components | training seed | bridge mass | × truth | W1 / floor | mode-weight error | eff. | k̂ "
        "| train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['target']} | {r['components']} | {r['seed']} | {r['bridge_mass']:.4f} | {r['bridge_ratio']:.1f} "
            f"({r['bridge_ratio_max']:.1f}) | {r['w1_over_floor']:.2f} ({r['w1_over_floor_max']:.2f}) | "
            f"{r['mode_weight_error']:.4f} ({r['mode_weight_error_max']:.4f}) | {r['efficiency']:.2f} | "
            f"{r['pareto_k']:.2f} ({r['pareto_k_max']:.2f}) | {r['train_s']:.0f} |"
        )
    lines += ["", f"Command: `{data['command']}` — {data['date']}; {data['machine']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--sims", type=int, default=20_000)
    parser.add_argument("--data-sets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1],
                        help="training seeds (each trains both bases on its own simulations)")
    parser.add_argument("--max-epochs", type=int, default=500, help="of each training (a smoke test: a few)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for t in args.targets for seed in args.seeds
            for row in run(t, args.sims, args.data_sets, args.repeats, seed, args.max_epochs)]
    data = {
        "command": "python benchmarks/amortized_modes.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name(platform.machine())}, {os.cpu_count()} cores, 1 torch thread; torch {torch.__version__}",
        "num_data_sets": args.data_sets, "repeats": args.repeats, "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "amortized_modes.json").write_text(json.dumps(data, indent=1))
    (out / "amortized_modes.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
