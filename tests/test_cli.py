"""The lwflow command line: end-to-end fits of bundled models, data files, clear input errors."""

import inspect
import json
import subprocess
import sys

import arviz as az
import numpy as np
import pytest
import torch

from pyro_lwflow import Schedule, cli, fit, models
from pyro_lwflow.model_files import BUNDLED_MODELS, load_model

SMALL = ["--steps", "30", "--initial-draws", "10000", "--batch-size", "256", "--num-samples", "400", "--quiet",
         "--rounds", "1", "--starts", "prior"]


def test_fit_a_bundled_model_with_truth(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["fit", "paper_targets.py:two_mode_2d", "--components", "2", "--out", str(out), *SMALL]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"posterior.nc", "summary.csv", "pair_plot.png", "training_curves.png", "metrics.json",
            "guide.lwflow"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ess", "log_evidence", "wall_time_s", "kl", "w1_avg", "sliced_w", "bridge_mass",
                "mode_weight_error"):
        assert np.isfinite(metrics[key]), key
    assert metrics["num_components"] == 2 and metrics["num_likelihood_evals"] >= 10_000
    idata = az.from_netcdf(str(out / "posterior.nc"))
    assert idata.posterior["theta"].shape == (4, 100, 2)
    idata.close()
    assert (out / "summary.csv").read_text().splitlines()[1].startswith("theta[0],")
    assert "metrics.json" in capsys.readouterr().out


def test_fit_with_a_data_file(tmp_path):
    y = np.array([1.2, 0.4, 2.1], dtype=np.float64)  # few points: a broad posterior, ESS in the hundreds
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "out"
    assert cli.main(["fit", "normal_scale", "--data", str(tmp_path / "y.npy"), "--out", str(out), *SMALL,
                     "--initial-draws", "20000", "--components", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "kl" not in metrics and np.isfinite(metrics["log_evidence"])
    idata = az.from_netcdf(str(out / "posterior.nc"))
    np.testing.assert_allclose(idata.observed_data["y"].values, y.astype(np.float32))
    assert set(idata.posterior.data_vars) == {"mu", "sigma"}
    idata.close()


def test_data_file_conventions(tmp_path):
    y = np.arange(6.0).reshape(3, 2)
    np.savez(tmp_path / "pos.npz", y, np.array([1, 2]))  # arr_0, arr_1: positional
    args, kwargs = cli.read_data(tmp_path / "pos.npz")
    assert len(args) == 2 and kwargs == {} and args[0].dtype == torch.float32 and args[1].dtype == torch.int64
    np.savez(tmp_path / "kw.npz", arg0=y, num_data=np.array(3))
    args, kwargs = cli.read_data(tmp_path / "kw.npz")
    assert torch.equal(args[0], torch.tensor(y, dtype=torch.float32)) and int(kwargs["num_data"]) == 3
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    (args,), _ = cli.read_data(tmp_path / "t.csv")
    assert args.shape == (3, 2)
    (tmp_path / "c.csv").write_text("1.5\n2.5\n")
    (args,), _ = cli.read_data(tmp_path / "c.csv")
    assert args.shape == (2,)
    torch.save({"y": torch.ones(4)}, tmp_path / "d.pt")
    assert cli.read_data(tmp_path / "d.pt")[1]["y"].shape == (4,)


def _error(capsys, argv):
    status = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("lwflow: error:"), err
    return err


def test_input_errors_are_one_line_and_status_2(tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["fit", str(tmp_path / "nope.py")])
    broken = tmp_path / "broken.py"
    broken.write_text("def model(:\n")
    assert "could not be loaded" in _error(capsys, ["fit", str(broken)])
    good = str(BUNDLED_MODELS / "paper_targets.py")
    assert "no model function 'nope'" in _error(capsys, ["fit", good + ":nope"])
    assert "--components" in _error(capsys, ["fit", good + ":two_mode_2d", "--components", "0"])
    (tmp_path / "bad.npy").write_text("not numpy")
    assert "could not be read" in _error(capsys, ["fit", "normal_scale.py", "--data", str(tmp_path / "bad.npy")])
    assert "must end in" in _error(capsys, ["fit", "normal_scale.py", "--data", str(broken)])


def test_console_script_error_and_help():
    """The real entry point: a bad path gives one line on stderr and status 2, no traceback."""
    run = subprocess.run([sys.executable, "-m", "pyro_lwflow.cli", "fit", "no/such/model.py"],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["lwflow: error: model file 'no/such/model.py' does not exist "
                                               "(try 'lwflow models' for the bundled ones)"]
    help_text = subprocess.run([sys.executable, "-m", "pyro_lwflow.cli", "fit", "--help"],
                               capture_output=True, text=True, timeout=1200).stdout
    assert "--data files become the model's arguments" in help_text and "--components" in help_text


def test_models_lists_the_bundled_models(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "paper_targets.py:two_mode_2d" in out and "normal_scale.py:model" in out
    assert str(models.DIRECTORY) in out


def test_fit_options_default_to_fits_own(capsys):
    """``lwflow fit`` with no options trains exactly as ``fit(model)`` does, and its help says so."""
    parsed = cli._parser().parse_args(["fit", "paper_targets.py:two_mode_2d"])
    params = inspect.signature(fit).parameters
    given = {"num_components": cli._components(parsed.components), "batch_size": parsed.batch_size, "lr": parsed.lr,
             "seed": parsed.seed}
    assert given == {name: params[name].default for name in given}
    planned = Schedule(num_rounds=cli._components(parsed.rounds), num_steps=parsed.steps, budget=parsed.budget,
                       initial_draws=parsed.initial_draws, starts=parsed.starts)
    assert planned == Schedule()
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"later rounds warm-start (default {Schedule().num_steps})" in help_text
    assert f"(default {params['num_components'].default})" in help_text


def test_bundled_models_load_by_name_and_by_path():
    by_name = models.load("paper_targets:three_mode_2d")
    assert models.load("paper_targets.py:three_mode_2d") is by_name
    assert load_model(f"{models.DIRECTORY / 'paper_targets.py'}:three_mode_2d") is by_name
    assert cli._load_model("paper_targets.py:three_mode_2d") is by_name
    assert {"paper_targets:three_mode_2d", "normal_scale:model", "high_dim:gmm_5d"} <= set(models.names())
    with pytest.raises(FileNotFoundError, match="the examples are: .*paper_targets"):
        models.load("no_such_file:model")
    with pytest.raises(AttributeError, match="no model function 'nope'"):
        models.load("paper_targets:nope")


def test_bench_runs_the_script_or_says_it_is_missing(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or 0)
    monkeypatch.setattr(cli, "BENCHMARKS", {"paper": "paper.py", "high-dim": "surely_missing_benchmark.py"})
    if (cli.SOURCE_ROOT / "benchmarks" / "paper.py").is_file():
        assert cli.main(["bench", "paper", "--quick"]) == 0
        assert calls[0][0] == sys.executable and calls[0][1].endswith("paper.py") and calls[0][2:] == ["--quick"]
    assert "is not available" in _error(capsys, ["bench", "high-dim"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonsense"])


def test_example_data_as_a_tuple_gives_the_positional_arguments(tmp_path):
    """``.example_data()`` may return the tuple of positional arguments (``models/real_models.py``)
    or the one argument (``models/ode_models.py``)."""
    source = tmp_path / "two_args.py"
    source.write_text(
        "import pyro, pyro.distributions as dist, torch\n"
        "def model(x, y):\n"
        "    b = pyro.sample('b', dist.Normal(0.0, 3.0))\n"
        "    with pyro.plate('data', len(y)):\n"
        "        pyro.sample('y', dist.Normal(b * x, 1.0), obs=y)\n"
        "model.example_data = lambda: (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.9, 2.2, 2.8]))\n"
    )
    out = tmp_path / "out"
    assert cli.main(["fit", str(source), "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_likelihood_evals"] == 10_000
