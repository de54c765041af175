"""The rule for repeat-baseline rows that lets karpathy/autoresearch's analysis.ipynb read our ledger.

The notebook (read from its repository) upper-cases `status`, calls every KEEP row "kept", takes
the first row as the baseline and ranks `kept.iloc[1:]` as improvements, each against the previous
KEEP row. Its logic is re-implemented below in a few lines (no pandas needed); the ledger is a real
TSV with this project's columns. Rule: a tag's first baseline stays `keep` (the starting point, as
in autoresearch); every repeat baseline is written with status `baseline`, a status the notebook
neither counts nor plots, while our code reads "experiment == baseline and status in (keep, baseline)"
as a baseline run.
"""

from __future__ import annotations

import csv
import io

from agent.ledger import COLUMNS

BASELINE_RUN_STATUSES = ("keep", "baseline")  # the proposed rule: what our replay counts as a baseline run


def repeat_baseline_status(index: int) -> str:
    """The status the loop would write for baseline run `index` (0-based) under the proposed rule."""
    return "keep" if index == 0 else "baseline"


def ledger_tsv(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def notebook(tsv: str) -> dict[str, object]:
    """analysis.ipynb's numbers: outcome counts, keep rate, its baseline, and the ranked "improvements"."""
    rows = list(csv.DictReader(io.StringIO(tsv), delimiter="\t"))
    for row in rows:
        row["status"] = row["status"].strip().upper()
        row["val_bpb"] = float(row["val_bpb"]) if row["val_bpb"] else float("nan")
    kept = [row for row in rows if row["status"] == "KEEP"]
    decided = sum(row["status"] in ("KEEP", "DISCARD") for row in rows)
    hits = [(before["val_bpb"] - row["val_bpb"], row["description"]) for before, row in zip(kept, kept[1:])]
    return {"baseline_bpb": rows[0]["val_bpb"], "keep_rate": len(kept) / decided,
            "improvements": [description for _, description in sorted(hits, reverse=True)]}


def night(baseline_status) -> list[dict[str, object]]:
    """Two baselines, one discard, one keep: the rows a demo writes, with the baselines' statuses from the rule."""
    baselines = [dict(experiment="baseline", val_bpb=f"{bpb:.6f}", status=baseline_status(i), memory_gb="0.1",
                      commit="a1b2c3d", description=f"baseline {i + 1}/2") for i, bpb in enumerate((1.52, 1.50))]
    return [*baselines,
            dict(experiment="MM-1", val_bpb="1.530000", status="discard", commit="b2c3d4e", description="momentum 0.9"),
            dict(experiment="NS-1", val_bpb="1.480000", status="keep", commit="c3d4e5f", description="3 NS steps")]


def test_a_repeat_baseline_written_keep_reads_as_an_improvement_in_the_notebook():
    result = notebook(ledger_tsv(night(lambda index: "keep")))
    assert result["improvements"] == ["baseline 2/2", "3 NS steps"]  # 1.52 -> 1.50 ranks first
    assert result["keep_rate"] == 3 / 4


def test_under_the_rule_the_notebook_sees_one_baseline_and_only_real_improvements():
    result = notebook(ledger_tsv(night(repeat_baseline_status)))
    assert result["improvements"] == ["3 NS steps"]
    assert result["keep_rate"] == 2 / 3  # the first baseline counts as a keep, as in autoresearch's own results
    assert result["baseline_bpb"] == 1.52


def test_under_the_rule_our_replay_still_finds_both_baseline_runs():
    rows = list(csv.DictReader(io.StringIO(ledger_tsv(night(repeat_baseline_status))), delimiter="\t"))
    baselines = [r for r in rows if r["experiment"] == "baseline" and r["status"] in BASELINE_RUN_STATUSES]
    assert [r["description"] for r in baselines] == ["baseline 1/2", "baseline 2/2"]
