import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_lwflow.flows import marginal_spline, realnvp


def _randomise(transform):
    with torch.no_grad():
        for p in transform.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_starts_at_identity(dim):
    t = realnvp(dim, num_transforms=5)
    x = torch.randn(100, dim)
    assert torch.equal(t(x), x)
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), torch.zeros(100))


@pytest.mark.parametrize("dim", [2, 3, 6])
def test_inverse_and_log_det_against_autograd(dim):
    torch.manual_seed(1)
    t = realnvp(dim, num_transforms=4, hidden_dims=(16,))
    _randomise(t)
    x = torch.randn(20, dim, dtype=torch.float64)
    t = t.double()
    y = t(x)
    assert torch.allclose(t.inv(y.detach().clone()), x, atol=1e-4)
    for i in range(5):
        jac = jacobian(lambda v: t(v.unsqueeze(0)).squeeze(0), x[i])
        expected = torch.linalg.slogdet(jac).logabsdet
        assert torch.allclose(t.log_abs_det_jacobian(x[i : i + 1], y[i : i + 1]).squeeze(), expected, atol=1e-3)


def test_log_scale_is_bounded():
    torch.manual_seed(2)
    t = realnvp(2, num_transforms=1, log_scale_bound=1.5)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 50.0)
    x = torch.randn(1000, 2) * 10
    ladj = t.log_abs_det_jacobian(x, t(x))
    assert torch.isfinite(ladj).all() and ladj.abs().max() <= 1.5 + 1e-5


def test_permutations_are_rebuilt_identically():
    a, b = realnvp(7, num_transforms=5), realnvp(7, num_transforms=5)
    b.load_state_dict(a.state_dict())
    _randomise(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 7)
    assert torch.equal(a(x), b(x))


def test_every_parameter_gets_a_gradient():
    t = realnvp(4, num_transforms=3, hidden_dims=(8,))
    _randomise(t)
    x = torch.randn(64, 4)
    (t(x).pow(2).sum() + t.log_abs_det_jacobian(x, t(x)).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.parameters())


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 7, 10])
def test_every_coordinate_conditions_a_coupling(dim):
    # a coordinate that never conditions a coupling is only ever transformed affinely: its
    # marginal stays Gaussian and the log-determinant cannot depend on it
    t = realnvp(dim, num_transforms=6, hidden_dims=(8,))
    _randomise(t)
    x = torch.randn(256, dim, requires_grad=True)
    t.log_abs_det_jacobian(x, t(x)).sum().backward()
    assert (x.grad.abs().sum(0) > 0).all()


def test_one_dimensional_latent_has_an_empty_stack_with_per_draw_log_det():
    t = realnvp(1)
    x = torch.randn(7, 1)
    assert len(t.parts) == 0 and torch.equal(t(x), x)
    assert t.log_abs_det_jacobian(x, x).shape == (7,)


@pytest.mark.parametrize("dim", [1, 3])
def test_marginal_spline_starts_at_identity_and_inverts(dim):
    spline = marginal_spline(dim, count_bins=8, bound=4.0)
    x = torch.randn(200, dim, dtype=torch.float64) * 3  # inside and outside the spline's ±4
    spline = spline.double()
    assert torch.allclose(spline(x), x, atol=1e-3)  # Pyro pins the end slopes at 1 − 1e-3
    _randomise(spline)
    x = x.clone()  # a new tensor: the transform caches its last call
    y = spline(x)
    assert not torch.allclose(y, x, atol=1e-2)
    assert torch.allclose(spline.inv(y.detach().clone()), x, atol=1e-6)
    # elementwise: the log-determinant is the log of each coordinate's own slope
    x = x.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(spline(x).sum(), x)
    assert torch.allclose(spline.log_abs_det_jacobian(x, y), slope.abs().log(), atol=1e-6)


def test_whole_guide_transform_inverts_and_has_the_autograd_log_det():
    """Contract of the guide's full map from the base to Pyro's unconstrained coordinates:
    couplings, marginal spline, Standardize and BoxCoordinates, all away from the identity."""
    import pyro
    import pyro.distributions as dist

    from pyro_lwflow import AutoLWFlow
    from pyro_lwflow.coordinates import BoxCoordinates, Standardize

    def model():
        a = pyro.sample("a", dist.Uniform(-3.0, 5.0).expand([2]).to_event(1))  # bounded: box coordinates
        b = pyro.sample("b", dist.Normal(0.0, 2.0))  # unbounded: passes through the box map
        pyro.factor("lik", -(a - 1).pow(2).sum() - b**2)

    guide = AutoLWFlow(model, num_components=2, num_transforms=3, hidden_dims=(16,), marginal_bins=8)
    guide()
    transform = guide.get_transform()
    kinds = {type(p).__name__ for p in transform.parts}
    assert {"AffineCoupling", "Spline", "Standardize", "BoxCoordinates"} <= kinds
    box = next(p for p in transform.parts if isinstance(p, BoxCoordinates))
    assert box.mask.tolist() == [True, True, False]
    torch.manual_seed(3)
    _randomise(transform)  # every coupling and spline parameter off the identity
    next(p for p in transform.parts if isinstance(p, Standardize)).fit_(
        torch.randn(500, 3) * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor([1.0, -2.0, 0.5])
    )
    transform = transform.double()
    x = torch.randn(40, 3, dtype=torch.float64) * 1.5  # spline interior and beyond its ±4 bound
    z = transform(x)
    assert torch.isfinite(z).all() and not torch.allclose(z, x, atol=1e-1)
    assert torch.allclose(transform.inv(z.detach().clone()), x, atol=1e-4)
    ladj = transform.log_abs_det_jacobian(x, z)
    for i in range(10):
        jac = jacobian(lambda v: transform(v.unsqueeze(0)).squeeze(0), x[i].clone())
        assert torch.allclose(ladj[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-3)
