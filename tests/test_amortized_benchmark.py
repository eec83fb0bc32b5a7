"""benchmarks/amortized.py: fixed simulations per task × budget, and runs that merge by method.

The methods themselves need sbi and sbibm (the bench environment); the smoke test at the end runs
only where they are installed. The rest runs with stand-in methods and references.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "amortized.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("amortized_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulations_are_the_same_in_every_run_and_differ_across_budgets(bench):
    theta, x, info = bench.simulate("slcp", 300)
    theta2, x2, info2 = bench.simulate("slcp", 300)
    assert theta.shape == (300, 5) and x.shape == (300, 8)
    assert torch.equal(theta, theta2) and torch.equal(x, x2) and info == info2
    _, _, other = bench.simulate("slcp", 301)
    assert other["seed"] != info["seed"] and other["fingerprint"] != info["fingerprint"]
    assert bench.simulation_seed("two_moons", 10_000) == bench.simulation_seed("two_moons", 10_000)


class _Reference:
    def __init__(self, task):
        self.task = task


def _fake(method, value):
    def run(task, theta, x, ref, observations, draws, seed, quick=False):
        per_obs = [{"observation": i, "c2st": value, "ms": 1.0} for i in observations]
        extra = {}
        if method == "lwflow":
            for o in per_obs:
                o.update(c2st_corrected=value - 0.01, efficiency=0.5, pareto_k=0.3, likelihood_evals=draws)
            extra = {"c2st_corrected": value - 0.01, "likelihood_evals_per_observation": draws,
                     "median_efficiency": 0.5}
        return {"train_s": 1.0, "per_observation": per_obs, "c2st": value, "ms_per_observation": 1.0,
                "fingerprint_seen": [float(theta.sum()), float(x.sum())], **extra}

    return run


def test_a_run_of_one_method_keeps_the_other_methods_rows(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Reference", _Reference)
    monkeypatch.setitem(bench.RUNNERS, "sbi", _fake("sbi", 0.61))
    monkeypatch.setitem(bench.RUNNERS, "lwflow", _fake("lwflow", 0.55))
    common = ["--tasks", "two_moons", "--sims", "200", "--observations", "1", "2", "--draws", "100",
              "--out", str(tmp_path)]
    bench.main(["--methods", "sbi", *common])
    first = json.loads((tmp_path / "amortized.json").read_text())
    assert set(first["rows"]) == {"two_moons|200|sbi"}
    bench.main(["--methods", "lwflow", *common])
    data = json.loads((tmp_path / "amortized.json").read_text())
    assert set(data["rows"]) == {"two_moons|200|sbi", "two_moons|200|lwflow"}
    sbi, ours = data["rows"]["two_moons|200|sbi"], data["rows"]["two_moons|200|lwflow"]
    assert sbi == first["rows"]["two_moons|200|sbi"] and sbi["run"] == 0 and ours["run"] == 1
    assert sbi["fingerprint_seen"] == ours["fingerprint_seen"]  # the very same simulations
    assert len(data["runs"]) == 2 and data["simulations"]["two_moons|200"]["seed"] == sbi["seed"]
    table = (tmp_path / "amortized.md").read_text()
    assert "| two_moons | 200 | sbi | 0.610 |" in table and "| two_moons | 200 | lwflow | 0.550 | 0.540 |" in table


def test_a_failing_method_is_a_row_not_the_end_of_the_run(bench, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'amortize'")

    monkeypatch.setattr(bench, "Reference", _Reference)
    monkeypatch.setitem(bench.RUNNERS, "lwflow", broken)
    monkeypatch.setitem(bench.RUNNERS, "sbi", _fake("sbi", 0.7))
    bench.main(["--tasks", "gaussian_linear", "--sims", "100", "--observations", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "amortized.json").read_text())["rows"]
    assert "ImportError" in rows["gaussian_linear|100|lwflow"]["error"]
    assert rows["gaussian_linear|100|sbi"]["c2st"] == 0.7


def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("sbibm")
    pytest.importorskip("sbi")
    import subprocess

    cmd = [sys.executable, str(SCRIPT), "--quick", "--methods", "sbi", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=3000, cwd=SCRIPT.parents[1])
    data = json.loads((tmp_path / "amortized_quick.json").read_text())
    row = data["rows"]["two_moons|2000|sbi"]
    assert 0.5 <= row["c2st"] <= 1.0 and len(row["per_observation"]) == 2
