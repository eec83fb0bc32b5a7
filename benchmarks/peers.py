"""Peer samplers for any Pyro model, on the unit cube: nautilus, pocomc, dynesty; and Pyro's NUTS.

Used by ``benchmarks/efficiency.py``. The nested samplers and pocomc all want a prior they can
sample by a map from the unit cube, so :class:`UnitCube` turns a Pyro model into one:

* ``u ∈ [0, 1]^d`` with a uniform prior, ``d`` the total size of the model's latent sites;
* ``θ = T(u)``: the model runs under a :class:`pyro.poutine` messenger that gives each latent
  sample site the value ``site_fn.icdf(u_slice)``, in model order, so a site whose prior depends
  on an earlier one (eight schools' ``theta ~ Normal(mu, tau)``) gets its conditional quantile and
  ``T`` pushes the uniform exactly onto the model's prior;
* ``log L(u)``: the sum of the observed sites' log-probs (``pyro.factor`` included) in that run.

So ``∫ L(T(u)) du`` is the model's evidence, and a peer's weighted ``u`` draws map through ``T`` to
posterior draws of ``θ``. For the paper's and the ``gmm_*`` targets (Uniform(−12, 12)^d prior)
``T(u) = −12 + 24 u``, which is exactly the ``uniform(loc=-12, scale=24)`` prior of
``peers.md``: each library rescales a bounded prior to the unit cube (nautilus, dynesty) or to
the probit of it (pocomc) before sampling, so the sampler sees the same points either way.

The model is run for a whole batch of ``u`` at once under a particle ``pyro.plate`` at
dimension ``−max_plate_nesting − 1`` (as ``pyro_lwflow.tracing.ModelTracer`` does), checked once
against one-draw-at-a-time runs; a model that does not vectorise is run draw by draw. Every
likelihood evaluation goes through :meth:`UnitCube.loglike`, which counts them
(:attr:`UnitCube.calls`), so each library's own count can be checked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent

__all__ = ["PeerResult", "UnitCube", "resample", "run_dynesty", "run_nautilus", "run_nuts", "run_pocomc",
           "PEERS", "available"]

_PARTICLES = "_peers_particles"
_EPS = 1e-12  # u is kept in [eps, 1 − eps]: icdf(0) and icdf(1) are ±inf for unbounded priors
_BAD = -1e300  # the log-likelihood given to NaN / ±inf values (weight 0 for every library)


@dataclass
class PeerResult:
    """One peer run: equally weighted posterior draws and what they cost.

    :param draws: ``(N, d)`` flattened constrained ``θ`` (the order of :attr:`UnitCube.names`).
    :param likelihood_evals: calls of the likelihood as our counter saw them.
    :param library_evals: the same as the library counts them (``None`` where it has no count).
    :param gradient_evals: gradient evaluations of the log density (NUTS only).
    :param resample_draws: ``(num, seed) → (num, d)`` another equally weighted set resampled from the
        library's weighted draws (``draws`` is the one of the run's own seed); ``None`` for NUTS.
    """

    method: str
    draws: torch.Tensor
    likelihood_evals: int
    seconds: float
    library_evals: int | None = None
    gradient_evals: int = 0
    log_evidence: float | None = None
    log_evidence_stderr: float | None = None
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    resample_draws: Callable[[int, int], torch.Tensor] | None = None


# -- the unit-cube adapter ------------------------------------------------------------------------


def _icdf(fn, u: torch.Tensor) -> torch.Tensor:
    """``fn.icdf(u)`` for a (possibly expanded, independent, masked) univariate-family site."""
    base = fn
    while isinstance(base, (Independent, ExpandedDistribution, MaskedDistribution)):
        base = base.base_dist
    return base.icdf(u)  # the base's parameters broadcast against u's (full) shape


class _UnitCubeMessenger(Messenger):
    """Gives each named latent site the value ``fn.icdf(u)``, ``u`` its slice of the cube point.

    Entered *outside* the particle plate, so a site's ``fn`` already carries the plate's batch
    dimension (and the model's plates) when this messenger sees it.
    """

    def __init__(self, slices: dict[str, torch.Tensor], n: int | None) -> None:
        super().__init__()
        self.slices, self.n = slices, n

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.slices or site_is_subsample(msg):
            return
        fn = msg["fn"]
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        u = self.slices[name]
        if self.n is not None and (not shape or shape[0] != self.n):
            raise ValueError(f"site '{name}' has shape {shape} under the particle plate (expected ({self.n}, ...))")
        try:
            value = _icdf(fn, u.reshape(shape))
        except NotImplementedError as err:
            raise TypeError(f"site '{name}': its prior {type(fn).__name__} has no icdf, so it cannot be mapped "
                            "from the unit cube") from err
        msg["value"] = value.to(torch.get_default_dtype())
        msg["done"] = True


class UnitCube:
    """A Pyro model as a likelihood on ``[0, 1]^d`` under a uniform prior (see the module docstring).

    :param model: a Pyro model with continuous latent sites whose priors have an ``icdf``.
    :param args, kwargs: its data.
    """

    def __init__(self, model: Callable, args: tuple = (), kwargs: dict | None = None) -> None:
        self.model, self.args, self.kwargs = model, tuple(args), dict(kwargs or {})
        with torch.no_grad(), pyro.validation_enabled(False):
            proto = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        self.sites: list[tuple[str, torch.Size]] = []
        self.observed: list[str] = []
        nesting = 0
        for name, site in proto.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            nesting = max([nesting] + [-f.dim for f in site["cond_indep_stack"] if f.vectorized])
            if site["is_observed"]:
                if not site["infer"].get("_deterministic"):
                    self.observed.append(name)
            else:
                self.sites.append((name, site["value"].shape))
        if not self.observed:
            raise ValueError("the model has no observed site (obs= or pyro.factor)")
        self.max_plate_nesting = nesting
        self.names = [n for n, _ in self.sites]
        self.sizes = [math.prod(s) for _, s in self.sites]
        self.dim = sum(self.sizes)
        self.labels = [n if s == 1 else f"{n}[{i}]" for n, s in zip(self.names, self.sizes, strict=True)
                       for i in range(s)]
        self.calls = 0
        self.vectorized = self._check_vectorized()

    # running the model --------------------------------------------------------------------------

    def _trace(self, u: torch.Tensor, batched: bool) -> poutine.Trace:
        u = u.to(torch.float64).clamp(_EPS, 1.0 - _EPS)
        parts = torch.split(u, self.sizes, dim=-1)
        slices = dict(zip(self.names, parts, strict=True))
        n = u.shape[0] if batched else None
        tracer = poutine.trace(self.model)
        with torch.no_grad(), pyro.validation_enabled(False), _UnitCubeMessenger(slices, n):
            if batched:
                with pyro.plate(_PARTICLES, n, dim=-self.max_plate_nesting - 1):
                    tracer(*self.args, **self.kwargs)
            else:
                tracer(*self.args, **self.kwargs)
        return tracer.msngr.trace

    def _loglike(self, trace: poutine.Trace, n: int | None) -> torch.Tensor:
        """Per draw (``(n,)``, or a scalar for ``n=None``), the sum of the observed sites' log-probs."""
        observed = set(self.observed)
        trace.compute_log_prob(site_filter=lambda name, _site: name in observed)
        total = torch.zeros(() if n is None else (n,), dtype=torch.float64)
        dim = -self.max_plate_nesting - 1
        for name in self.observed:
            lp = torch.as_tensor(trace.nodes[name]["log_prob"]).double()
            if n is None:
                total = total + lp.sum()
                continue
            while lp.dim() < -dim:
                lp = lp.unsqueeze(0)
            lp = lp.movedim(dim, 0)
            total = total + lp.reshape(lp.shape[0], -1).sum(-1).expand(n)
        return total

    def _eval(self, u: torch.Tensor) -> torch.Tensor:
        """``(n,)`` float64 log-likelihoods at ``(n, d)`` cube points (not counted)."""
        if self.vectorized:
            return self._loglike(self._trace(u, True), u.shape[0])
        return torch.stack([self._loglike(self._trace(row, False), None) for row in u])

    def _check_vectorized(self, k: int = 4) -> bool:
        gen = torch.Generator().manual_seed(0)
        u = torch.rand(k, self.dim, generator=gen, dtype=torch.float64)
        seq = torch.stack([self._loglike(self._trace(row, False), None) for row in u])
        try:
            vec = self._loglike(self._trace(u, True), k)
        except Exception as err:  # noqa: BLE001 - any failure means "run draw by draw"
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"    note: the model does not vectorise ({type(err).__name__}: {first}); running it draw by draw")
            return False
        if not torch.allclose(vec, seq, rtol=1e-5, atol=1e-4, equal_nan=True):
            print(f"    note: vectorised log-likelihoods differ ({vec.tolist()} vs {seq.tolist()}); draw by draw")
            return False
        return True

    # what the peers call ------------------------------------------------------------------------

    def loglike(self, u) -> np.ndarray:
        """``(n,)`` log-likelihoods at ``(n, d)`` cube points; counted. Non-finite values → −1e300."""
        u = torch.as_tensor(np.asarray(u, dtype=np.float64))
        single = u.dim() == 1
        u = u.reshape(-1, self.dim)
        self.calls += u.shape[0]
        out = self._eval(u).numpy()
        out = np.where(np.isfinite(out), out, _BAD)
        return out[0] if single else out

    def loglike_one(self, u) -> float:
        """One point (dynesty's calling convention); counted."""
        self.calls += 1
        u = torch.as_tensor(np.asarray(u, dtype=np.float64))
        value = float(self._loglike(self._trace(u, False), None))
        return value if math.isfinite(value) else _BAD

    def transform(self, u, chunk: int = 10_000) -> torch.Tensor:
        """``(n, d)`` flattened ``θ = T(u)`` (constrained, model order); not counted."""
        u = torch.as_tensor(np.asarray(u, dtype=np.float64)).reshape(-1, self.dim)
        rows = []
        for i in range(0, u.shape[0], chunk):
            part = u[i : i + chunk]
            if self.vectorized:
                trace = self._trace(part, True)
                rows.append(self.flatten({n: trace.nodes[n]["value"] for n in self.names}, part.shape[0]))
            else:
                for row in part:
                    trace = self._trace(row, False)
                    rows.append(self.flatten({n: trace.nodes[n]["value"].unsqueeze(0) for n in self.names}, 1))
        return torch.cat(rows)

    def flatten(self, values: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """``(n, d)`` float32: the latent sites of ``values`` (each ``(n, *site_shape)``, or broadcast
        under the particle plate) concatenated in model order."""
        cols = []
        for name, shape in self.sites:
            v = torch.as_tensor(values[name]).detach().float()
            if v.numel() != n * math.prod(shape):
                raise ValueError(f"site '{name}': {tuple(v.shape)} values for {n} draws of shape {tuple(shape)}")
            cols.append(v.reshape(n, -1))
        return torch.cat(cols, -1)


def resample(points: np.ndarray, log_w: np.ndarray, num: int, seed: int) -> np.ndarray:
    """``num`` equally weighted rows of ``points``: multinomial resampling by ``exp(log_w)``."""
    log_w = np.asarray(log_w, dtype=np.float64)
    w = np.exp(log_w - np.max(log_w))
    w = np.where(np.isfinite(w), w, 0.0)
    idx = np.random.default_rng(seed).choice(len(w), size=num, replace=True, p=w / w.sum())
    return np.asarray(points)[idx]


def _ess(log_w: np.ndarray) -> float:
    w = np.exp(log_w - np.max(log_w))
    return float(w.sum() ** 2 / (w**2).sum())


# -- the peers ------------------------------------------------------------------------------------


def available() -> dict[str, str | None]:
    """``{method: version or None}`` for the optional peer libraries."""
    out: dict[str, str | None] = {}
    for method, module in (("nautilus", "nautilus"), ("pocomc", "pocomc"), ("dynesty", "dynesty")):
        try:
            mod = __import__(module)
            out[method] = getattr(mod, "__version__", "?")
        except ImportError:
            out[method] = None
    out["nuts"] = pyro.__version__
    return out


def nautilus_settings(quick: bool) -> dict:
    if quick:
        return {"n_live": 500, "n_networks": 2, "f_live": 0.05, "n_eff": 2000, "discard_exploration": True}
    return {"n_live": 3000, "n_networks": 4, "f_live": 0.01, "n_eff": 10000, "discard_exploration": True}


def run_nautilus(cube: UnitCube, num_draws: int, seed: int, quick: bool = False) -> PeerResult:
    """peers.md: ``Sampler(prior, loglike, n_live=3000, n_networks=4, vectorized=True, pass_dict=False,
    seed=0)``; ``run(f_live=0.01, n_eff=10000, discard_exploration=True)``."""
    import nautilus

    s = nautilus_settings(quick)
    prior = nautilus.Prior()
    for i in range(cube.dim):
        prior.add_parameter(f"u{i}", dist=(0.0, 1.0))
    cube.calls = 0
    start = time.perf_counter()
    sampler = nautilus.Sampler(prior, cube.loglike, n_live=s["n_live"], n_networks=s["n_networks"], vectorized=True,
                               pass_dict=False, seed=seed)
    sampler.run(f_live=s["f_live"], n_eff=s["n_eff"], discard_exploration=s["discard_exploration"], verbose=False)
    seconds = time.perf_counter() - start
    points, log_w, _ = sampler.posterior()
    u = resample(points, log_w, num_draws, seed)
    return PeerResult("nautilus", cube.transform(u), cube.calls, seconds, library_evals=int(sampler.n_like),
                      log_evidence=float(sampler.log_z), settings={**s, "seed": seed},
                      extra={"posterior_points": len(points), "posterior_ess": _ess(log_w)},
                      resample_draws=lambda num, s: cube.transform(resample(points, log_w, num, s)))


def pocomc_settings(quick: bool) -> dict:
    if quick:
        return {"n_effective": 512, "n_active": 256, "n_total": 1024, "n_evidence": 1024}
    return {"n_effective": 2048, "n_active": 1024, "n_total": 4096, "n_evidence": 4096}


def run_pocomc(cube: UnitCube, num_draws: int, seed: int, quick: bool = False) -> PeerResult:
    """peers.md: ``Sampler(prior, loglike, n_effective=2048, n_active=1024, vectorize=True,
    random_state=0)``; ``run(n_total=4096, n_evidence=4096)``; log Z from ``evidence()``."""
    import pocomc
    from scipy.stats import uniform

    s = pocomc_settings(quick)
    prior = pocomc.Prior([uniform(loc=0.0, scale=1.0)] * cube.dim)
    cube.calls = 0
    threads = torch.get_num_threads()
    start = time.perf_counter()
    sampler = pocomc.Sampler(prior, cube.loglike, n_effective=s["n_effective"], n_active=s["n_active"],
                             vectorize=True, random_state=seed)
    sampler.run(n_total=s["n_total"], n_evidence=s["n_evidence"], progress=False)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)  # pocomc sets torch's thread count itself (pytorch_threads=1)
    samples, weights, _, _ = sampler.posterior()
    u = resample(samples, np.log(weights), num_draws, seed)
    log_z, log_z_err = sampler.evidence()
    return PeerResult("pocomc", cube.transform(u), cube.calls, seconds, library_evals=int(sampler.calls),
                      log_evidence=float(log_z), log_evidence_stderr=None if log_z_err is None else float(log_z_err),
                      settings={**s, "seed": seed},
                      extra={"posterior_points": len(samples), "posterior_ess": _ess(np.log(weights))},
                      resample_draws=lambda num, s: cube.transform(resample(samples, np.log(weights), num, s)))


def dynesty_settings(dim: int, quick: bool) -> dict:
    sample = "unif" if dim <= 5 else "rwalk"
    if quick:
        return {"nlive": 200, "bound": "multi", "sample": sample, "dlogz": 0.5}
    return {"nlive": 1000, "bound": "multi", "sample": sample, "dlogz": 0.05}


def run_dynesty(cube: UnitCube, num_draws: int, seed: int, quick: bool = False) -> PeerResult:
    """peers.md: ``NestedSampler(loglike, prior_transform, d, nlive=1000, bound="multi", sample="unif"
    (d ≤ 5) or "rwalk")``, ``run_nested(dlogz=0.05)``. The likelihood is called one point at a time."""
    import dynesty

    s = dynesty_settings(cube.dim, quick)
    cube.calls = 0
    start = time.perf_counter()
    sampler = dynesty.NestedSampler(cube.loglike_one, lambda u: u, cube.dim, nlive=s["nlive"], bound=s["bound"],
                                    sample=s["sample"], rstate=np.random.default_rng(seed))
    sampler.run_nested(dlogz=s["dlogz"], print_progress=False)
    seconds = time.perf_counter() - start
    res = sampler.results
    u = resample(res.samples, res.logwt, num_draws, seed)
    return PeerResult("dynesty", cube.transform(u), cube.calls, seconds, library_evals=int(sampler.ncall),
                      log_evidence=float(res.logz[-1]), log_evidence_stderr=float(res.logzerr[-1]),
                      settings={**s, "seed": seed},
                      extra={"sum_results_ncall": int(np.sum(res.ncall)), "posterior_ess": _ess(res.logwt)},
                      resample_draws=lambda num, s: cube.transform(resample(res.samples, res.logwt, num, s)))


PEERS = {"nautilus": run_nautilus, "pocomc": run_pocomc, "dynesty": run_dynesty}


# -- NUTS -----------------------------------------------------------------------------------------


class _Counter:
    """Wraps a potential function and counts its calls: with a gradient (any input requires grad)
    or without."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.gradient, self.plain = fn, 0, 0

    def __call__(self, z: dict):
        if any(torch.is_tensor(v) and v.requires_grad for v in z.values()):
            self.gradient += 1
        else:
            self.plain += 1
        return self.fn(z)


class _CountingNUTS(pyro.infer.NUTS):
    """NUTS whose potential energy (built by Pyro's ``initialize_model``) is wrapped in a counter."""

    def _initialize_model_properties(self, model_args, model_kwargs):
        super()._initialize_model_properties(model_args, model_kwargs)
        self.counter = _Counter(self.potential_fn)
        self.potential_fn = self.counter


def nuts_settings(quick: bool) -> dict:
    if quick:
        return {"num_chains": 4, "warmup_steps": 100, "num_samples": 200, "target_accept_prob": 0.8}
    return {"num_chains": 4, "warmup_steps": 1000, "num_samples": 5000, "target_accept_prob": 0.8}


def run_nuts(model: Callable, args: tuple, flatten: Callable[[dict, int], torch.Tensor], seed: int,
             settings: dict, method: str = "nuts") -> PeerResult:
    """Pyro NUTS, ``settings["num_chains"]`` chains one after another (seeds ``seed·1000 + chain``),
    all draws kept (``num_chains × num_samples``). Calls: potential-energy evaluations, with a
    gradient (``gradient_evals``) or without (``likelihood_evals``: the few of setup), as counted
    by a wrapper around the potential ``initialize_model`` builds; the handful of model runs inside
    ``initialize_model`` itself (prototype trace, initial point) are not counted."""
    from pyro.infer import MCMC

    draws, grads, plain, divergences = [], 0, 0, 0
    start = time.perf_counter()
    for chain in range(settings["num_chains"]):
        pyro.set_rng_seed(seed * 1000 + chain)
        kernel = _CountingNUTS(model, target_accept_prob=settings["target_accept_prob"])
        mcmc = MCMC(kernel, num_samples=settings["num_samples"], warmup_steps=settings["warmup_steps"],
                    num_chains=1, disable_progbar=True)
        mcmc.run(*args)
        samples = mcmc.get_samples()
        draws.append(flatten(samples, settings["num_samples"]))
        grads += kernel.counter.gradient
        plain += kernel.counter.plain
        divergences += sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    seconds = time.perf_counter() - start
    return PeerResult(method, torch.cat(draws), plain, seconds, gradient_evals=grads,
                      settings={**settings, "seed": seed}, extra={"divergences": divergences})
