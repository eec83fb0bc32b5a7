"""The paper-reproduction benchmark runs end to end at tiny budgets and writes its tables and figures."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("kl", "w1_avg", "sliced_w", "bridge_mass", "mode_weight_error")


@pytest.mark.slow
def test_paper_benchmark_quick(tmp_path):
    cmd = [sys.executable, "benchmarks/paper.py", "--quick", "--seeds", "2", "--workers", "1",
           "--targets", "single_mode_2d", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=2400)

    report = json.loads((tmp_path / "paper.json").read_text())
    impls = {"pyro_lwflow", "normflows"} if importlib.util.find_spec("normflows") else {"pyro_lwflow"}
    assert {r["impl"] for r in report["records"]} == impls
    assert {(r["target"], r["k"]) for r in report["records"]} == {("single_mode_2d", 1)}
    for record in report["records"]:
        assert set(METRICS) <= record.keys() and record["wall_s"] > 0 and record["likelihood_evals"] > 0
    cell = report["aggregate"]["pyro_lwflow"]["single_mode_2d"]["1"]
    assert cell["kl"]["n"] == 2 and {"mean", "std"} <= cell["w1_avg"].keys()
    assert set(METRICS) <= report["noise_floors"]["single_mode_2d"].keys()
    assert report["meta"]["command"].startswith("python benchmarks/paper.py --quick")

    table = (tmp_path / "paper.md").read_text()
    assert "## Table 1" in table and "0.0904" in table  # the paper's published w1_avg beside ours
    for name in report["meta"]["figures"]:
        assert (tmp_path / name).stat().st_size > 0
    assert "fig_truth_2d.png" in report["meta"]["figures"]


@pytest.mark.slow
def test_high_dim_benchmark_quick_over_seeds(tmp_path):
    cmd = [sys.executable, "benchmarks/high_dim.py", "--quick", "--targets", "two_mode_2d", "--seeds", "2",
           "--no-dynesty", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=2400)

    report = json.loads((tmp_path / "high_dim_quick.json").read_text())
    rows = report["rows"]
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in ("one-shot (paper)", "adaptive, auto K", "adaptive, true K") for s in (0, 1)
    }
    for r in rows:
        assert r["target"] == "two_mode_2d" and r["likelihood_evals"] <= 50_000 and r["w1_avg"] > 0
    table = (tmp_path / "high_dim_quick.md").read_text()
    assert "## Mean over seeds" in table and "| two_mode_2d | adaptive, auto K |" in table


@pytest.mark.slow
def test_amortized_modes_benchmark_smoke(tmp_path):
    cmd = [sys.executable, "benchmarks/amortized_modes.py", "--targets", "two_mode_2d", "--sims", "1000",
           "--data-sets", "2", "--repeats", "1", "--max-epochs", "3", "--seeds", "0", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=2400)

    report = json.loads((tmp_path / "amortized_modes.json").read_text())
    assert [(r["target"], r["components"]) for r in report["rows"]] == [("two_mode_2d", 2), ("two_mode_2d", 1)]
    for row in report["rows"]:
        assert len(row["per_data_set"]) == 2 and 0 <= row["bridge_mass"] <= 1 and row["w1_over_floor"] > 0
    assert "| two_mode_2d | 2 |" in (tmp_path / "amortized_modes.md").read_text()
