"""Amortized posteriors: one training, any data set; checked and corrected by the likelihood."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lwflow import AmortizedLWFlow, Schedule, amortize, calibrate
from pyro_lwflow.calibration import coverage_curve, sbc_ranks
from pyro_lwflow.conditional import ConditionalMixture
from tests import contract_models

PRIOR_SD, NOISE, N = 2.0, 0.5, 10


def normal_mean(y=None):
    y = torch.zeros(N) if y is None else y
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def exact(y: torch.Tensor) -> tuple[float, float, float]:
    """Posterior mean and sd of mu, and log p(y), in closed form."""
    precision = 1 / PRIOR_SD**2 + N / NOISE**2
    mean = float(y.sum()) / NOISE**2 / precision
    cov = NOISE**2 * torch.eye(N, dtype=torch.float64) + PRIOR_SD**2
    log_z = float(dist.MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(y.double()))
    return mean, precision**-0.5, log_z


def data_sets() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.stack([m + NOISE * torch.randn(N, generator=g) for m in (-2.0, 0.3, 1.7)])


@pytest.fixture(scope="module")
def amortized() -> AmortizedLWFlow:
    return amortize(normal_mean, num_simulations=4_000, num_components=1, max_epochs=60, patience=10, seed=0,
                    progress=False)


@pytest.mark.slow
def test_amortized_draws_match_the_closed_form_for_every_data_set(amortized):
    ys = data_sets()
    draws = amortized.condition(ys).sample(20_000)["mu"]  # (n, B)
    assert draws.shape == (20_000, 3)
    for j, y in enumerate(ys):
        mean, sd, _ = exact(y)
        assert abs(float(draws[:, j].mean()) - mean) < 0.25 * sd
        assert 0.8 < float(draws[:, j].std()) / sd < 1.2


@pytest.mark.slow
def test_the_check_weights_by_the_likelihood_and_corrects(amortized):
    ys = data_sets()
    checks = amortized.check(ys, num_draws=5_000, seed=1)
    assert len(checks) == 3
    for y, check in zip(ys, checks, strict=True):
        mean, sd, log_z = exact(y)
        assert check.num_likelihood_evals == 5_000
        assert check.efficiency > 0.5 and check.pareto_k < 0.7 and check.ok
        assert abs(check.log_evidence - log_z) < 4 * check.log_evidence_stderr + 1e-3
        corrected = check.sample(20_000, generator=torch.Generator().manual_seed(0))["mu"]
        assert abs(float(corrected.mean()) - mean) < 0.1 * sd
        assert 0.9 < float(corrected.std()) / sd < 1.1
        distinct = check.rejection_sample(generator=torch.Generator().manual_seed(0))["mu"]
        assert 1_000 < len(distinct) <= 5_000
        assert len(torch.unique(distinct)) > 0.99 * len(distinct)  # float32 ties aside, no repeats
        assert abs(float(distinct.mean()) - mean) < 0.15 * sd
        assert 0.9 < float(distinct.std()) / sd < 1.1


def test_one_data_set_and_a_batch_have_the_documented_shapes(amortized):
    y = data_sets()[0]
    one = amortized.condition(y)
    assert amortized(y).sample(7)["mu"].shape == (7,)
    draws = one.sample(11)
    assert draws["mu"].shape == (11,)
    assert one.log_prob(draws).shape == (11,)
    assert one.latent_dist.sample((5,)).shape == (5, 1)
    batch = amortized.condition({"y": data_sets()})
    draws = batch.sample(11)
    assert draws["mu"].shape == (11, 3)
    assert batch.log_prob(draws).shape == (11, 3)
    idata = one.to_arviz(num_samples=400, num_chains=4)
    assert idata.posterior["mu"].shape == (4, 100)
    assert torch.allclose(torch.as_tensor(idata.observed_data["y"].values), y)


def test_bad_data_sets_name_the_site_and_the_fix(amortized):
    with pytest.raises(ValueError, match=r"site 'y' have shape \(4,\); expected the site's shape \(10,\)"):
        amortized.condition(torch.zeros(4))
    with pytest.raises(ValueError, match="site 'y' hold NaN"):
        amortized.condition(torch.full((N,), math.nan))
    with pytest.raises(ValueError, match=r"missing \['y'\]"):
        amortized.condition({"z": torch.zeros(N)})
    with pytest.raises(ValueError, match="refine takes one data set"):
        amortized.refine(data_sets())


def test_a_factor_likelihood_has_no_simulator_and_says_so():
    def model(y=None):
        y = torch.zeros(3) if y is None else y
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("loglik", dist.Normal(mu, 1.0).log_prob(y).sum(-1))

    with pytest.raises(ValueError, match="Site 'loglik' is a pyro.factor.*pyro.sample"):
        AmortizedLWFlow(model)


@pytest.mark.slow
def test_likelihood_weighted_training_on_a_stack_of_data_sets():
    ys = data_sets()
    amortized = amortize(normal_mean, data_sets=ys, num_simulations=4_000, num_components=1, max_epochs=60,
                         patience=10, seed=0, progress=False)
    assert amortized.num_likelihood_evals == 3 * 4_000
    draws = amortized.condition(ys).sample(20_000)["mu"]
    for j, y in enumerate(ys):
        mean, sd, _ = exact(y)
        assert abs(float(draws[:, j].mean()) - mean) < 0.25 * sd
        assert 0.8 < float(draws[:, j].std()) / sd < 1.2


@pytest.mark.slow
def test_refine_warm_starts_fit_from_the_amortized_answer(amortized):
    y = data_sets()[1]
    mean, sd, _ = exact(y)
    result = amortized.refine(y, schedule=Schedule(target_ess=5_000), progress=False)
    assert result.rounds[0].source == "start"
    assert result.num_gradient_evals == 0  # no optimiser: the amortized answer is the start
    assert result.num_likelihood_evals <= 25_000
    draws = result.sample(20_000)["mu"]
    assert abs(float(draws.mean()) - mean) < 0.1 * sd
    assert 0.9 < float(draws.std()) / sd < 1.1


@pytest.mark.slow
def test_calibration_of_a_trained_guide_is_uniform(amortized):
    calibration = calibrate(amortized, num_simulations=400, num_draws=99, seed=2)
    assert calibration.ranks.shape == (400, 1)
    assert calibration.p_values().min() > 0.01
    assert calibration.max_coverage_error < 0.1
    fig = calibration.plot()
    assert len(fig.axes) == 2


def test_sbc_and_coverage_flag_an_overconfident_posterior():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(500, 1, generator=g)  # θ* ~ N(0, 1), and q = N(0, 0.5²) for every data set
    draws = 0.5 * torch.randn(99, 500, 1, generator=g)
    from pyro_lwflow.calibration import Calibration

    levels = torch.linspace(0, 1, 11)
    log_q = lambda t: dist.Normal(0.0, 0.5).log_prob(t).squeeze(-1)  # noqa: E731
    coverage = coverage_curve(log_q(true), log_q(draws), levels)
    calibration = Calibration(sbc_ranks(true, draws), 99, levels, coverage)
    assert calibration.p_values().max() < 1e-6
    assert float(coverage[5]) < 0.35  # the 50 % region holds far fewer than half of the true values


SHAPES = [n for n in contract_models.FITTED if n != "factor_only"]


@pytest.mark.parametrize("name", SHAPES)
def test_every_model_shape_of_the_contract_matrix_amortizes(name):
    """Plates, constrained supports (positive, unit interval, simplex, Cholesky), deterministic sites,
    keyword, NumPy and list data: simulate, train briefly, condition, sample inside the supports, check."""
    model = getattr(contract_models, name)
    data = model.example_data()
    args, kwargs = ((), {"y": data, "noise": 1.0}) if name == "keyword_arguments" else ((data,), {})
    amortized = amortize(model, *args, model_kwargs=kwargs, num_simulations=300, max_epochs=2, progress=False)
    observed = {n: v[0] for n, v in amortized._template_data().items()}
    posterior = amortized.condition(observed)
    draws = posterior.sample(50)
    for site in amortized.layout:
        assert draws[site.name].shape == (50, *site.shape)
        assert bool(site.support.check(draws[site.name]).all()), site.name
    assert posterior.log_prob(draws).shape == (50,)
    check = amortized.check(observed, num_draws=200)
    assert 0 < check.ess <= 200 and math.isfinite(check.log_evidence)


def test_save_and_load_give_back_the_same_amortized_posterior(amortized, tmp_path):
    from pyro_lwflow import load, save

    save(amortized, tmp_path / "amortized.lwflow")
    loaded = load(tmp_path / "amortized.lwflow", normal_mean)
    y = data_sets()[0]
    torch.manual_seed(5)
    before = amortized.condition(y).sample(100)["mu"]
    torch.manual_seed(5)
    after = loaded.condition(y).sample(100)["mu"]
    assert torch.equal(before, after)
    assert loaded.num_simulations == amortized.num_simulations and loaded.val_losses == amortized.val_losses


def test_the_base_can_switch_a_mode_off_on_both_sides_of_the_data():
    """A mode the prior box cuts away for large |x| on either side: its weight is not monotone in x,
    which weights affine in the context cannot follow (a two-component softmax of affine logits is
    monotone: with the MLP frozen, this fit ends at 0.50 everywhere); the base's MLP can."""
    torch.manual_seed(0)
    c = torch.linspace(-2.0, 2.0, 201)[:, None]
    wanted = torch.where(c.abs().squeeze(-1) > 1.0, 0.1, 0.9)  # weight of component 0
    base = ConditionalMixture(1, torch.tensor([[-1.0], [1.0]]))
    optim = torch.optim.Adam(base.parameters(), lr=0.01)
    for _ in range(500):
        optim.zero_grad()
        log_w = torch.log_softmax(base.parameters_at(c)[0], -1)
        loss = -(wanted * log_w[:, 0] + (1 - wanted) * log_w[:, 1]).mean()
        loss.backward()
        optim.step()
    got = torch.softmax(base.parameters_at(c)[0], -1)[:, 0].detach()
    inside, outside = c.abs().squeeze(-1) < 0.8, c.abs().squeeze(-1) > 1.2
    assert got[inside].min() > 0.8 and got[outside].max() < 0.2


def test_a_guide_saved_before_the_base_had_its_mlp_loads_as_the_affine_base(amortized, tmp_path):
    from pyro_lwflow import load, save

    path = tmp_path / "old.lwflow"
    save(amortized, path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("base.mlp.")}
    torch.save(payload, path)
    old = load(path, normal_mean)
    c = torch.randn(5, old.base.head.in_features)
    assert torch.equal(old.base.mlp(c), torch.zeros(5, old.base.head.out_features))
    assert torch.equal(old.base.head.weight, amortized.base.head.weight)


def test_the_default_embedding_passes_a_few_numbers_as_they_are_and_compresses_many():
    few = AmortizedLWFlow(normal_mean)  # 10 numbers: the standardised data are the context
    assert not list(few.embedding.parameters())
    y = data_sets()
    assert torch.equal(few._embed(y), (y - few.data_loc) / few.data_scale)
    many = AmortizedLWFlow(normal_mean, embedding_dim=4)  # 10 > 4 numbers: an MLP down to 4
    assert list(many.embedding.parameters()) and many._embed(y).shape == (3, 4)


def test_a_guide_saved_with_an_mlp_embedding_loads_only_with_that_mlp(tmp_path):
    from pyro_lwflow import load, save
    from pyro_lwflow.amortized import default_embedding

    mlp = default_embedding(N, embedding_dim=4)  # the default for 10 numbers before
    amortized = amortize(normal_mean, embedding=mlp, num_simulations=300, max_epochs=1, progress=False)
    amortized.settings["custom_embedding"] = False  # as a file from before the change records it
    save(amortized, tmp_path / "mlp.lwflow")
    with pytest.raises(ValueError, match="saved with an earlier default embedding"):
        load(tmp_path / "mlp.lwflow", normal_mean)
    loaded = load(tmp_path / "mlp.lwflow", normal_mean, embedding=default_embedding(N, embedding_dim=4))
    assert torch.equal(loaded.embedding[1].weight, amortized.embedding[1].weight)


def test_a_custom_embedding_is_used_and_must_be_passed_again_to_load(tmp_path):
    from pyro_lwflow import load, save

    class Mean(torch.nn.Module):  # a structured embedding: summary statistics of the series
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 4)

        def forward(self, y):
            return self.linear(torch.stack([y.mean(-1), y.std(-1)], -1))

    amortized = amortize(normal_mean, embedding=Mean(), num_simulations=300, max_epochs=2, progress=False)
    assert amortized.condition(data_sets()).sample(3)["mu"].shape == (3, 3)
    save(amortized, tmp_path / "custom.lwflow")
    with pytest.raises(ValueError, match="custom embedding: pass a new instance"):
        load(tmp_path / "custom.lwflow", normal_mean)
    loaded = load(tmp_path / "custom.lwflow", normal_mean, embedding=Mean())
    assert torch.equal(loaded.embedding.linear.weight, amortized.embedding.linear.weight)


def test_one_seed_one_simulation_set_whatever_the_executor():
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    guide = AmortizedLWFlow(normal_mean)
    inline = guide.simulate(2_500, seed=11, chunk_size=1_000)
    with ThreadPoolExecutor(2) as pool:
        threads = guide.simulate(2_500, seed=11, chunk_size=1_000, executor=pool)
    with ProcessPoolExecutor(2) as pool:
        processes = guide.simulate(2_500, seed=11, chunk_size=1_000, executor=pool)
    assert inline[0].shape == (2_500, 1) and inline[1].shape == (2_500, N)
    for other in (threads, processes):
        assert torch.equal(inline[0], other[0]) and torch.equal(inline[1], other[1])
    assert not torch.equal(inline[1], guide.simulate(2_500, seed=12, chunk_size=1_000)[1])


def test_equal_mixture_samples_and_scores_each_member_at_half_weight():
    from pyro_lwflow.conditional import EqualMixture

    members = [dist.Normal(torch.tensor([-3.0, 0.0]), 1.0).to_event(1), dist.Normal(torch.tensor([3.0, 1.0]), 0.5)
               .to_event(1)]
    mixture = EqualMixture(members)
    torch.manual_seed(0)
    draws = mixture.sample((20_000,))
    assert draws.shape == (20_000, 2)
    assert abs(float((draws[:, 0] > 0).float().mean()) - 0.5) < 0.02
    points = torch.randn(7, 2) * 3
    expected = torch.log((members[0].log_prob(points).exp() + members[1].log_prob(points).exp()) / 2)
    assert torch.allclose(mixture.log_prob(points), expected, atol=1e-5)


@pytest.mark.slow
def test_an_ensemble_answers_with_its_members_equal_mixture(tmp_path):
    from pyro_lwflow import load, save

    ensemble = amortize(normal_mean, num_simulations=4_000, num_components=1, max_epochs=60, patience=10, seed=0,
                        ensemble=2, progress=False)
    assert len(ensemble.members()) == 2
    ys = data_sets()
    flat = ensemble.data_layout.flatten(ensemble.data_layout.as_batch(ys)[0])
    z = torch.randn(50, 3, 1)
    each = torch.stack([d.log_prob(z) for d in ensemble._member_dists(flat)])
    assert not torch.allclose(each[0], each[1])  # two members, trained apart
    assert torch.allclose(ensemble.latent_dist(flat).log_prob(z), torch.logsumexp(each, 0) - math.log(2))
    draws = ensemble.condition(ys).sample(20_000)["mu"]
    for j, (y, check) in enumerate(zip(ys, ensemble.check(ys, num_draws=5_000, seed=1), strict=True)):
        mean, sd, log_z = exact(y)
        assert abs(float(draws[:, j].mean()) - mean) < 0.25 * sd
        assert 0.8 < float(draws[:, j].std()) / sd < 1.2
        assert check.efficiency > 0.5 and check.ok
        assert abs(check.log_evidence - log_z) < 4 * check.log_evidence_stderr + 1e-3
    save(ensemble, tmp_path / "ensemble.lwflow")
    loaded = load(tmp_path / "ensemble.lwflow", normal_mean)
    assert len(loaded.members()) == 2
    assert torch.allclose(loaded.latent_dist(flat).log_prob(z), ensemble.latent_dist(flat).log_prob(z))


def test_ensemble_must_be_a_positive_count():
    with pytest.raises(ValueError, match="ensemble must be a positive integer"):
        AmortizedLWFlow(normal_mean, ensemble=0)
