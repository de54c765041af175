"""The judge benches: their statistics on hand-made runs (every expected value worked out by hand), the runs
file, and smoke tests of bench/judge_power.py and bench/judge_null.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.judge import NoiseFloor, judge_greedy, judge_noise
from bench.judge_power import Sigmas, cast, decide, first_values, measure_sigmas, model_rate
from bench.judge_runs import MeasureError, Run, load_runs, measure, save_runs, source_sha256, variant_source

NULL = "MATRIX_LR*1.0001"


def run(variant: str, seed: int, value: float) -> Run:
    return Run(variant, seed, value, 500, 60.0, "builtin:test")


# base on seeds 42, 43, 44: 1.0, 1.2, 1.1; the null variant differs from base by +0.01, -0.01, +0.02
RUNS = [run("base", 42, 1.0), run("base", 43, 1.2), run("base", 44, 1.1), run("base", 42, 1.02),
        run(NULL, 42, 1.01), run(NULL, 43, 1.19), run(NULL, 44, 1.12)]
SEEDS = [42, 43, 44]


def test_the_sigmas_of_the_runs():
    sigmas = measure_sigmas(RUNS, SEEDS, [NULL])
    assert sigmas.same_seed == pytest.approx(0.0141421356)  # 1.0 and 1.02: 0.02 / sqrt(2)
    assert sigmas.cross_seed == pytest.approx(0.1)  # 1.0, 1.2, 1.1: deviations 0.1, 0.1 over 2 degrees
    # differences +0.01, -0.01, +0.02: mean 0.006667; squared deviations sum to 4.6667e-4, / 2, sqrt
    assert sigmas.null_paired_mean == pytest.approx(0.0066667, rel=1e-4)
    assert sigmas.null_paired == pytest.approx(0.0152753, rel=1e-4)


def test_a_variant_seed_pair_counts_its_first_run():
    assert first_values(RUNS)["base", 42] == 1.0


def test_greedy_cast_every_way_the_loop_would():
    # 2 baselines and 1 run: the 6 ordered seed pairs; the candidate's seed decides: only 43 (-0.01) is kept
    table = first_values(RUNS)
    rate = cast(table, SEEDS, [NULL], 0.0, judge_greedy, {}, repeats=2, max_runs=1)
    assert (rate.keeps, rate.runs, rate.cases) == (pytest.approx(1 / 3), 1.0, 6)
    # shifted by 0.015 the differences are -0.005, -0.025, +0.005: seeds 42 and 43 are kept
    shifted = cast(table, SEEDS, [NULL], 0.015, judge_greedy, {}, repeats=2, max_runs=1)
    assert shifted.keeps == pytest.approx(2 / 3)


def test_null_twins_set_the_bar_in_the_cast():
    # twin B differs from base by -0.02, +0.02, 0.00 on seeds 42, 43, 44: its paired sigma over the two baseline
    # seeds is 0.02 for (42, 43) and 0.014142 for pairs with 44, so the bar (k = 2) is 0.04 or 0.028284.
    # The candidate A shifted by 0.04 differs by -0.03, -0.05, -0.02: kept on orders (42, 44), (43, 42), (43, 44).
    twin = "EMBEDDING_LR*1.0001"
    table = first_values(RUNS + [run(twin, 42, 0.98), run(twin, 43, 1.22), run(twin, 44, 1.10)])
    options = dict(k=2.0, confirm_margin=0.0, max_runs=1)
    rate = cast(table, SEEDS, [NULL], 0.04, judge_noise, options, repeats=2, max_runs=1, twin=lambda _: twin)
    assert rate.keeps == pytest.approx(0.5)
    # without twins the bar is 2 x the cross-seed sigma of two baselines (at least 0.14): nothing is kept
    assert cast(table, SEEDS, [NULL], 0.04, judge_noise, options, repeats=2, max_runs=1).keeps == 0.0


def test_decide_confirms_on_the_next_seeds_until_the_bar_decides():
    # sigma 0.005, k 2, margin 0.5. Run 1: -0.008 lies between -0.005 and -0.015: confirm. Run 2: differences
    # -0.008, -0.010 (spread 0.0014 < 0.005), bar 0.0070711, confirm between -0.0035 and -0.0106: -0.009 confirms.
    # Run 3 is the last: bar 2 * 0.005 / sqrt(3) = 0.0057735, mean -0.011 is past it.
    options = dict(floor=NoiseFloor(0.005, 3), judge=dict(k=2.0, confirm_margin=0.5, max_runs=3))
    assert decide(judge_noise, [0.992, 0.990, 0.985], [1.0, 1.0, 1.0], options, 3) == ("keep", 3)
    assert decide(judge_noise, [1.0, 0.990, 0.985], [1.0, 1.0, 1.0], options, 3) == ("discard", 1)
    assert decide(judge_noise, [0.98, 1.0, 1.0], [1.0, 1.0, 1.0], options, 3) == ("keep", 1)  # clear: -0.02


def test_a_confirm_at_the_cap_is_a_discard():
    # a judge that allows 3 runs, cast with a cap of 1: its confirm cannot be honoured
    options = dict(floor=NoiseFloor(0.005, 3), judge=dict(k=2.0, confirm_margin=0.5, max_runs=3))
    assert decide(judge_noise, [0.992], [1.0], options, 1) == ("discard", 1)


def test_the_gaussian_model_is_centred():
    sigmas = Sigmas(same_seed=None, cross_seed=0.04, null_paired=0.02, null_paired_mean=0.0)
    # greedy keeps a null change exactly when its paired difference is negative: half the time
    null = model_rate(sigmas, 0.0, judge_greedy, {}, repeats=2, max_runs=1, cases=4000)
    assert null.keeps == pytest.approx(0.5, abs=0.03)
    # a planted 2 x 0.04 = 0.08 gain against a paired noise of 0.02 is a 4-sigma difference: always found
    assert model_rate(sigmas, 0.08, judge_greedy, {}, repeats=2, max_runs=1, cases=500).keeps == 1.0


def test_variants_edit_train_constants():
    source = "MATRIX_LR = 0.04  # hidden matrices\nSEED = 1\n"
    assert variant_source("base", source) == source
    assert variant_source(NULL, source) == "MATRIX_LR = (0.04) * 1.0001  # hidden matrices\nSEED = 1\n"
    assert variant_source("MATRIX_LR=0.05,SEED=2", source) == "MATRIX_LR = 0.05  # hidden matrices\nSEED = 2\n"
    assert variant_source("SEED=2**3", source) == "MATRIX_LR = 0.04  # hidden matrices\nSEED = 2**3\n"
    with pytest.raises(MeasureError, match="'DEPTH\\*2': DEPTH matches no module-level assignment"):
        variant_source("DEPTH*2", source)
    with pytest.raises(MeasureError, match="NAME\\*FACTOR or NAME=VALUE"):
        variant_source("MATRIX_LR", source)


def test_runs_file_round_trip(tmp_path):
    path = tmp_path / "runs.json"
    assert load_runs(path) == []
    save_runs(path, RUNS)
    assert load_runs(path) == RUNS
    path.write_text("{not json")
    with pytest.raises(MeasureError, match="is not a runs file"):
        load_runs(path)


def test_a_resumed_measurement_reuses_only_runs_of_todays_code_on_one_data(tmp_path):
    """Runs trained by another train.py or prepare.py (another stream, another model) are measured again, not
    mixed in; recomputing a table from a file (recorded_only) takes its runs as they are, from one data only."""
    path = tmp_path / "runs.json"
    today = source_sha256("base")
    save_runs(path, [Run("base", 42, 2.0, 500, 60.0, "builtin:test", today),
                     Run("base", 43, 2.1, 500, 60.0, "builtin:test", "an older train.py")])
    plan = [("base", 42), ("base", 43)]
    chosen, missing = measure(plan, 60.0, path, 0)
    assert [run.seed for run in chosen] == [42] and missing == 1
    chosen, missing = measure(plan, 60.0, path, 0, recorded_only=True)
    assert [run.seed for run in chosen] == [42, 43] and missing == 0
    save_runs(path, [Run("base", 42, 2.0, 500, 60.0, "builtin:test", today),
                     Run("base", 43, 2.1, 500, 60.0, "builtin:other", today)])
    with pytest.raises(MeasureError, match="trained on different data \\(builtin:other, builtin:test\\)"):
        measure(plan, 60.0, path, 0)


def recorded(tmp_path: Path) -> Path:
    """A runs file for 4 seeds: base, two null variants and a better variant 0.03 lower, plus a base rerun."""
    offsets = {42: 0.0, 43: 0.05, 44: -0.03, 45: 0.02}
    runs = []
    for seed, offset in offsets.items():
        runs += [run("base", seed, 2.0 + offset), run(NULL, seed, 2.0 + offset + 0.004 * (seed % 3 - 1)),
                 run("EMBEDDING_LR*1.0001", seed, 2.0 + offset - 0.003 * (seed % 2)),
                 run("MATRIX_LR=0.05", seed, 2.0 + offset - 0.03)]
    runs.append(run("base", 42, 2.0 + 0.001))
    path = tmp_path / "runs.json"
    save_runs(path, runs)
    return path


def test_judge_power_from_recorded_runs(tmp_path, run_python):
    path = recorded(tmp_path)
    result = run_python("-m", "bench.judge_power", "--runs", str(path), "--no-train", "--better", "MATRIX_LR=0.05",
                        "--no-model", timeout=120)
    assert result.returncode == 0, result.stderr
    values = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert values["runs"] == "17"
    for judge in ("noise", "greedy"):
        for key in ["false_keep_rate", *[f"detection_rate_{judge}_{d}sigma" for d in (1, 2, 3, 5)],
                    "runs_per_decision", "real_detection_rate", "shift_model_detection_rate"]:
            name = key if key.startswith("detection") else f"{key}_{judge}"
            assert 0.0 <= float(values[name]) <= 3.0, name
    assert values["cases_null_noise"] == "48"  # 2 null variants x 4 * 3 * 2 orderings of the seeds
    assert float(values["better_paired_gain"]) == pytest.approx(0.03)
    assert float(values["detection_rate_greedy_5sigma"]) == 1.0
    assert json.loads(path.read_text())["runs"][0]["variant"] == "base"  # nothing was added or lost


def test_judge_power_says_what_is_missing(tmp_path, run_python):
    path = recorded(tmp_path)
    result = run_python("-m", "bench.judge_power", "--runs", str(path), "--no-train", "--seeds", "5", timeout=120)
    assert result.returncode == 3
    # seed 46 lacks base and both null variants (16 runs: 5 seeds x 3 variants + 1 rerun of base on 42)
    assert "3 of 16 runs are still to measure at --budget 60; run again with the same --runs" in result.stderr
    assert "Traceback" not in result.stderr


def test_judge_power_refuses_a_broken_runs_file(tmp_path, run_python, assert_user_error):
    path = tmp_path / "runs.json"
    path.write_text("[1, 2]")
    result = run_python("-m", "bench.judge_power", "--runs", str(path), "--no-train", timeout=120)
    assert_user_error(result, "is not a runs file written by the judge benches")
    assert path.read_text() == "[1, 2]"


@pytest.mark.slow
def test_judge_power_trains_and_resumes(tmp_path, run_python, prepared_builtin):
    path = tmp_path / "runs.json"
    args = ("-m", "bench.judge_power", "--runs", str(path), "--seeds", "2", "--same-seed", "1", "--null", NULL,
            "--baseline-repeats", "2", "--max-runs", "2", "--budget", "1", "--no-model")
    first = run_python(*args, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("run: ") == 4
    again = run_python(*args, "--no-train", timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "".join(line + "\n" for line in first.stdout.splitlines() if not line.startswith("run: "))


@pytest.mark.slow
def test_judge_null_smoke(run_python, prepared_builtin):
    result = run_python("-m", "bench.judge_null", "--same-seed", "3", "--other-seeds", "1", "--budget", "1", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "false_keep_rate_noise: " in result.stdout
    assert "runs: 4" in result.stdout
