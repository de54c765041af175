"""Repeat baselines and karpathy/autoresearch's analysis.ipynb: the loop's own ledger, renamed to results.tsv.

The notebook (read from its repository) upper-cases `status`, calls every KEEP row "kept", takes the
first row as the baseline and ranks `kept.iloc[1:]` as improvements, each against the previous KEEP
row. Its logic is re-implemented below in a few lines (no pandas needed). The rule (agent/ledger.py):
a tag's first baseline is `keep`, the starting point, as in autoresearch; every repeat baseline is
`baseline`, a status the notebook neither counts as a keep nor ranks; the loop and the report read
"experiment == baseline and status in (keep, baseline)" as a baseline run, so a ledger written before
the rule (repeats with `keep`) still resumes and reports as it did.

The ledgers here are written by the real loop (agent/loop.py as a subprocess, training the stand-in
tests/fakes/train.py of tests/test_loop.py, whose fixtures these reuse).
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import statistics
from pathlib import Path

import pytest

from agent.ledger import Ledger, is_baseline_run
from agent.report import read_rows, summarize
from test_loop import (FAST, MB_2, MM_1, NS_1, TAG, Project, cache, make_project, no_stray_processes,  # noqa: F401
                       project)

REPEATS = ("--baseline-repeats", "3")  # a first baseline and two repeats


def notebook(results_tsv: Path) -> dict[str, object]:
    """analysis.ipynb's numbers: its baseline, what it lists as kept, its keep rate, and the ranked "improvements"."""
    with open(results_tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        row["status"] = row["status"].strip().upper()
        row["val_bpb"] = float(row["val_bpb"]) if row["val_bpb"] else math.nan
    kept = [row for row in rows if row["status"] == "KEEP"]
    decided = sum(row["status"] in ("KEEP", "DISCARD") for row in rows)
    hits = [(before["val_bpb"] - row["val_bpb"], row["description"]) for before, row in zip(kept, kept[1:])]
    return {"baseline_bpb": rows[0]["val_bpb"], "baseline": rows[0]["description"],
            "kept": [row["description"] for row in kept], "keep_rate": len(kept) / decided,
            "improvements": [description for _, description in sorted(hits, reverse=True)]}


def as_results_tsv(ledger: Path) -> Path:
    """A copy of the ledger under the name the notebook reads."""
    results = ledger.parent.parent / "results.tsv"  # beside the checkout, which must stay clean
    shutil.copy(ledger, results)
    return results


def written_before_the_rule(ledger: Path) -> None:
    """Rewrite the ledger as the loop wrote it before the rule: every baseline run `keep`."""
    text = io.StringIO()
    with open(ledger, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        writer = csv.DictWriter(text, fieldnames=reader.fieldnames, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in reader:
            writer.writerow(dict(row, status="keep") if is_baseline_run(row) else row)
    ledger.write_text(text.getvalue())


def test_the_notebook_sees_one_baseline_and_only_real_improvements_and_an_older_ledger_resumes(project: Project):
    backlog = project.backlog(NS_1, MM_1)

    result = project.loop("--tag", TAG, "--backlog", backlog, *FAST, *REPEATS)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("baseline", "baseline"), ("NS-1", "keep"), ("MM-1", "discard")]
    seen = notebook(as_results_tsv(project.ledger))
    assert seen["baseline"] == "baseline 1/3" and seen["baseline_bpb"] == float(rows[0]["val_bpb"])
    assert seen["kept"] == ["baseline 1/3", rows[3]["description"]]
    assert seen["improvements"] == [rows[3]["description"]]  # NS-1 alone, ranked against the first baseline
    assert seen["keep_rate"] == 2 / 3
    # The judge still used all three baselines: NS-1's sigma is their cross-seed one.
    baselines = [float(r["val_bpb"]) for r in rows[:3]]
    assert float(rows[3]["sigma"]) == pytest.approx(statistics.stdev(baselines), abs=2e-6)
    assert "from 3 baseline runs" in rows[3]["reason"], rows[3]["reason"]
    # The report reads the repeats as baseline runs: the noise floor from all three, each one plotted.
    summary = summarize(TAG, read_rows(project.ledger).rows)
    assert [r["seed"] for r in summary.baselines] == ["42", "43", "44"]
    assert summary.sigma == pytest.approx(statistics.stdev(baselines), abs=2e-6)
    plotted = [p.value for p in summary.points if p.row["experiment"] == "baseline"]
    assert plotted == pytest.approx(baselines, abs=1e-9)
    assert [p.row["experiment"] for p in summary.kept] == ["NS-1"] and sum(summary.counts.values()) == 2
    # So does it on autoresearch's five columns alone, without a header, as an outside agent writes results.tsv.
    five = project.root.parent / "five.tsv"
    five.write_text("".join("\t".join(r[c] for c in ("commit", "val_bpb", "memory_gb", "status", "description")) + "\n"
                            for r in rows))
    read = read_rows(five)
    assert read.format == "results.tsv" and not read.problems
    assert len(summarize("five", read.rows).baselines) == 3
    report = project.report()
    assert report.returncode == 0, report.stderr
    outcomes = next(line for line in report.stdout.splitlines() if line.startswith("- outcomes:"))
    assert "1 keep, 1 discard" in outcomes and "baseline" not in outcomes, outcomes

    # The same night as the loop wrote it before the rule: the notebook ranks the repeats as improvements,
    # and the loop resumes it reading all three as baseline runs: none runs again, and they give the sigma.
    written_before_the_rule(project.ledger)
    old = project.rows()
    assert [r["status"] for r in old] == ["keep", "keep", "keep", "keep", "discard"]
    before = notebook(as_results_tsv(project.ledger))
    assert sorted(before["improvements"]) == sorted(["baseline 2/3", "baseline 3/3", rows[3]["description"]])

    again = project.loop("--tag", TAG, "--backlog", project.backlog(NS_1, MM_1, MB_2), *FAST, *REPEATS)

    assert again.returncode == 0, again.stdout + again.stderr
    resumed = project.rows()
    assert resumed[:5] == old and [r["experiment"] for r in resumed[5:]] == ["MB-2"], again.stdout
    assert "baseline started" not in again.stdout
    assert float(resumed[5]["sigma"]) == pytest.approx(statistics.stdev(baselines), abs=2e-6)
    assert float(resumed[5]["delta"]) == pytest.approx(float(resumed[5]["val_bpb"]) - float(rows[3]["val_bpb"]), abs=2e-6)
    assert len(summarize(TAG, read_rows(project.ledger).rows).baselines) == 3


def test_the_ledger_refuses_status_baseline_on_anything_but_a_baseline_run(tmp_path: Path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(dict(commit="a1b2c3d", experiment="baseline", status="baseline", val_bpb=1.5, tag=TAG))
    with pytest.raises(ValueError, match="marks a repeat baseline run, not experiment 'NS-1'"):
        ledger.append(dict(commit="b2c3d4e", experiment="NS-1", status="baseline", val_bpb=1.4, tag=TAG))
    assert [(r["experiment"], r["status"]) for r in ledger.rows()] == [("baseline", "baseline")]
