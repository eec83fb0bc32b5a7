"""How :func:`~pyro_lwflow.fit.fit` spends its model evaluations (:class:`Schedule`), and what each
round did (:class:`RoundSummary`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["RoundSummary", "Schedule"]

STARTS = ("auto", "gradient", "prior")


@dataclass(frozen=True)
class Schedule:
    """The plan of a fit: where it starts, how large each round is, when it stops.

    A fit starts either from the prior or, when the model's log joint is differentiable, from the
    optima that L-BFGS finds from many prior draws (``starts``). Round 0 evaluates
    ``initial_draws`` from that start; each later round draws from the trained guide (mixed with
    the prior, share ``defensive``), as many as the last round's efficiency says it takes to add
    ``round_ess`` effective draws (between ``initial_draws / 4`` and ``max_draws``), or to reach
    ``target_ess`` once at β = 1; a round is drawn in parts and stops once it has what it was planned
    for (at β = 1: the stopping rule holds), or, tempered, once its draws say its proposal missed the
    tempered posterior (then the guide retrains on what they found). While the pooled weights are
    too uneven, the likelihood is tempered (``L^β``, β the largest keeping ``round_ess`` effective
    draws in the pool and a share ``step_ess`` of the last round's own), and a tempered round draws
    from the flow blended with Student-t mixtures fitted to the draws at β and ahead of it
    (``explore``), which follow a posterior that narrows by orders of magnitude; the number of
    rounds follows from that, up to ``max_rounds``. The fit stops when the pooled weights at β = 1
    have ``target_ess`` effective draws, Pareto k̂ < 0.7 and (a guide with several components) every
    component's weight known to ``mode_weight_stderr``, or when ``budget`` is spent.

    :param budget: most model evaluations to spend: likelihood evaluations plus gradient
        evaluations (each point L-BFGS evaluates counts once).
    :param target_ess: effective draws at β = 1 to stop at (20,000 keeps the flow's training noise
        below a 20,000-draw sample's own).
    :param mode_weight_stderr: the largest standard error of a mixture weight (a mode's mass, the
        components being on the modes) the stop accepts, from the pooled importance weights; their
        variance falls as 1 / ESS, so a posterior with several comparable modes runs on past
        ``target_ess``. ``"auto"``: ``1 / sqrt(8 · target_ess)`` (0.0025 at the default: two equal
        modes run to twice ``target_ess``) on the gradient path, ESS alone on the gradient-free one
        (there each extra effective draw costs 1.5–4 calls; seed 0, 0.0025: the 10-D three-mode
        mixture 104,658 → 133,214 calls for a mode-weight error of 0.0077 → 0.0034, the 2-D one
        31,613 → 51,339); ``None``: ESS alone.
    :param round_ess: effective draws each tempered round trains on (whatever the dimension: the
        modes are counted on the pooled draws once they hold enough, so the tempered rounds stay
        small). A start from gradient optima raises it to what the mode count needs. Without
        gradients 1,250 spends fewer calls than 1,500 (one machine, 2-core AMD EPYC: the 10-D
        three-mode mixture, fit seeds 0–5, 76,913 against 82,102 on average, W1 1.62 against 1.71×
        the floor, mode-weight errors at most 0.0072 against 0.0087; seed 0 of the 20-D mixture
        182,348 against 210,030, W1 1.37 against 1.66×; of the Lotka–Volterra ODE 43,528 against
        47,082; of the 7-D regression 134,299 against 129,626), and 1,500 fewer than 2,000 (10-D
        mixture 86,899 against 95,143 on another machine). 1,000 lost the 10-D mixture's mode
        weights (errors 0.011 and 0.015 at 2 of 3 seeds, before the mixture weights came from each
        round's own draws).
    :param step_ess: how far β may rise after a round drawn from the guide: to where that round's own
        draws keep this share of their ESS (SMC's conditional-ESS rule).
    :param explore: share of each tempered round's draws aimed ahead of its β, at where the pooled
        draws at a higher β sit (what lets a data-dominated posterior narrow into a funnel's neck).
    :param initial_draws: draws of round 0; ``None``: ``1,000 · D`` (``D`` latent dimensions), at
        least 4,000 for the prior start and 10,000 from gradient optima. From the prior, round 0 only
        has to carry β to where the tempered rounds take over; 2,000 · D spent more than it saved (one
        machine, fit seeds 0–5 of the 10-D three-mode mixture: 82,102 calls on average against 87,623,
        W1 2.09 against 2.19 times the floor, mode-weight error 0.0075 against 0.0081; seed 0 of the
        7-D regression 129,626 against 159,036, of the 20-D two-mode mixture 210,030 against 205,801).
    :param max_draws: most draws of one round.
    :param defensive: the prior's share in every proposal (keeps the weights bounded where the
        guide is thin, and any mode the guide misses reachable).
    :param num_steps: gradient steps of the first training; later rounds warm-start from the last
        flow.
    :param warm_steps: most steps of a later round; it stops early once the weighted loss on a
        held-out tenth of the draws stops improving.
    :param num_rounds: ``"auto"`` (the stopping rule above), or exactly this many rounds.
    :param max_rounds: most rounds with ``"auto"``.
    :param starts: ``"auto"`` (gradient optima when the log-likelihood is differentiable in torch,
        the prior otherwise), ``"gradient"`` (raise if it is not) or ``"prior"``.
    :param num_starts: L-BFGS starting points; ``None``: ``max(32, 8 · D)``.
    """

    budget: int = 1_000_000
    target_ess: float = 20_000
    mode_weight_stderr: float | str | None = "auto"
    round_ess: float = 1_250
    step_ess: float = 0.5
    explore: float = 0.2
    initial_draws: int | None = None
    max_draws: int = 100_000
    defensive: float = 0.1
    num_steps: int = 600
    warm_steps: int = 300
    num_rounds: int | str = "auto"
    max_rounds: int = 60
    starts: str = "auto"
    num_starts: int | None = None

    def __post_init__(self) -> None:
        if self.num_rounds != "auto" and not (isinstance(self.num_rounds, int) and self.num_rounds >= 1):
            raise ValueError(f"Schedule.num_rounds must be a positive integer or 'auto', got {self.num_rounds!r}")
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"Schedule.explore must be in [0, 1), got {self.explore}")
        if not 0.0 < self.step_ess < 1.0:
            raise ValueError(f"Schedule.step_ess must be in (0, 1), got {self.step_ess}")
        if not 0.0 <= self.defensive < 1.0:
            raise ValueError(f"Schedule.defensive must be in [0, 1), got {self.defensive}")
        if self.mode_weight_stderr not in ("auto", None) and not (
            isinstance(self.mode_weight_stderr, (int, float)) and self.mode_weight_stderr > 0
        ):
            raise ValueError(
                f"Schedule.mode_weight_stderr must be 'auto', None or positive, got {self.mode_weight_stderr!r}"
            )
        if self.starts not in STARTS:
            raise ValueError(f"Schedule.starts must be one of {STARTS}, got {self.starts!r}")
        for name in ("budget", "target_ess", "round_ess", "max_draws", "num_steps", "max_rounds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Schedule.{name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def one_shot(cls, num_draws: int = 100_000, num_steps: int = 600) -> Schedule:
        """The paper's method: ``num_draws`` prior draws weighted by their likelihood, one training."""
        return cls(budget=num_draws, initial_draws=num_draws, max_draws=num_draws, num_steps=num_steps, num_rounds=1,
                   starts="prior")

    def mode_weight_tolerance(self, from_optima: bool) -> float | None:
        """The largest mixture-weight standard error the stop accepts (``None``: no such rule), for a
        fit whose round 0 drew from gradient optima (``from_optima``) or not."""
        if self.mode_weight_stderr == "auto":
            return 1.0 / math.sqrt(8.0 * self.target_ess) if from_optima else None
        return self.mode_weight_stderr

    def with_(self, **changes) -> Schedule:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def first_round_draws(self, dim: int, from_optima: bool) -> int:
        """Draws of round 0 for a model with ``dim`` latent dimensions."""
        if self.initial_draws is not None:
            return min(self.initial_draws, self.budget)
        n = max(10_000 if from_optima else 4_000, 1_000 * dim)
        return min(n, self.max_draws, self.budget)

    def starts_for(self, dim: int) -> int:
        return self.num_starts if self.num_starts is not None else max(32, 8 * dim)


@dataclass(frozen=True)
class RoundSummary:
    """One round of a fit.

    :param round: its index (0: the prior or the gradient start).
    :param beta: the likelihood temperature it trained at (``nan`` if it did not train).
    :param num_draws: draws it evaluated.
    :param num_likelihood_evals, num_gradient_evals: cumulative model evaluations of each kind
        after it.
    :param pool_size: likelihood-evaluated draws pooled after it.
    :param ess: effective sample size of the pooled weights at β = 1.
    :param pareto_k: Pareto k̂ of the same weights.
    :param ess_at_beta: the pooled ESS at ``beta``.
    :param efficiency: ESS per draw of its own draws at ``beta``, against its own proposal.
    :param log_evidence: ``log Ẑ`` after it (nats; each round against its own proposal).
    :param log_evidence_stderr: its standard error (nats; ``inf`` if the weights support none).
    :param num_components: mixture components of the guide after it.
    :param num_steps: gradient steps it trained for.
    :param seconds: wall time of the round.
    :param source: where its draws came from: ``"prior"``, ``"optima"``, ``"start"``
        (``fit(start=...)``) or ``"guide"``.
    :param calls_per_ess: what this round's calls bought: the model evaluations it spent
        (likelihood plus gradient; round 0's include the gradient start's) divided by how much it
        raised the pooled ESS at β = 1 (``ess`` minus the previous round's, or minus 0 for round 0);
        ``inf`` when the ESS did not rise, ``nan`` when nothing is known (a summary made by hand).
        It can fall below 1: a round's proposal also joins the mixture that earlier draws are
        weighted against, which can make their weights more even.
    :param total_calls_per_ess: cumulative model evaluations per effective draw at β = 1
        (``num_evals / ess``; ``inf`` when the ESS is 0).
    """

    round: int
    beta: float
    num_draws: int
    num_likelihood_evals: int
    num_gradient_evals: int
    pool_size: int
    ess: float
    pareto_k: float
    ess_at_beta: float
    efficiency: float
    log_evidence: float
    log_evidence_stderr: float
    num_components: int
    num_steps: int
    seconds: float
    source: str
    calls_per_ess: float = math.nan
    total_calls_per_ess: float = math.nan

    @property
    def num_evals(self) -> int:
        """Cumulative model evaluations of both kinds."""
        return self.num_likelihood_evals + self.num_gradient_evals

    def line(self) -> str:
        """One readable line, e.g. for a log."""
        beta = "  –  " if math.isnan(self.beta) else f"{self.beta:.3g}"
        return (f"round {self.round:2d} [{self.source}] β={beta} draws={self.num_draws:,} "
                f"calls={self.num_evals:,} ESS={self.ess:,.0f} calls/ΔESS={_ratio(self.calls_per_ess)} "
                f"calls/ESS={_ratio(self.total_calls_per_ess)} k̂={self.pareto_k:.2f} "
                f"log Z={self.log_evidence:.4f}±{self.log_evidence_stderr:.4f} K={self.num_components} "
                f"steps={self.num_steps} {self.seconds:.1f}s")


def _ratio(x: float) -> str:
    """A calls-per-ESS figure for :meth:`RoundSummary.line`: 3 significant digits, ``∞``, or ``–``."""
    if math.isnan(x):
        return "–"
    return "∞" if math.isinf(x) else f"{x:.3g}"
