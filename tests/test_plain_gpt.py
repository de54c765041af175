"""Smoke test of bench/plain_gpt.py, the reference loop the cpu preset must beat: a one-second run on the
builtin data ends with its key: value block, and a different seed trains a different model."""

from __future__ import annotations

import math


def summary(stdout: str) -> dict[str, str]:
    block = stdout.split("---\n")[-1]
    return dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)


def test_plain_gpt_trains_and_reports(prepared_builtin, run_python):
    runs = [run_python("-m", "bench.plain_gpt", "--seconds", "1", "--seed", seed) for seed in ("1", "2")]

    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    first, second = (summary(run.stdout) for run in runs)
    assert {"val_bpb", "val_loss", "num_steps", "tokens_per_second", "num_params_M"} <= first.keys()
    assert int(first["num_steps"]) >= 1
    assert math.isfinite(float(first["val_bpb"])) and 0 < float(first["val_bpb"]) < 20
    assert first["val_bpb"] != second["val_bpb"]
