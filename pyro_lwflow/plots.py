"""Matplotlib figures: pair plots with truth contours, training curves, weight distributions.

Every function returns a :class:`matplotlib.figure.Figure` and never calls ``show()``. Importing
this module leaves matplotlib's backend alone (``lwflow fit`` selects Agg for itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["pair_plot", "training_curves", "weight_histogram"]


def _as_matrix(samples) -> tuple[np.ndarray, list[str]]:
    """``{site: (N, *shape)}`` or ``(N, d)`` → ``((N, d) array, column labels)``."""
    if isinstance(samples, dict):
        cols, labels = [], []
        for name, value in samples.items():
            flat = torch.as_tensor(value).reshape(len(value), -1)
            cols.append(flat)
            labels += [name] if flat.shape[1] == 1 else [f"{name}[{i}]" for i in range(flat.shape[1])]
        return torch.cat(cols, 1).double().numpy(), labels
    x = torch.as_tensor(samples).double().reshape(len(samples), -1).numpy()
    return x, [f"θ{i + 1}" for i in range(x.shape[1])]


def pair_plot(
    samples,
    truth_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference=None,
    labels: Sequence[str] | None = None,
    max_points: int = 5000,
    title: str | None = None,
    limits: tuple[float, float] | None = None,
) -> Figure:
    """Corner plot: 1-D histograms on the diagonal, scatter below it.

    :param samples: model draws, ``(N, d)`` or ``{site: (N, *shape)}``.
    :param truth_log_prob: exact log density ``(M, d) → (M,)``; for ``d = 2`` its contours are
        drawn over the scatter, for larger ``d`` the 2-D marginals are shown by ``reference``.
    :param reference: exact (or prior) draws drawn in grey underneath and in the histograms.
    :param limits: axis range for every coordinate (default: from the draws).
    """
    x, default_labels = _as_matrix(samples)
    labels = list(labels or default_labels)
    d = x.shape[1]
    ref = _as_matrix(reference)[0] if reference is not None else None
    fig, axes = plt.subplots(d, d, figsize=(2.6 * d + 0.6, 2.6 * d + 0.4), squeeze=False)
    idx = np.random.default_rng(0).permutation(len(x))[:max_points]
    lo = np.full(d, limits[0]) if limits else np.percentile(x, 0.1, 0) - 0.5
    hi = np.full(d, limits[1]) if limits else np.percentile(x, 99.9, 0) + 0.5
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                bins = np.linspace(lo[i], hi[i], 80)
                if ref is not None:
                    ax.hist(ref[:, i], bins=bins, density=True, color="0.7", label="exact")
                ax.hist(x[:, i], bins=bins, density=True, histtype="step", color="C0", lw=1.5, label="model")
                ax.set_yticks([])
            else:
                if ref is not None:
                    ax.scatter(ref[idx % len(ref), j], ref[idx % len(ref), i], s=1, c="0.75", rasterized=True)
                ax.scatter(x[idx, j], x[idx, i], s=1, c="C0", alpha=0.5, rasterized=True)
                if truth_log_prob is not None and d == 2:
                    _contours(ax, truth_log_prob, (lo[j], hi[j]), (lo[i], hi[i]))
                ax.set_xlim(lo[j], hi[j])
                ax.set_ylim(lo[i], hi[i])
            if i == d - 1:
                ax.set_xlabel(labels[j])
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
    if ref is not None:
        axes[0, 0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _contours(ax, log_prob, xlim, ylim, levels: int = 6) -> None:
    gx, gy = np.meshgrid(np.linspace(*xlim, 200), np.linspace(*ylim, 200))
    grid = torch.tensor(np.stack([gx, gy], -1).reshape(-1, 2), dtype=torch.float32)
    with torch.no_grad():
        dens = torch.exp(log_prob(grid)).reshape(gx.shape).double().numpy()
    top = dens.max()
    ax.contour(gx, gy, dens, levels=top * np.geomspace(1e-3, 0.8, levels), colors="k", linewidths=0.6)


def training_curves(losses: Sequence[float], ess: Sequence[float] | None = None, pareto_k=None) -> Figure:
    """Loss per step (and ESS / Pareto k̂ per round when given)."""
    panels = 1 + (ess is not None) + (pareto_k is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), squeeze=False)
    axes = axes[0]
    axes[0].plot(np.asarray(losses), lw=0.8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("−E_post[log q] (nats)")
    col = 1
    if ess is not None:
        axes[col].plot(np.arange(len(ess)), ess, "o-")
        axes[col].set_xlabel("round")
        axes[col].set_ylabel("ESS")
        col += 1
    if pareto_k is not None:
        axes[col].plot(np.arange(len(pareto_k)), pareto_k, "o-")
        axes[col].axhline(0.7, color="r", ls="--", lw=0.8)
        axes[col].set_xlabel("round")
        axes[col].set_ylabel("Pareto k̂")
    fig.tight_layout()
    return fig


def weight_histogram(log_weights: torch.Tensor) -> Figure:
    """Histogram of the normalised log10 importance weights of the draws that carry weight."""
    lw = torch.as_tensor(log_weights).double()
    lw = lw[torch.isfinite(lw)]
    lw10 = ((lw - torch.logsumexp(lw, 0)) / np.log(10)).numpy()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.hist(lw10[lw10 > lw10.max() - 12], bins=80)
    ax.set_xlabel("log10 normalised weight")
    ax.set_ylabel("draws")
    fig.tight_layout()
    return fig
