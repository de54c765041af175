"""Smoke test of bench/probe_cost.py with tiny arguments: it runs as a module and prints its keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KEYS = ("probe_seconds_median", "probe_cost_per_run_seconds", "probe_cost_percent_of_300s_run",
        "probe_ratio_under_hog", "probe_startup_seconds_once")


def test_probe_cost_prints_its_keys() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.probe_cost", "--probes", "2", "--hog-probes", "1"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    values = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    for key in KEYS:
        assert float(values[key]) > 0, key
    assert values["device"] == "cpu"


def test_probe_cost_runs_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.probe_cost", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--hog-probes" in done.stdout, done.stderr
