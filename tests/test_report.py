"""The morning report on hand-written ledgers: the plot is a real picture and the summary states the facts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.ledger import COLUMNS, Ledger
from fake_github import error, issue

REPO = Path(__file__).resolve().parents[1]
COMMON = dict(tag="nov28", preset="cpu", data_fingerprint="builtin:abc", time_budget=60)
# matplotlib's tab: colours, as the report draws them
GREEN, RED, PURPLE, ORANGE = (44, 160, 44), (214, 39, 40), (148, 103, 189), (255, 127, 14)
BROWN, CYAN, PINK = (140, 86, 75), (23, 190, 207), (227, 119, 194)  # contended, the decision's bar, confirmed


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "agent" / "report.py"), *args], capture_output=True, text=True)


def run_report(tmp_path: Path, ledger: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    png, md = tmp_path / "progress.png", tmp_path / "report.md"
    result = report("--ledger", str(ledger), "--out", str(png), "--markdown", str(md), *args)
    return result, png, md


def write_ledger(path: Path) -> None:
    """A night in the ledger's current shape: one row per experiment, MB-2 confirmed by a second run, the
    baselines and keeps scored on test, and the bar each decision used."""
    ledger = Ledger(path)
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.50, sigma=0.004,
                       test_bpb=1.52, num_steps=600, tokens_per_second=10000, runs=1, run_values="42:1.500000", seed=42,
                       description="baseline 1/2", reason="baseline run 1 (seed 42)",
                       timestamp="2026-11-28T01:00:00+00:00", wall_seconds=70))
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="baseline", val_bpb=1.505, sigma=0.004,
                       test_bpb=1.523, num_steps=604, tokens_per_second=10100, runs=1, run_values="43:1.505000", seed=43,
                       description="baseline 2/2", reason="baseline run 2 (seed 43)",
                       timestamp="2026-11-28T01:01:10+00:00", wall_seconds=70))
    ledger.append(dict(COMMON, commit="bbbbbbb", experiment="NS-1", status="keep", val_bpb=1.48, sigma=0.004,
                       test_bpb=1.505, num_steps=602, tokens_per_second=10050, runs=1, run_values="42:1.480000",
                       threshold=0.008, delta=-0.02, description="MUON_NS_STEPS = 3",
                       reason="-0.0200 < -2 sigma = -0.0071",
                       cost_usd=0.25, input_tokens=1200, cached_tokens=3000, output_tokens=400,
                       timestamp="2026-11-28T01:30:00+00:00", wall_seconds=150))
    ledger.append(dict(COMMON, commit="ccccccc", experiment="MM-5", status="discard", val_bpb=1.481, sigma=0.004,
                       num_steps=380, tokens_per_second=6300, runs=1, run_values="42:1.481000", threshold=0.008,
                       delta=0.001, description="constant momentum", reason="+0.0010 >= -2 sigma = -0.0071",
                       timestamp="2026-11-28T02:00:00+00:00", wall_seconds=70))
    ledger.append(dict(COMMON, commit="ddddddd", experiment="ABL-1", status="crash", sigma=0.004, runs=1,
                       description="AdamW for matrices", reason="exit code 1: ValueError",
                       timestamp="2026-11-28T02:30:00+00:00", wall_seconds=5))
    ledger.append(dict(COMMON, commit="eeeeeee", experiment="C-1", status="invalid", val_bpb=0.9, sigma=0.004, runs=1,
                       description="memory tokens", reason="causality: the edit moved earlier logits by up to 3.2",
                       timestamp="2026-11-28T03:00:00+00:00", wall_seconds=70))
    ledger.append(dict(COMMON, commit="abababa", experiment="MM-3", status="contended", val_bpb=1.47, sigma=0.004,
                       runs=4, probe_ratio=1.42, description="momentum ramp 100 steps",
                       reason="probe 1.42x the reference > 1.10 after 3 retries",
                       timestamp="2026-11-28T03:30:00+00:00", wall_seconds=300))
    ledger.append(dict(COMMON, commit="fffffff", experiment="MB-2", status="keep", val_bpb=1.46, sigma=0.006,
                       test_bpb=1.49, num_steps=601, tokens_per_second=9990, runs=2,
                       run_values="42:1.455000 44:1.465000", threshold=0.012, delta=-0.02,
                       description="MATRIX_LR = 0.03", reason="-0.0200 < -2 sigma = -0.0120 (mean of 2 runs)",
                       timestamp="2026-11-28T04:00:00+00:00", wall_seconds=140))
    ledger.append(dict(COMMON, tag="other", commit="9999999", experiment="baseline", status="keep", val_bpb=2.0,
                       runs=1, description="baseline 1/1", reason="baseline run 1 (seed 42)",
                       timestamp="2026-11-27T01:00:00+00:00", wall_seconds=70))


def pixels(png: Path) -> tuple[tuple[int, int], set[tuple[int, int, int]], np.ndarray]:
    """The image's size, its distinct colours and its pixels as an (N, 3) array."""
    with Image.open(png) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        data = np.asarray(rgb).reshape(-1, 3).astype(int)
        return rgb.size, set(map(tuple, np.unique(data, axis=0).tolist())), data


def has_colour(data: np.ndarray, colour: tuple[int, int, int], at_least: int = 20) -> bool:
    return int((np.abs(data - np.array(colour)).max(axis=1) <= 6).sum()) >= at_least


def test_report_plots_and_summarises_the_chosen_tag(tmp_path):
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    result, png, md = run_report(tmp_path, ledger, "--tag", "nov28")
    assert result.returncode == 0, result.stderr
    size, colours, data = pixels(png)
    assert size == (1200, 600)
    assert len(colours) > 50, "the plot is blank"
    for colour in (GREEN, RED, PURPLE, BROWN, CYAN, PINK):  # keeps, crash, invalid, contended, the bars, confirmed
        assert has_colour(data, colour), colour
    text = result.stdout
    assert md.read_text() in text  # stdout and report.md hold the same summary
    assert "## nov28 (cpu preset, data builtin:abc, 60 s per run)" in text
    assert "## other" not in text
    assert ("- baseline: val_bpb 1.500000, test_bpb 1.520000 at aaaaaaa, 602 steps; noise floor sigma 0.003536 "
            "from 2 runs (1.500000, 1.505000)") in text
    assert ("- best: val_bpb 1.460000, test_bpb 1.490000 at fffffff (MB-2), -0.040000 (-2.67%) from the baseline "
            "over 2 kept experiments") in text
    assert ("- gain on test: -0.030000 (-1.97%), the unbiased estimate; on val: -0.040000, biased in the night's "
            "favour, because the search kept what happened to score well on val") in text
    assert "- outcomes: 2 keep, 1 discard, 1 crash, 0 timeout, 1 invalid, 1 contended" in text
    assert "- API cost: $0.25 (1,200 input, 3,000 cached, 400 output tokens)" in text
    # 01:00:00 - 70 s to 04:00:00 is 3 h 1 min 10 s; 6 experiments in that time; MM-3 ran 4 times, MB-2 twice
    assert ("- rows: 8 (2 baseline, 6 experiments; 12 training runs) in 3.02 h of loop time: "
            "2.0 experiments per hour") in text
    assert "- failed baseline runs" not in text
    baselines = text.split("Baseline runs:")[1].split("Kept, in order")[0]
    assert "| aaaaaaa | 42 | keep | 1.500000 | 1.520000 | 600 | 10,000 |" in baselines
    assert "| aaaaaaa | 43 | baseline | 1.505000 | 1.523000 | 604 | 10,100 |" in baselines
    kept = text.split("Kept, in order")[1].split("Every experiment")[0]
    assert ("| bbbbbbb | NS-1 | 1.480000 | -0.020000 | 1.505000 | -0.015000 | 602 | 10,050 | 1 | "
            "-0.0200 < -2 sigma = -0.0071 | MUON_NS_STEPS = 3 |") in kept
    assert "| fffffff | MB-2 | 1.460000 | -0.020000 | 1.490000 | -0.015000 | 601 | 9,990 | 2 |" in kept
    assert "MM-5" not in kept and "ABL-1" not in kept
    every = text.split("Every experiment")[1].split("Crashed")[0]
    # the bar: the best before the decision minus its threshold; MM-5's shorter run is flagged
    assert "| 3 | NS-1 | keep | 1.480000 | -0.020000 | 1.492000 | 602 | 10,050 | 1 |" in every
    assert "| 4 | MM-5 | discard | 1.481000 | +0.001000 | 1.472000 | 380 (-37% vs baseline) | 6,300 | 1 |" in every
    assert "| 5 | ABL-1 | crash | n/a | n/a | n/a | n/a | n/a | 1 |" in every
    assert "| 7 | MM-3 | contended | 1.470000 | n/a | n/a | n/a | n/a | 4 |" in every
    assert "| 8 | MB-2 | keep | 1.460000 | -0.020000 | 1.468000 | 601 | 9,990 | 2 |" in every
    assert "- ddddddd ABL-1 (crash): exit code 1: ValueError" in text
    assert "- eeeeeee C-1 (invalid): causality:" in text
    assert ("- abababa MM-3 (contended, runs again on resume): probe 1.42x the reference > 1.10 after 3 retries"
            in text)


def test_every_tag_is_summarised_and_the_one_with_the_newest_row_plotted_by_default(tmp_path):
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)  # `other` comes last in the file, but its only row is a day older than nov28's
    result, png, _ = run_report(tmp_path, ledger)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.index("## nov28") < text.index("## other"), "the tag with the newest row comes first"
    assert "Plot of nov28: progress.png" in text  # relative to report.md
    assert "- best: the baseline, val_bpb 2.000000; no experiment beat it" in text
    assert "- baseline: val_bpb 2.000000, test_bpb n/a at 9999999; noise floor unknown (one baseline run)" in text
    assert "| 9999999 | - | keep | 2.000000 | n/a | n/a | n/a |" in text  # no test_bpb is n/a, never 0
    assert has_colour(pixels(png)[2], PINK)  # nov28's plot: MB-2 was confirmed
    Ledger(ledger).append(dict(COMMON, tag="other", commit="8888888", experiment="MM-1", status="discard",
                               val_bpb=2.01, delta=0.01, sigma=0.004, runs=1, description="momentum",
                               timestamp="2026-11-28T05:00:00+00:00"))
    newer, png, _ = run_report(tmp_path, ledger)
    assert newer.returncode == 0, newer.stderr
    assert "Plot of other: progress.png" in newer.stdout
    assert newer.stdout.index("## other") < newer.stdout.index("## nov28")
    _, _, data = pixels(png)
    assert not has_colour(data, RED) and not has_colour(data, PURPLE) and not has_colour(data, PINK)
    assert has_colour(data, CYAN)  # no threshold column: the bar falls back to k x the row's sigma
    assert "| 2 | MM-1 | discard | 2.010000 | +0.010000 | 1.992000 |" in newer.stdout
    wider = report("--ledger", str(ledger), "--out", str(png), "--markdown", str(tmp_path / "r.md"), "--k", "3")
    assert "| 2 | MM-1 | discard | 2.010000 | +0.010000 | 1.988000 |" in wider.stdout


def test_a_running_tag_stays_plotted_while_a_newer_dead_tag_lists_its_failed_baseline(tmp_path):
    """The issue's reproduction: a newer tag whose only row is a timed-out baseline, and an older tag that
    is still running. The running tag has the newest row, so it is plotted; the dead tag counts and lists
    its timed-out baseline."""
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(dict(COMMON, tag="old", commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.5,
                       runs=1, timestamp="2026-11-28T01:00:00+00:00"))
    ledger.append(dict(COMMON, tag="dead", commit="bbbbbbb", experiment="baseline", status="timeout", runs=1,
                       description="baseline 1/2", reason="killed after 400 s: the run passed --timeout",
                       timestamp="2026-11-28T02:00:00+00:00"))
    ledger.append(dict(COMMON, tag="old", commit="ccccccc", experiment="NS-1", status="discard", val_bpb=1.51,
                       delta=0.01, threshold=0.008, runs=1, timestamp="2026-11-28T03:00:00+00:00"))
    result, png, _ = run_report(tmp_path, ledger.path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Plot of old: progress.png" in text and text.index("## old") < text.index("## dead")
    dead = text.split("## dead")[1]
    assert "- baseline: none finished, so nothing was judged" in dead
    assert "- failed baseline runs: 1 (1 timeout), listed below" in dead
    assert "| bbbbbbb | - | timeout | n/a | n/a | n/a | n/a |" in dead
    assert "- bbbbbbb baseline (timeout): killed after 400 s: the run passed --timeout" in dead
    assert not has_colour(pixels(png)[2], ORANGE)  # the plot is old's, which has no timeout
    only_dead, png, _ = run_report(tmp_path, ledger.path, "--tag", "dead")
    assert only_dead.returncode == 0, only_dead.stderr
    assert has_colour(pixels(png)[2], ORANGE)  # the timed-out baseline is marked along the top


def test_every_failed_baseline_is_counted_and_listed_with_its_reason(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    reasons = {"crash": "exit code 1: CUDA out of memory", "timeout": "killed after 400 s",
               "invalid": "prepare.py does not match its fingerprint",
               "contended": "probe 1.30x the reference > 1.10 after 3 retries"}
    for i, (status, reason) in enumerate(reasons.items()):
        ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status=status, runs=1, reason=reason,
                           description=f"baseline {i + 1}/2", timestamp=f"2026-11-28T0{i + 1}:00:00+00:00"))
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.5, runs=1,
                       num_steps=600, test_bpb=1.52, timestamp="2026-11-28T06:00:00+00:00"))
    result, png, _ = run_report(tmp_path, ledger.path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "- failed baseline runs: 4 (1 crash, 1 timeout, 1 invalid, 1 contended), listed below" in text
    for status, reason in reasons.items():
        shown = "contended, runs again on resume" if status == "contended" else status
        assert f"- aaaaaaa baseline ({shown}): {reason}" in text
    assert "- baseline: val_bpb 1.500000, test_bpb 1.520000 at aaaaaaa, 600 steps;" in text
    assert "- outcomes: 0 keep, 0 discard, 0 crash, 0 timeout, 0 invalid, 0 contended" in text  # experiments only
    _, _, data = pixels(png)
    for colour in (RED, ORANGE, PURPLE, BROWN):
        assert has_colour(data, colour), colour


def test_a_gap_of_hours_is_a_pause_not_loop_time(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    for i, stamp in enumerate(("2026-11-28T01:00:00", "2026-11-28T01:10:00", "2026-11-28T09:00:00",
                               "2026-11-28T09:10:00")):
        ledger.append(dict(COMMON, commit="a" * 7, experiment="baseline" if i == 0 else f"MM-{i}",
                           status="keep" if i == 0 else "discard", val_bpb=1.5 + i / 100,
                           timestamp=stamp + "+00:00", wall_seconds=600))
    result, _, _ = run_report(tmp_path, ledger.path)
    assert result.returncode == 0, result.stderr
    # 600 s before the first row, 600 s gap, (pause: the run's own 600 s), 600 s gap = 40 min
    assert "in 0.67 h of loop time, 1 pause over an hour left out: 4.5 experiments per hour" in result.stdout


def test_a_ledger_with_one_row(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.5,
                       description="baseline 1/2", reason="baseline run 1 (seed 42)", wall_seconds=72))
    result, png, _ = run_report(tmp_path, ledger.path)
    assert result.returncode == 0, result.stderr
    assert "- rows: 1 (1 baseline, 0 experiments; 1 training run)" in result.stdout
    assert "- outcomes: 0 keep, 0 discard, 0 crash, 0 timeout, 0 invalid, 0 contended" in result.stdout
    assert "Every experiment" not in result.stdout
    assert "Kept, in order" not in result.stdout
    assert pixels(png)[0] == (1200, 600)


def test_a_ledger_of_crashes_only(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="crash",
                       description="baseline 1/2", reason="exit code 1: CUDA out of memory"))
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="timeout",
                       description="baseline 1/2", reason="killed after 400 s"))
    result, png, _ = run_report(tmp_path, ledger.path)
    assert result.returncode == 0, result.stderr
    assert "- baseline: none finished, so nothing was judged" in result.stdout
    assert "- failed baseline runs: 2 (1 crash, 1 timeout), listed below" in result.stdout
    size, colours, data = pixels(png)
    assert size == (1200, 600) and has_colour(data, RED) and has_colour(data, ORANGE)


@pytest.mark.parametrize("content", ["", "\t".join(COLUMNS) + "\n"])
def test_an_empty_ledger_says_what_to_do(tmp_path, content):
    ledger = tmp_path / "experiments.tsv"
    ledger.write_text(content)
    result, png, _ = run_report(tmp_path, ledger)
    assert result.returncode == 2
    assert "has no rows yet; let python agent/loop.py finish a run first" in result.stderr
    assert not png.exists()


def test_missing_ledger_unknown_tag_and_foreign_columns_say_what_to_do(tmp_path):
    missing, png, _ = run_report(tmp_path, tmp_path / "none.tsv")
    assert missing.returncode == 2 and "run python agent/loop.py first" in missing.stderr
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    unknown, _, _ = run_report(tmp_path, ledger, "--tag", "dec01")
    assert unknown.returncode == 2
    assert "has no rows for tag 'dec01' (its tags: nov28, other)" in unknown.stderr
    foreign = tmp_path / "old.tsv"
    foreign.write_text("commit\tval_bpb\tnotes\nabc\t1.0\tx\n")
    wrong, _, _ = run_report(tmp_path, foreign)
    assert wrong.returncode == 2 and "columns from another version" in wrong.stderr
    garbled = tmp_path / "results.tsv"
    garbled.write_text("a1b2c3d\tfast\t44.0\tkeep\tbaseline\n")
    unreadable, _, _ = run_report(tmp_path, garbled)
    assert unreadable.returncode == 2 and "Traceback" not in unreadable.stderr
    assert "the first line of" in unreadable.stderr and "correct that line and run again." in unreadable.stderr
    assert not png.exists()


@pytest.mark.parametrize("header", ["commit\tval_bpb\tmemory_gb\tstatus\tdescription\n", ""],
                         ids=["with header", "headerless, as program.md asks"])
def test_autoresearch_results_tsv(tmp_path, header):
    results = tmp_path / "results.tsv"
    results.write_text(
        header +
        "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
        "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR to 0.04\n"
        "c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to GeLU activation\n"
        "d4e5f6g\t0.000000\t0.0\tcrash\tdouble model width (OOM)\n"
        "e5f6a7b\t0.990000\t44.1\tkeep\tNS-1: 3 Newton-Schulz steps\n")
    result, png, _ = run_report(tmp_path, results)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "# autoresearch report: results.tsv" in text and "## results" in text
    assert "- baseline: val_bpb 0.997900, test_bpb n/a at a1b2c3d; noise floor unknown (one baseline run)" in text
    assert ("- best: val_bpb 0.990000, test_bpb n/a at e5f6a7b (NS-1), -0.007900 (-0.79%) from the baseline "
            "over 2 kept") in text
    assert "- gain on test: n/a (no test_bpb for the baseline and the best), the unbiased estimate" in text
    assert "- outcomes: 2 keep, 1 discard, 1 crash, 0 timeout, 0 invalid, 0 contended" in text
    assert "experiments per hour is unknown" in text
    assert "| b2c3d4e | #2 | 0.993200 | -0.004700 | n/a | n/a | n/a | n/a | 1 | - | increase LR to 0.04 |" in text
    assert "| e5f6a7b | NS-1 | 0.990000 | -0.003200 | n/a | n/a | n/a | n/a | 1 | - | NS-1: 3 Newton-Schulz steps |" in text
    assert "| 3 | #3 | discard | 1.005000 | +0.011800 | n/a | n/a | n/a | 1 |" in text  # no sigma: no bar
    assert "- d4e5f6g #4 (crash): double model width (OOM)" in text
    size, _, data = pixels(png)
    assert size == (1200, 600) and has_colour(data, GREEN) and has_colour(data, RED)
    assert not has_colour(data, CYAN) and not has_colour(data, PINK)


def test_results_tsv_is_the_default_when_there_is_no_experiments_tsv(tmp_path):
    """The default ledger is looked up at the repository root, so this runs a copy of the module there."""
    root = tmp_path / "repo"
    (root / "agent").mkdir(parents=True)
    for name in ("__init__.py", "report.py", "ledger.py", "state.py", "judge.py", "probe.py", "backlog.py", "stops.py"):
        (root / "agent" / name).write_text((REPO / "agent" / name).read_text())
    (root / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                                      "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    result = subprocess.run([sys.executable, str(root / "agent" / "report.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "# autoresearch report: results.tsv" in result.stdout
    assert (root / "progress.png").exists() and (root / "report.md").exists()


def test_backlog_status_gives_each_item_its_latest_outcome(tmp_path):
    backlog = tmp_path / "backlog.md"
    backlog.write_text(
        "## Newton-Schulz\n\n| ID | Change | Priority |\n|---|---|---|\n"
        "| NS-1 | 3 steps | HIGH |\n| NS-2 | 7 steps | LOW |\n\n"
        "## Momentum\n\n| ID | Change | Priority |\n|---|---|---|\n"
        "| MM-5 | constant 0.95 | MEDIUM |\n| ABL-1 | AdamW for matrices | MEDIUM |\n| C-1 | memory tokens | LOW |\n")
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    # a later row for MM-5 in another tag is the latest outcome
    Ledger(ledger).append(dict(COMMON, tag="other", commit="1212121", experiment="MM-5", status="keep", val_bpb=1.97,
                               delta=-0.03, description="constant momentum", reason="-0.0300 < -min_delta"))
    result = report("--ledger", str(ledger), "--backlog", str(backlog), "--backlog-status")
    assert result.returncode == 0, result.stderr
    lines = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert "kept -0.020000 (nov28 bbbbbbb)" in lines["NS-1"]
    assert "| NS-2 | LOW | pending |" in lines["NS-2"]
    assert "kept -0.030000 (other 1212121)" in lines["MM-5"]
    assert "crashed (nov28 ddddddd): exit code 1: ValueError" in lines["ABL-1"]
    assert "invalid (nov28 eeeeeee): causality:" in lines["C-1"]
    assert list(lines)[1:] == ["NS-1", "MM-5", "ABL-1", "NS-2", "C-1"]  # the loop's order: priority, then file order
    assert "Not in this backlog:" in result.stdout and "- MB-2: kept -0.020000 (nov28 fffffff)" in result.stdout
    assert ("- MM-3: contended (runs again on resume) (nov28 abababa): probe 1.42x the reference > 1.10 after "
            "3 retries") in result.stdout
    assert "5 items: 1 pending, 2 keep, 1 crash, 1 invalid" in result.stdout
    only_nov28 = report("--ledger", str(ledger), "--backlog", str(backlog), "--backlog-status", "--tag", "nov28")
    assert "discarded +0.001000 (nov28 ccccccc)" in only_nov28.stdout


def test_the_default_backlog_has_a_status_for_every_item(tmp_path):
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    result = report("--ledger", str(ledger), "--backlog-status")
    assert result.returncode == 0, result.stderr
    assert "| NS-1 | MEDIUM | kept -0.020000 (nov28 bbbbbbb) |" in result.stdout
    assert "| MM-3 | MEDIUM | contended (runs again on resume) (nov28 abababa): probe 1.42x" in result.stdout
    assert "1 contended" in result.stdout.splitlines()[-1]
    assert "| DN-1 |" in result.stdout and "pending" in result.stdout


def test_backlog_status_reads_the_backlog_from_a_github_issue(tmp_path, github):
    body = ("## Newton-Schulz\n\n| ID | Change | Priority |\n|---|---|---|\n"
            "| NS-1 | 3 steps | HIGH |\n| NS-9 | 9 steps | LOW |\n")
    github.play(issue(body))
    ledger = tmp_path / "experiments.tsv"
    write_ledger(ledger)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("GITHUB_TOKEN", None)
    result = subprocess.run([sys.executable, str(REPO / "agent" / "report.py"), "--ledger", str(ledger),
                             "--backlog-status", "--backlog-issue", "owner/repo#7", "--github-api-url", github.url],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert [seen.path for seen in github.requests] == ["/repos/owner/repo/issues/7"]
    assert "| NS-1 | HIGH | kept -0.020000 (nov28 bbbbbbb) |" in result.stdout
    assert "| NS-9 | LOW | pending |" in result.stdout
    github.play(error(404, "Not Found"))
    missing = subprocess.run([sys.executable, str(REPO / "agent" / "report.py"), "--ledger", str(ledger),
                              "--backlog-status", "--backlog-issue", "owner/repo#8", "--github-api-url", github.url],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert missing.stderr.startswith("report: GitHub at") and "has no issue owner/repo#8 (HTTP 404" in missing.stderr


def test_a_ledger_named_with_ledger_gets_its_report_beside_it(tmp_path):
    """report.py --ledger, run from another directory, writes next to that ledger and leaves the repository's
    own progress.png and report.md as they were; --out and --markdown still win."""
    ledger = tmp_path / "night" / "experiments.tsv"
    ledger.parent.mkdir()
    write_ledger(ledger)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    own = {name: ((REPO / name).stat().st_mtime_ns if (REPO / name).exists() else None)
           for name in ("progress.png", "report.md")}
    result = subprocess.run([sys.executable, str(REPO / "agent" / "report.py"), "--ledger", str(ledger)],
                            capture_output=True, text=True, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert pixels(ledger.parent / "progress.png")[0] == (1200, 600)
    assert (ledger.parent / "report.md").read_text() in result.stdout
    assert "Plot of nov28: progress.png" in result.stdout
    assert list(elsewhere.iterdir()) == []
    assert own == {name: ((REPO / name).stat().st_mtime_ns if (REPO / name).exists() else None) for name in own}
    chosen = subprocess.run([sys.executable, str(REPO / "agent" / "report.py"), "--ledger", str(ledger),
                             "--out", "plots/night.png", "--markdown", "notes/night.md"],
                            capture_output=True, text=True, cwd=elsewhere)
    assert chosen.returncode == 0, chosen.stderr
    assert pixels(elsewhere / "plots" / "night.png")[0] == (1200, 600)
    assert (elsewhere / "notes" / "night.md").read_text().startswith("# autoresearch report: experiments.tsv")
    assert "Plot of nov28: ../plots/night.png" in chosen.stdout  # the link works from where report.md is


def test_help_says_where_the_plot_and_the_summary_go():
    result = report("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--out OUT where the plot goes (default: progress.png next to the ledger that --ledger names" in text
    assert "--markdown MARKDOWN where the summary goes (default: report.md next to the ledger that --ledger" in text
    assert "results.tsv with or without its header" in text


def test_a_keep_without_a_test_score_shows_n_a_never_0(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=1.5, test_bpb=1.52,
                       num_steps=600, runs=1, timestamp="2026-11-28T01:00:00+00:00"))
    ledger.append(dict(COMMON, commit="bbbbbbb", experiment="NS-1", status="keep", val_bpb=1.48, delta=-0.02,
                       threshold=0.008, num_steps=400, runs=1, timestamp="2026-11-28T02:00:00+00:00"))
    result, _, _ = run_report(tmp_path, ledger.path)
    assert result.returncode == 0, result.stderr
    assert "- best: val_bpb 1.480000, test_bpb n/a at bbbbbbb (NS-1)" in result.stdout
    assert "- gain on test: n/a (no test_bpb for the best), the unbiased estimate; on val: -0.020000" in result.stdout
    assert "| bbbbbbb | NS-1 | 1.480000 | -0.020000 | n/a | n/a | 400 (-33% vs baseline) | n/a | 1 |" in result.stdout
