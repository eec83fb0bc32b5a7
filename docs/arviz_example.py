"""The README's ArviZ example: fit two_mode_2d, export to ArviZ, write docs/arviz_pair.png.

    python docs/arviz_example.py
"""

from pathlib import Path

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pyro_lwflow import Schedule, fit, models  # noqa: E402
from pyro_lwflow.arviz import to_arviz  # noqa: E402

model = models.load("paper_targets:two_mode_2d")
# one round of 50,000 prior draws (the paper's one-shot method)
result = fit(model, num_components=2, schedule=Schedule.one_shot(50_000, num_steps=300), progress=False)
idata = to_arviz(result, num_samples=4000)
print(az.summary(idata))
axes = az.plot_pair(idata, var_names=["theta"], kind="scatter", marginals=True,
                    scatter_kwargs={"alpha": 0.3, "s": 2})
fig = axes.ravel()[0].figure
fig.suptitle("two_mode_2d: az.plot_pair of to_arviz(result)")
fig.savefig(Path(__file__).with_name("arviz_pair.png"), dpi=90, bbox_inches="tight")
plt.close(fig)
