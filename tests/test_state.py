"""One replay of a tag's ledger rows (agent/state.py), shared by the loop and the report.

The ledger here is written by agent/ledger.py and read back as strings, as the loop and the report read it:
three baselines, their three null twins, a keep, a contended experiment and a discard. Every expected value
is computed by hand in the comments.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.judge import judge_noise, noise_floor
from agent.ledger import Ledger
from agent.probe import Reference
from agent.report import report_text, summarize
from agent.state import TagState, replay, run_values

TAG = "nov28"
COMMON = dict(tag=TAG, preset="cpu", data_fingerprint="builtin:abc", time_budget=60, runs=1)
BASELINES = [1.50, 1.52, 1.51]  # seeds 42, 43, 44: cross-seed sigma 0.01
TWINS = [1.503, 1.516, 1.514]  # differences +0.003, -0.004, +0.004: paired sigma sqrt((9 + 16 + 16) / 3) / 1000
PAIRED = math.sqrt((0.003**2 + 0.004**2 + 0.004**2) / 3)  # 0.0036968


def night(path: Path) -> list[dict[str, str]]:
    """A tag's ledger as the loop writes it, read back as every reader reads it."""
    ledger = Ledger(path)
    for index, (seed, value) in enumerate(zip((42, 43, 44), BASELINES)):
        ledger.append(dict(COMMON, commit="aaaaaaa", parent="aaaaaaa", experiment="baseline", seed=seed, val_bpb=value,
                           status="keep" if index == 0 else "baseline", test_bpb=value + 0.02, num_steps=600,
                           probe_seconds=0.05 if index == 0 else 0.051, cpu_per_second=1.9, sigma=None))
    for seed, value in zip((42, 43, 44), TWINS):
        ledger.append(dict(COMMON, commit="ttttttt", parent="aaaaaaa", experiment="twin", seed=seed, val_bpb=value,
                           status="discard", reason="null twin"))
    ledger.append(dict(COMMON, commit="bbbbbbb", parent="aaaaaaa", experiment="NS-1", seed=42, val_bpb=1.47, runs=2,
                       run_values="42:1.468000 43:1.472000", status="keep", test_bpb=1.49, delta=-0.04, threshold=0.0052))
    ledger.append(dict(COMMON, commit="ccccccc", parent="bbbbbbb", experiment="MM-1", seed=42, val_bpb=1.40,
                       status="contended", reason="shared its machine"))
    ledger.append(dict(COMMON, commit="ddddddd", parent="bbbbbbb", experiment="MB-2", seed=42, val_bpb=1.475,
                       status="discard", delta=0.007, threshold=0.0074))
    return Ledger(path).rows(TAG)


def test_a_night_replays_to_the_values_computed_by_hand(tmp_path: Path):
    rows = night(tmp_path / "experiments.tsv")

    state = replay(rows)

    assert state.row_count == 9
    assert [r["seed"] for r in state.baselines] == ["42", "43", "44"]
    assert [r["val_bpb"] for r in state.twins] == ["1.503000", "1.516000", "1.514000"]
    assert state.floor.sigma == pytest.approx(0.01)
    assert state.floor.paired == pytest.approx(PAIRED) and state.floor.twins == 3
    assert state.floor.unit == pytest.approx(0.0036968, abs=1e-7)  # what the judge's bar is built from
    assert state.base_commit == "aaaaaaa" and state.best_commit == "bbbbbbb"
    assert state.best_values == (1.468, 1.472) and state.best_val == pytest.approx(1.47)
    assert state.best_test == pytest.approx(1.49)
    assert state.reference == Reference(0.05, 1.9)  # the first baseline's, not a repeat's
    assert state.done == {"NS-1", "MB-2"}  # MM-1 shared its machine: it runs again


def test_each_row_moves_the_state_one_step(tmp_path: Path):
    rows = night(tmp_path / "experiments.tsv")
    states = [TagState()]
    for row in rows:
        states.append(states[-1].after(row))

    assert states[0].best_commit is None and states[0].best_val is None and states[0].floor.unit is None
    first = states[1]  # one baseline: the best, no noise measured yet
    assert first.best_commit == "aaaaaaa" and first.best_values == (1.5,) and first.best_test == pytest.approx(1.52)
    assert first.floor.sigma is None
    before_keep = states[6]  # baselines and twins: the best is the baselines' mean, paired with them seed by seed
    assert before_keep.best_values == (1.5, 1.52, 1.51) and before_keep.best_val == pytest.approx(1.51)
    assert before_keep.done == frozenset()
    assert states[7].best_commit == "bbbbbbb" and states[7].best_values == (1.468, 1.472)
    assert states[8].best_commit == "bbbbbbb" and states[8].done == {"NS-1"}  # contended: neither best nor done
    assert states[-1] == replay(rows)


def test_a_tag_without_rows_starts_where_it_is_told(tmp_path: Path):
    assert replay([], start="1234567").base_commit == "1234567"
    assert replay([], start="1234567").best_commit == "1234567"
    # a first baseline that crashed: the tag began on its commit, and nothing is measured yet
    crashed = dict(commit="aaaaaaa", parent="aaaaaaa", experiment="baseline", status="crash", val_bpb="0.000000")
    state = replay([crashed], start="1234567")
    assert state.base_commit == "aaaaaaa" and state.baselines == () and state.done == frozenset()


def test_run_values_read_seed_value_pairs_and_fall_back_to_the_mean():
    assert run_values({"run_values": "42:1.468000 43:1.472000", "val_bpb": "1.470000"}) == (1.468, 1.472)
    assert run_values({"run_values": "", "val_bpb": "1.470000"}) == (1.47,)
    assert run_values({"run_values": "", "val_bpb": "0.000000"}) == ()  # a crash measured nothing


def test_the_reports_sigma_is_the_one_the_judge_used(tmp_path: Path):
    rows = night(tmp_path / "experiments.tsv")
    # NS-1's decision, as the loop's judge made it: the noise floor of the three baselines and their twins
    floor = noise_floor(BASELINES, TWINS)
    verdict = judge_noise([1.468], BASELINES, floor, k=2.0, confirm_margin=0.0)
    assert verdict.sigma == pytest.approx(PAIRED)

    summary = summarize(TAG, rows)

    assert summary.sigma == pytest.approx(verdict.sigma, abs=1e-9)  # not the cross-seed 0.01
    text = report_text([summary], tmp_path / "experiments.tsv", None)
    assert ("noise floor sigma 0.003697, the paired sigma of 3 null twins that the judge used (the baselines' "
            "cross-seed sigma: 0.010000 from 3 runs (1.500000, 1.520000, 1.510000))") in text
    assert "- rows: 9 (3 baseline, 3 null twins, 3 experiments; 10 training runs)" in text
    assert [r["experiment"] for r in summary.baselines] == ["baseline"] * 3
    # the best moved once, to NS-1's mean; MM-1 shared its machine and moved nothing
    assert summary.best == pytest.approx(1.47) and summary.best_row["experiment"] == "NS-1"
    assert [p.best for p in summary.points][5:] == pytest.approx([1.5, 1.47, 1.47, 1.47])
