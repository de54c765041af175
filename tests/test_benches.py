"""Every bench runs as `python -m bench.<name>` with tiny arguments, prints its numbers and exits 0; a
broken bench fails here instead of printing numbers for runs that did not happen."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

BENCHES = ["loop_overhead", "guard_cost", "throughput", "parallel_scaling"]  # the Python benches this file smoke-tests


def values(stdout: str) -> dict[str, str]:
    """The bench's `key: value` lines."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def numbers(found: dict[str, str], *keys: str) -> list[float]:
    """The values of these keys, each a finite number."""
    result = [float(found[key]) for key in keys]
    assert all(math.isfinite(value) for value in result), found
    return result


@pytest.mark.parametrize("bench", BENCHES)
def test_a_bench_runs_as_a_module_and_explains_itself(bench, run_python):
    result = run_python("-m", f"bench.{bench}", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


@pytest.mark.slow
def test_parallel_scaling_runs_one_and_two_slots_and_compares_them(run_python, prepared_builtin):
    result = run_python("-m", "bench.parallel_scaling", "--slots", "1,2", "--sleep", "0", "--rounds", "1", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    found = values(result.stdout)
    one, two, scaling = numbers(found, "slots_1_experiments_per_hour", "slots_2_experiments_per_hour",
                                "slots_2_scaling_per_slot")
    assert one > 0 and two > 0 and scaling > 0
    assert found["slots_1_scaling_per_slot"] == "1.000"


@pytest.mark.slow
def test_loop_overhead_runs_every_experiment_and_breaks_the_time_down(run_python, prepared_builtin):
    # the bench prepares its own cache; the session's is there so an older bench that needs one fails for its bug
    result = run_python("-m", "bench.loop_overhead", "--experiments", "1", timeout=900)

    assert result.returncode == 0, result.stdout + result.stderr
    found = values(result.stdout)
    assert found["experiments"] == "1" and found["runs"] == "3"  # two baselines, then the experiment
    overhead, train_seconds, git, guard = numbers(found, "overhead_seconds_per_experiment",
                                                  "train_process_seconds_per_run", "git_seconds_per_experiment",
                                                  "guard_seconds_per_experiment")
    assert overhead > 0 and train_seconds > 0 and git > 0
    assert guard > 0  # the first baseline's checkpoint is re-evaluated in a fresh process


@pytest.mark.slow
def test_throughput_times_both_steps(run_python, prepared_builtin):
    result = run_python("-m", "bench.throughput", "--steps", "1", "--rounds", "1", timeout=900)

    assert result.returncode == 0, result.stdout + result.stderr
    found = values(result.stdout)
    assert found["preset"] == "cpu"
    train_tps, bare_tps, ratio = numbers(found, "train_step_tokens_per_second", "bare_adamw_tokens_per_second",
                                         "train_over_bare_ratio")
    assert train_tps > 0 and bare_tps > 0 and ratio > 0


@pytest.mark.slow
def test_guard_cost_times_every_check_on_a_real_run(run_python, prepared_builtin):
    result = run_python("-m", "bench.guard_cost", "--budget", "2", timeout=900)

    assert result.returncode == 0, result.stdout + result.stderr
    found = values(result.stdout)
    assert found["verify_problem"] == "none" and found["checks_found"] == "nothing"
    reported, reevaluated = numbers(found, "reported_val_bpb", "reevaluated_val_bpb")
    assert reevaluated == pytest.approx(reported, abs=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_a_gpu_in_one_sentence():
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "gpu_check: no CUDA device here."
    assert result.stdout == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_trains_and_times_the_optimizer(tmp_path):
    prepare = subprocess.run([sys.executable, "prepare.py", "--source", "builtin"], cwd=REPO_ROOT,
                             env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 0, prepare.stderr
    result = subprocess.run(["bash", "bench/gpu_check.sh", "10"], cwd=REPO_ROOT, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| val_bpb |" in result.stdout


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "AUTORESEARCH_PRESET": "gpu", "AUTORESEARCH_CACHE": str(tmp_path / "cache"),
            "OUT": str(tmp_path / "out")}
