"""The keep/discard rules on hand-made numbers; every expected value is worked out by hand."""

from __future__ import annotations

import math

import pytest

from agent.judge import JUDGES, NoiseFloor, judge_greedy, judge_noise, noise_floor

# sigma 0.005 with k = 2 puts the threshold at 0.0100 below best = 1.0.
FLOOR = NoiseFloor(sigma=0.005, runs=2)


def test_noise_floor_is_the_sample_standard_deviation():
    # mean 1.02, squared deviations 0.0004 + 0 + 0.0004, / (3 - 1) = 0.0004, sqrt = 0.02
    floor = noise_floor([1.00, 1.02, 1.04])
    assert floor.sigma == pytest.approx(0.02)
    assert floor.runs == 3
    assert floor.describe() == "sigma 0.0200 from 3 baseline runs"


def test_noise_floor_unknown_below_two_runs():
    assert noise_floor([1.0]) == NoiseFloor(sigma=None, runs=1)
    assert noise_floor([1.0]).describe() == "sigma unknown (1 baseline run)"
    assert noise_floor([]).describe() == "sigma unknown (0 baseline runs)"


def test_noise_floor_leaves_out_failed_runs():
    # 1.00 and 1.02: sqrt(2 * 0.01**2 / 1) = 0.0141421...
    floor = noise_floor([1.00, math.nan, 1.02])
    assert floor.sigma == pytest.approx(0.01414213562)
    assert floor.runs == 2


def test_null_twins_give_the_paired_sigma():
    # twin minus baseline, seed by seed: +0.03, -0.04, 0.00; mean square (0.0009 + 0.0016 + 0) / 3 = 0.00083333,
    # sqrt 0.0288675. The cross-seed sigma of 1.00, 1.20, 1.10 is 0.1 and stays beside it.
    floor = noise_floor([1.00, 1.20, 1.10], twins=[1.03, 1.16, 1.10])
    assert floor.sigma == pytest.approx(0.1)
    assert floor.paired == pytest.approx(0.0288675, rel=1e-5)
    assert (floor.runs, floor.twins) == (3, 3)
    assert floor.unit == floor.paired
    assert floor.describe() == "paired sigma 0.0289 from 3 null twins"


def test_one_twin_is_not_a_paired_sigma():
    floor = noise_floor([1.00, 1.20], twins=[1.03])
    assert (floor.paired, floor.twins) == (None, 0)
    assert floor.unit == pytest.approx(0.1414213562)  # the cross-seed sigma stands in


def test_failed_twins_are_left_out():
    # the pair with a NaN twin drops out; +0.03 and -0.04 remain: sqrt((0.0009 + 0.0016) / 2) = 0.0353553
    floor = noise_floor([1.00, 1.20, 1.10], twins=[1.03, 1.16, math.nan])
    assert floor.paired == pytest.approx(0.0353553, rel=1e-5)
    assert floor.twins == 2


def test_the_bar_is_set_by_the_paired_sigma_when_twins_ran():
    # cross-seed sigma 0.1 would set the bar at 0.2; the twins' paired sigma 0.0288675 sets it at 0.057735
    floor = noise_floor([1.00, 1.20, 1.10], twins=[1.03, 1.16, 1.10])
    verdict = judge_noise([0.94], [1.0], floor)
    assert verdict.status == "keep"
    assert verdict.reason == "-0.0600 < -2 sigma = -0.0577 (paired sigma 0.0289 from 3 null twins)"


def test_keep_just_past_the_threshold():
    verdict = judge_noise([0.9899], [1.0], FLOOR)
    assert verdict.status == "keep"
    assert verdict.reason == "-0.0101 < -2 sigma = -0.0100 (sigma 0.0050 from 2 baseline runs)"


def test_discard_just_short_of_the_threshold():
    verdict = judge_noise([0.9901], [1.0], FLOOR)
    assert verdict.status == "discard"
    assert verdict.reason == "-0.0099 >= -2 sigma = -0.0100 (sigma 0.0050 from 2 baseline runs)"


def test_exactly_at_the_threshold_is_not_enough():
    # binary-exact numbers: threshold 2 * 0.125 = 0.25, delta 0.75 - 1.0 = -0.25
    assert judge_noise([0.75], [1.0], NoiseFloor(0.125, 3)).status == "discard"
    assert judge_noise([0.74], [1.0], NoiseFloor(0.125, 3)).status == "keep"


def test_k_scales_the_threshold():
    verdict = judge_noise([0.9899], [1.0], FLOOR, k=3)
    assert verdict.status == "discard"
    assert "-0.0101 >= -3 sigma = -0.0150" in verdict.reason


def test_min_delta_takes_over_when_larger_than_k_sigma():
    verdict = judge_noise([0.985], [1.0], FLOOR, min_delta=0.02)
    assert verdict.status == "discard"
    assert verdict.reason.startswith("-0.0150 >= -min_delta = -0.0200 (min_delta above 2 sigma = 0.0100; ")
    assert judge_noise([0.979], [1.0], FLOOR, min_delta=0.02).status == "keep"


def test_k_sigma_stands_when_larger_than_min_delta():
    verdict = judge_noise([0.9899], [1.0], FLOOR, min_delta=0.005)
    assert verdict.status == "keep"
    assert "-2 sigma = -0.0100" in verdict.reason


def test_unknown_sigma_falls_back_to_min_delta():
    unknown = NoiseFloor(sigma=None, runs=1)
    verdict = judge_noise([0.9877], [1.0], unknown, min_delta=0.005)
    assert verdict.status == "keep"
    assert verdict.reason == "sigma unknown (1 baseline run): -0.0123 < -min_delta = -0.0050"
    verdict = judge_noise([0.996], [1.0], unknown, min_delta=0.005)
    assert verdict.status == "discard"
    assert verdict.reason == "sigma unknown (1 baseline run): -0.0040 >= -min_delta = -0.0050"


@pytest.mark.parametrize("value", [0.9915, 0.9899, 0.9881])
def test_a_single_run_that_would_be_kept_or_nearly_is_confirmed(value):
    # margin 0.2: confirm between -(1 - 0.2) * 0.0100 = -0.0080 and -(1 + 0.2) * 0.0100 = -0.0120;
    # deltas -0.0085, -0.0101, -0.0119 lie between
    verdict = judge_noise([value], [1.0], FLOOR, confirm_margin=0.2)
    assert verdict.status == "confirm"
    assert "< -0.0080 (0.8 x -2 sigma), run it once more to confirm" in verdict.reason


def test_a_single_run_short_of_the_confirm_line_is_discarded_at_once():
    assert judge_noise([0.993], [1.0], FLOOR, confirm_margin=0.2).status == "discard"  # -0.0070 >= -0.0080


def test_a_single_run_past_the_clear_line_is_kept_at_once():
    # margin 0.2: the clear line is -(1 + 0.2) * 0.0100 = -0.0120; delta -0.0121 is past it
    verdict = judge_noise([0.9879], [1.0], FLOOR, confirm_margin=0.2)
    assert verdict.status == "keep"
    assert verdict.reason == "-0.0121 < -0.0120 (1.2 x -2 sigma): clear on 1 run (sigma 0.0050 from 2 baseline runs)"


def test_the_bar_of_n_runs_is_k_sigma_over_sqrt_n():
    # four paired differences of -0.0051 each: no spread, so sigma 0.005; bar 2 * 0.005 / sqrt(4) = 0.0050
    kept = judge_noise([0.9949] * 4, [1.0] * 4, FLOOR, max_runs=4)
    assert kept.status == "keep"
    assert kept.threshold == pytest.approx(0.005)
    assert kept.reason == "-0.0051 (mean of 4 runs) < -2 sigma/sqrt(4) = -0.0050 (sigma 0.0050 from 2 baseline runs)"
    assert judge_noise([0.9951] * 4, [1.0] * 4, FLOOR, max_runs=4).status == "discard"


def test_at_max_runs_the_bar_alone_decides():
    # two runs, max_runs 2: no confirm however near; bar 2 * 0.005 / sqrt(2) = 0.0070711
    near = judge_noise([0.9930, 0.9930], [1.0, 1.0], FLOOR, confirm_margin=0.5, max_runs=2)
    assert near.status == "discard"
    assert near.reason.startswith("-0.0070 (mean of 2 runs) >= -2 sigma/sqrt(2) = -0.0071")
    past = judge_noise([0.9928, 0.9928], [1.0, 1.0], FLOOR, confirm_margin=0.5, max_runs=2)
    assert past.status == "keep"


def test_a_second_run_can_ask_for_a_third():
    # bar 0.0070711 on two runs; margin 0.5: confirm between -0.0035355 and -0.0106066; delta -0.0060
    verdict = judge_noise([0.994, 0.994], [1.0, 1.0], FLOOR, confirm_margin=0.5, max_runs=3)
    assert verdict.status == "confirm"
    assert verdict.reason.startswith("-0.0060 (mean of 2 runs) < -0.0035 (0.5 x -2 sigma/sqrt(2)), run it once more")


def test_without_a_margin_there_is_no_confirm():
    assert judge_noise([0.9905], [1.0], FLOOR).status == "discard"


def test_simplification_within_noise_is_kept():
    verdict = judge_noise([1.001], [1.0], FLOOR, lines_added=3, lines_removed=12)
    assert verdict.status == "keep"
    assert verdict.reason == (
        "simplification: 12 lines removed, 3 added, +0.0010 within 2 sigma = 0.0100 "
        "(sigma 0.0050 from 2 baseline runs)")


def test_simplification_worse_than_noise_is_discarded():
    verdict = judge_noise([1.012], [1.0], FLOOR, lines_added=3, lines_removed=12)
    assert verdict.status == "discard"
    assert "12 lines removed, 3 added, but +0.0120 > 2 sigma = 0.0100" in verdict.reason


def test_equal_lines_are_not_a_simplification():
    assert judge_noise([1.001], [1.0], FLOOR, lines_added=5, lines_removed=5).status == "discard"


def test_simplification_that_also_improves_reports_the_improvement():
    verdict = judge_noise([0.985], [1.0], FLOOR, lines_added=1, lines_removed=4)
    assert verdict.status == "keep"
    assert verdict.reason.startswith("-0.0150 < -2 sigma = -0.0100")


def test_a_simplification_is_decided_on_one_run():
    # a simplification within noise is kept at once: being wrong about it costs nothing measurable
    verdict = judge_noise([1.0095], [1.0], FLOOR, lines_added=0, lines_removed=6, confirm_margin=0.2)
    assert verdict.status == "keep"
    assert "+0.0095 within 2 sigma = 0.0100" in verdict.reason


def test_the_candidates_own_paired_spread_raises_the_bar_when_larger():
    # paired differences -0.03 and -0.01: stdev 0.014142 > 0.005; bar 2 * 0.014142 / sqrt(2) = 0.0200;
    # their mean -0.0200 is not below it
    verdict = judge_noise([0.97, 0.99], [1.0, 1.0], FLOOR, max_runs=2)
    assert verdict.status == "discard"
    assert verdict.reason == ("-0.0200 (mean of 2 runs) >= -2 sigma/sqrt(2) = -0.0200 (sigma 0.0141 from the "
                              "candidate's 2 paired differences, sigma 0.0050 from 2 baseline runs)")


def test_the_spread_is_of_paired_differences_not_of_values():
    # values 0.97 and 1.01 spread by 0.028, but each is 0.02 below its seed's best: differences do not spread
    verdict = judge_noise([0.97, 1.01], [0.99, 1.03], FLOOR, max_runs=2)
    assert verdict.status == "keep"
    assert verdict.reason == "-0.0200 (mean of 2 runs) < -2 sigma/sqrt(2) = -0.0071 (sigma 0.0050 from 2 baseline runs)"


def test_the_candidates_spread_stands_in_for_an_unknown_sigma():
    # one baseline run: sigma unknown; best [1.0] is shorter than the two values, so the second run is compared
    # with the best's mean: differences -0.03 and -0.01, stdev 0.014142, bar 2 * 0.014142 / sqrt(2) = 0.0200
    verdict = judge_noise([0.97, 0.99], [1.0], NoiseFloor(None, 1), min_delta=0.005, max_runs=2)
    assert verdict.status == "discard"
    assert verdict.reason == ("-0.0200 (mean of 2 runs, 1 paired with the best's, the rest with its mean) "
                              ">= -2 sigma/sqrt(2) = -0.0200 (sigma 0.0141 from the candidate's 2 paired "
                              "differences, sigma unknown (1 baseline run))")


@pytest.mark.parametrize("values", [[math.nan], [math.inf], [0.98, math.nan]])
@pytest.mark.parametrize("judge", [judge_noise, judge_greedy])
def test_non_finite_values_are_discarded(judge, values):
    verdict = judge(values, [1.0], FLOOR, confirm_margin=0.5)
    assert verdict.status == "discard"
    assert "finite" in verdict.reason


def test_no_values_is_a_programming_error():
    with pytest.raises(ValueError):
        judge_noise([], [1.0], FLOOR)


def test_greedy_keeps_any_strict_improvement():
    verdict = judge_greedy([1.2345], [1.24])
    assert verdict.status == "keep"
    assert verdict.reason == "greedy: 1.2345 < best 1.2400"
    tie = judge_greedy([1.24], [1.24])
    assert tie.status == "discard"
    assert tie.reason == "greedy: 1.2400 >= best 1.2400"


def test_judges_take_the_same_arguments_and_differ_inside_the_noise():
    options = dict(k=2.0, min_delta=0.0, lines_added=2, lines_removed=1, confirm_margin=0.0)
    verdicts = {name: judge([0.995], [1.0], FLOOR, **options) for name, judge in JUDGES.items()}
    assert set(verdicts) == {"noise", "greedy"}
    assert verdicts["noise"].status == "discard"
    assert verdicts["greedy"].status == "keep"


def test_runs_are_paired_with_the_best_on_the_same_seeds():
    # seed-by-seed: (0.98 - 1.00) and (0.99 - 0.97) cancel; the best's third run has no partner yet.
    # differences -0.02 and +0.02: stdev 0.028284, bar 2 * 0.028284 / sqrt(2) = 0.0400
    verdict = judge_noise([0.98, 0.99], [1.00, 0.97, 1.5], FLOOR)
    assert verdict.delta == pytest.approx(0.0)
    assert verdict.threshold == pytest.approx(0.04)
    assert verdict.status == "discard"


def test_a_best_with_fewer_runs_is_compared_by_its_mean():
    verdict = judge_greedy([0.95, 0.97], [1.0])
    assert verdict.delta == pytest.approx(-0.04)
    assert verdict.status == "keep"
