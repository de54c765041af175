"""bench/optimizer_step.py, with tiny arguments: it prints every ratio, the meta-update's included, for both shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_bench_prints_the_step_state_and_meta_update_ratios(tmp_path):
    env = dict(os.environ, AUTORESEARCH_PRESET="cpu", AUTORESEARCH_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "bench.optimizer_step", "--rounds", "1", "--warmup", "0",
                           "--meta-repeats", "1", "--gpu-width", "32"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    values = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    for key in ("step_time_ratio_deepnested_over_muon", "state_memory_ratio_deepnested_over_muon",
                *(f"{shape}_meta_update_{ratio}_ratio" for shape in ("cpu", "gpu") for ratio in ("time", "memory"))):
        assert float(values[key]) > 0, key
