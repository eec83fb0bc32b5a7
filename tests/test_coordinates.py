import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import biject_to, constraints

from pyro_lwflow import AutoLWFlow, LikelihoodWeightedKL
from pyro_lwflow.coordinates import BoxCoordinates, Standardize, box_coordinates
from pyro_lwflow.modes import find_modes

LOW, HIGH = torch.tensor([-12.0, 0.0, 0.0]), torch.tensor([12.0, 1.0, 1.0])
MASK = torch.tensor([True, True, False])
POINTS = torch.tensor(
    [[-40.0, -0.3, 3.0], [0.0, 0.5, 1.0], [11.5, 0.97, -2.0], [-11.0, 0.02, 0.0], [60.0, 3.0, 1.0]],
    dtype=torch.float64,
)  # interior, both tails, far beyond the edges


def test_identity_in_theta_on_the_interior_and_inverse_everywhere():
    t = BoxCoordinates(LOW, HIGH, MASK, margin=0.05)
    z = t(POINTS)
    assert torch.isfinite(z).all()
    assert torch.allclose(t.inv(z), POINTS, atol=1e-9)
    theta = biject_to(constraints.interval(-12.0, 12.0))(z[:, 0])
    assert torch.allclose(theta[1], torch.tensor(0.0, dtype=theta.dtype)) and (theta.abs() < 12).all()
    inside = torch.tensor([-10.0, -3.0, 7.0, 10.7], dtype=torch.float64)  # margin 1.2 at each edge
    y = torch.stack([inside, torch.full_like(inside, 0.5), inside], -1)
    assert torch.allclose(biject_to(constraints.interval(-12.0, 12.0))(t(y)[:, 0]), inside, atol=1e-9)
    assert torch.equal(t(POINTS)[:, 2], POINTS[:, 2])  # masked out: untouched


def test_log_det_against_autograd():
    t = BoxCoordinates(LOW, HIGH, MASK, margin=0.1)
    for row in POINTS:
        J = jacobian(lambda v: t(v.unsqueeze(0)).squeeze(0), row)
        expected = torch.linalg.slogdet(J)[1]
        assert torch.allclose(t.log_abs_det_jacobian(row.unsqueeze(0), t(row.unsqueeze(0))), expected, atol=1e-9)


def test_gradients_finite_far_in_the_tails():
    t = BoxCoordinates(LOW, HIGH, MASK)
    y = (POINTS * 10).float().requires_grad_()
    (t(y).sum() + t.log_abs_det_jacobian(y, t(y)).sum()).backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("margin", [0.0, 0.5, -0.1])
def test_margin_must_leave_an_interior(margin):
    with pytest.raises(ValueError, match="margin"):
        BoxCoordinates(LOW, HIGH, MASK, margin=margin)


def test_bounded_sites_are_found_in_the_packed_layout():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("p", 2):
            b = pyro.sample("b", dist.Uniform(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 5.0])))
        c = pyro.sample("c", dist.Beta(2.0, 2.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        pyro.factor("lik", -(a**2) - b.sum() - c.sum() - s)

    guide = AutoLWFlow(model)
    guide()
    t = box_coordinates(guide.prototype_trace, guide.layout)
    order = [site.name for site in guide.layout]
    assert order == ["a", "b", "c", "s"]
    assert t.mask.tolist() == [False, True, True, True, True, False]
    assert torch.equal(t.low[1:5], torch.tensor([-1.0, 0.0, 0.0, 0.0]))
    assert torch.equal((t.low + t.width)[1:5], torch.tensor([1.0, 5.0, 1.0, 1.0]))


def test_guide_density_is_the_same_distribution_in_either_coordinates():
    # with the couplings at the identity, a standard mixture in y pushed to θ: both settings give
    # a normalised density on the box, and box_margin=None is exactly Pyro's logit coordinates
    def model():
        theta = pyro.sample("theta", dist.Uniform(-3.0, 3.0))
        pyro.factor("lik", -theta**2)

    grid = torch.linspace(-3 + 1e-4, 3 - 1e-4, 20_001)
    for margin in (None, 0.05):
        guide = AutoLWFlow(model, num_components=1, box_margin=margin)
        guide()
        with torch.no_grad():
            density = guide.log_density({"theta": grid}).exp()
        assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 1e-3


def test_standardize_maps_the_draws_to_mean_zero_spread_one():
    t = Standardize(2)
    s = torch.randn(100, 2)
    assert torch.equal(t(s), s)  # the identity until fitted
    y = torch.randn(5000, 2) * torch.tensor([10.0, 0.01]) + torch.tensor([3.0, -7.0])
    t.fit_(y)
    z = t.inv(y)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-4) and torch.allclose(z.std(0), torch.ones(2), atol=1e-4)
    assert torch.allclose(t(z), y, atol=1e-4)
    J = jacobian(lambda v: t(v.unsqueeze(0)).squeeze(0), z[0])
    assert torch.allclose(t.log_abs_det_jacobian(z[:3], y[:3]), torch.linalg.slogdet(J)[1].expand(3), atol=1e-5)


def test_guide_modes_are_found_in_model_units_and_kept_across_a_reset():
    # three modes along x, a broad unimodal y: after standardising, the modes would sit only
    # ~1.2 spreads apart; they are found before, and the mixture placed in the flow's coordinates
    def model():
        x = pyro.sample("x", dist.Uniform(-12.0, 12.0).expand([2]).to_event(1))
        mix = dist.MixtureSameFamily(
            dist.Categorical(torch.ones(3)),
            dist.Normal(torch.tensor([[-6.0, 0.0], [0.0, 0.0], [6.0, 0.0]]), torch.tensor([0.7, 2.0])).to_event(1),
        )
        pyro.factor("lik", mix.log_prob(x))

    guide = AutoLWFlow(model, num_components=3)
    loss = LikelihoodWeightedKL(num_prior_samples=100_000)
    loss.prepare(model, guide)
    standardize = guide.standardize
    with torch.no_grad():
        centres = standardize(guide.component_loc)[:, 0].sort().values  # in model units (interior: θ)
    assert torch.allclose(centres, torch.tensor([-6.0, 0.0, 6.0]), atol=0.4)
    assert 4.0 < float(standardize.scale[0]) < 6.0  # the spread of x across its three modes
    before = standardize.state_dict()
    guide.reset(loss.draws, find_modes(guide, loss.draws))
    assert all(torch.equal(v, guide.standardize.state_dict()[k]) for k, v in before.items())
