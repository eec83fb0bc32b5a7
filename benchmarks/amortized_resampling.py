"""Why a resampled corrected posterior scores badly in a high-dimensional C2ST, and what does not.

On gaussian_linear (10-D, sbibm observation 1) one ``amortize`` guide at 10,000 simulations is
checked with 10,000 likelihood calls. The same importance weights give two corrected samples:

- PSIS resampling with replacement (``check.sample``): many repeated draws, which the C2ST classifier
  learns across its cross-validation folds;
- rejection sampling (``check.rejection_sample``: each draw kept with probability ``w / max w``):
  fewer, distinct, exact draws.

Each is scored with sbibm's C2ST against as many reference draws, and so are the amortized draws at
the rejection sample's size. Needs the ``bench`` extra (sbibm). Run::

    python benchmarks/amortized_resampling.py
"""

from __future__ import annotations

import torch
from sbibm import get_task
from sbibm.metrics import c2st

from pyro_lwflow import amortize, models


def main() -> None:
    torch.set_num_threads(1)
    model = models.load("sbi_tasks:gaussian_linear")
    task = get_task("gaussian_linear")
    amortized = amortize(model, num_simulations=10_000, seed=0, progress=False)
    x_o = task.get_observation(1)[0]
    reference = task.get_reference_posterior_samples(1)[:10_000]
    check = amortized.check(x_o, num_draws=10_000)
    print(check.line())
    resampled = check.sample(10_000)["theta"]
    print(f"resampled: {len(torch.unique(resampled, dim=0)):,} distinct of 10,000; "
          f"C2ST {float(c2st(reference, resampled)):.3f}")
    exact = check.rejection_sample()["theta"]
    n = len(exact)
    print(f"rejection-sampled: {n:,} distinct exact draws; C2ST {float(c2st(reference[:n], exact)):.3f}")
    amortized_draws = amortized.condition(x_o).sample(n)["theta"]
    print(f"amortized draws at that size: C2ST {float(c2st(reference[:n], amortized_draws)):.3f}")


if __name__ == "__main__":
    main()
