import math

import torch

from pyro_lwflow import metrics


def test_w1_of_a_shift_is_the_shift():
    x = torch.randn(5000, 2)
    assert math.isclose(metrics.w1_avg(x, x + torch.tensor([0.3, 0.1])), 0.2, rel_tol=1e-6)


def test_sliced_w_is_zero_for_identical_sets_and_positive_otherwise():
    x = torch.randn(2000, 3)
    assert metrics.sliced_w(x, x) < 1e-12
    assert metrics.sliced_w(x, x + 1.0) > 0.5


def test_kl_of_known_gaussians():
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.5, 1.0)
    x = p.sample((200_000,))
    assert math.isclose(metrics.kl_divergence(p.log_prob(x), q.log_prob(x)), 0.125, abs_tol=0.01)


def test_bridge_mass_of_the_truth_is_a_tenth_of_a_percent_and_of_a_bridge_is_large():
    p = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    log_p = lambda x: p.log_prob(x).sum(-1)  # noqa: E731
    exact = p.sample((20000,))
    assert abs(metrics.bridge_mass(log_p, exact, p.sample((20000,))) - 0.001) < 0.001
    assert metrics.bridge_mass(log_p, exact, 4 + p.sample((20000,))) > 0.5


def test_mode_weight_error():
    means = torch.tensor([[-5.0], [5.0]])
    comp = lambda x: torch.distributions.Normal(means.T, 1.0).log_prob(x)  # noqa: E731
    approx = torch.cat([torch.full((700, 1), -5.0), torch.full((300, 1), 5.0)])
    assert math.isclose(metrics.mode_weight_error(comp, torch.tensor([0.5, 0.5]), approx), 0.2, abs_tol=1e-9)


def test_noise_floor_is_the_median_of_repeats():
    def sample(n, seed):
        return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))

    floor = metrics.noise_floor(sample, metrics.w1_avg, num_samples=2000, repeats=5)
    assert 0.005 < floor < 0.08
