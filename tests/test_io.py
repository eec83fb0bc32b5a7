"""Save/load of fitted guides: identical draws after loading, atomic writes, unsafe files refused."""

import pickle

import pyro
import pytest
import torch

from pyro_lwflow import Schedule, fit, io

from .toy_models import factor_model, scale_model

TARGET = torch.tensor([1.0, -0.5])


def small_fit(model, *args, **kwargs):
    return fit(model, *args, schedule=Schedule.one_shot(5000, num_steps=30), batch_size=256, progress=False, **kwargs)


@pytest.fixture(scope="module")
def fitted():
    pyro.set_rng_seed(0)
    return small_fit(factor_model, TARGET, num_components=2)


def draws_and_density(guide, seed=7):
    pyro.set_rng_seed(seed)
    theta = guide.sample_posterior(200)["theta"]
    with torch.no_grad():
        return theta, guide.log_density({"theta": theta})  # a pyro_method: goes through the param store


def test_round_trip_gives_identical_draws(fitted, tmp_path):
    before = draws_and_density(fitted.guide)
    path = io.save(fitted, tmp_path / "fit.lwflow")
    # change the original's values (they are also what Pyro's param store holds by these names)
    with torch.no_grad():
        for p in fitted.guide.parameters():
            p.add_(0.3)
    try:
        guide = io.load(path, factor_model, TARGET)
        after = draws_and_density(guide)
    finally:
        with torch.no_grad():
            for p in fitted.guide.parameters():
                p.sub_(0.3)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[1], after[1])
    assert guide.component_loc.shape == (2, 2) and guide.initialized
    config = io.load_config(path)
    assert config["format"] == io.FORMAT and config["num_components"] == 2
    assert config["fit"]["losses"] == pytest.approx(fitted.losses)
    assert config["fit"]["log_evidence"] == pytest.approx(fitted.log_evidence)
    assert config["fit"]["num_likelihood_evals"] == fitted.num_likelihood_evals


def test_auto_components_and_a_bare_guide(tmp_path):
    y = torch.tensor([0.3, 1.1, -0.4, 0.8])
    result = small_fit(scale_model, y, num_components="auto")
    k = result.guide.component_loc.shape[0]
    io.save(result.guide, tmp_path / "g.lwflow")  # a guide alone: no fit summary
    assert "fit" not in io.load_config(tmp_path / "g.lwflow")
    guide = io.load(tmp_path / "g.lwflow", scale_model, y)
    assert guide.component_loc.shape[0] == k and guide.num_components == k
    pyro.set_rng_seed(1)
    a = result.guide.sample_posterior(50)
    pyro.set_rng_seed(1)
    b = guide.sample_posterior(50)
    assert all(torch.equal(a[name], b[name]) for name in ("loc", "scale"))


def test_atomic_write_leaves_no_partial_file(fitted, tmp_path, monkeypatch):
    path = tmp_path / "fit.lwflow"
    io.save(fitted, path)
    good = path.read_bytes()
    io.save(fitted, path)  # overwriting works
    assert [p.name for p in tmp_path.iterdir()] == ["fit.lwflow"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save(fitted, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["fit.lwflow"]


class _Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"format": io.FORMAT, "x": _Payload(marker)}))
    zipped = tmp_path / "zipped.lwflow"
    torch.save({"format": io.FORMAT, "config": "{}", "state_dict": {}, "x": _Payload(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(ValueError, match="nothing in it was run"):
            io.load(path, factor_model, TARGET)
    assert not marker.exists()


def test_corrupt_foreign_and_mismatched_files(fitted, tmp_path):
    good = io.save(fitted, tmp_path / "fit.lwflow")
    truncated = tmp_path / "truncated.lwflow"
    truncated.write_bytes(good.read_bytes()[:500])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path, match in [
        (truncated, "not a pyro_lwflow guide file"),
        (foreign, "expected format"),
        (text, "not a pyro_lwflow guide file"),
        (tmp_path / "missing.lwflow", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=match):
            io.load(path, factor_model, TARGET)
    y = torch.tensor([0.3, 1.1])
    with pytest.raises(ValueError, match="latent sites"):
        io.load(good, scale_model, y)  # saved for another model


def test_unfitted_guide_cannot_be_saved(tmp_path):
    from pyro_lwflow import AutoLWFlow

    with pytest.raises(ValueError, match="not been fitted"):
        io.save(AutoLWFlow(factor_model), tmp_path / "g.lwflow")
    with pytest.raises(TypeError, match="a FitResult, an AutoLWFlow or an AmortizedLWFlow, got str"):
        io.save("nonsense", tmp_path / "g.lwflow")
