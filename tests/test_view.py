"""The loop's views print what a verdict rests on: val_bpb rounded, with the run's steps and throughput."""

from __future__ import annotations

import io
import re
import statistics

from rich.console import Console

from agent.ledger import Ledger
from agent.view import LiveView, PlainView

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COMMON = dict(tag="nov28", preset="cpu", data_fingerprint="builtin:abc", time_budget=20)


def confirmed_row() -> dict[str, object]:
    """A row as the loop hands it to the view: numbers as Python computed them, a mean of two runs included."""
    return dict(COMMON, commit="0123456789abcdef", experiment="MM-1", status="keep",
                val_bpb=statistics.fmean([2.955749, 2.9557480000000004]), num_steps=612.0, tokens_per_second=10234.4,
                runs=2, run_values="42:2.955749 43:2.955748", description="MUON_MOMENTUM_START = 0.9",
                reason="-0.0123 < -0.0082 (mean of 2 runs)")


def test_plain_view_rounds_val_bpb_and_shows_the_runs_behind_it(tmp_path):
    row = confirmed_row()
    assert repr(row["val_bpb"]) == "2.9557485000000003"  # the value the issue saw printed
    stream = io.StringIO()
    with PlainView("nov28", stream=stream) as view:
        view.finished(row, [])
        view.finished(dict(COMMON, commit="", experiment="ABL-1", status="crash", reason="exit code 1"), [])
        view.finished(dict(COMMON, commit="fedcba9", experiment="MM-3", status="contended", val_bpb="2.990000",
                           num_steps="151", tokens_per_second="4100", runs="4", reason="probe 1.42x > 1.10"), [])
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines[0] == ("MM-1: keep val_bpb 2.955749 (612 steps, 10,234 tok/s, mean of 2 runs) "
                        "(-0.0123 < -0.0082 (mean of 2 runs)) [0123456]")
    assert lines[1] == "ABL-1: crash val_bpb - (exit code 1) [-]"
    assert lines[2] == "MM-3: contended val_bpb 2.990000 (151 steps, 4,100 tok/s, mean of 4 runs) (probe 1.42x > 1.10) [fedcba9]"
    assert "2.9557485000000003" not in stream.getvalue()


def test_live_view_table_shows_steps_and_tokens_per_second_beside_val_bpb(tmp_path):
    """The table is fed the rows as the ledger file holds them: strings, a crash's 0.000000 included."""
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(dict(COMMON, commit="aaaaaaa", experiment="baseline", status="keep", val_bpb=2.97, num_steps=600,
                       tokens_per_second=10000, runs=1))
    ledger.append(dict(COMMON, commit="bbbbbbb", experiment="ABL-1", status="crash", runs=1, reason="exit code 1"))
    ledger.append(dict(COMMON, commit="ccccccc", experiment="MB-2", status="discard", val_bpb=2.981, num_steps=380,
                       tokens_per_second=6300, runs=1))
    ledger.append(confirmed_row())
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    with LiveView("nov28", console=console) as view:
        view.finished(confirmed_row(), ledger.rows())
    shown = ANSI.sub("", console.file.getvalue()).split("autoresearch loop")[-1]
    assert re.search(r"baseline\s+keep\s+2\.970000\s+600\s+10,000\s", shown), shown
    assert re.search(r"ABL-1\s+crash\s+-\s+-\s+-\s", shown), shown
    assert re.search(r"MB-2\s+discard\s+2\.981000\s+380\s+6,300\s", shown), shown
    assert re.search(r"MM-1\s+keep\s+2\.955749\s+612\s+10,234\s", shown), shown
    assert "MM-1: keep val_bpb 2.955749 (612 steps, 10,234 tok/s, mean of 2 runs)" in shown
    assert "2.9557485000000003" not in shown and "0.000000" not in shown
