"""The ledger on real files, read back with the csv module as the reference reader."""

from __future__ import annotations

import csv

import pytest

from agent.ledger import COLUMNS, STATUSES, Ledger, LedgerError
from agent.stops import UserError

HEADER = "\t".join(COLUMNS)
STAMP = "2025-11-28T21:00:00+00:00"


def csv_rows(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter="\t")
        return list(reader.fieldnames or []), list(reader)


def row(**values) -> dict[str, object]:
    return {"status": "keep", "timestamp": STAMP, **values}


def test_columns_start_with_the_autoresearch_five():
    assert COLUMNS[:5] == ("commit", "val_bpb", "memory_gb", "status", "description")
    assert len(COLUMNS) == len(set(COLUMNS)) == 37
    assert STATUSES == ("keep", "discard", "crash", "timeout", "invalid", "contended", "stale", "baseline")


def test_header_is_written_once(tmp_path):
    path = tmp_path / "experiments.tsv"
    ledger = Ledger(path)
    ledger.append(row(commit="aaaaaaa"))
    ledger.append(row(commit="bbbbbbb", status="discard"))
    lines = path.read_text().split("\n")
    assert lines[0] == HEADER
    assert lines.count(HEADER) == 1
    assert len(lines) == 4 and lines[-1] == ""


def test_an_empty_file_gets_a_header(tmp_path):
    path = tmp_path / "experiments.tsv"
    path.write_text("")
    Ledger(path).append(row())
    assert path.read_text().split("\n")[0] == HEADER


def test_round_trip_formats_numbers_by_hand(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(row(
        commit="a1b2c3d", val_bpb=0.9979, memory_gb=44.04, description="baseline", tag="nov28",
        experiment="baseline", val_loss=2.5, seed=42, num_steps=953.0, delta=-0.0123, sigma=None,
        cost_usd=0.01237, training_seconds=300.04, lines_added=3, preset="gpu",
    ))
    expected = dict.fromkeys(COLUMNS, "")
    expected.update(
        commit="a1b2c3d", val_bpb="0.997900", memory_gb="44.0", status="keep", description="baseline",
        tag="nov28", experiment="baseline", val_loss="2.500000", timestamp=STAMP, seed="42",
        num_steps="953", delta="-0.012300", cost_usd="0.0124", training_seconds="300.0", lines_added="3",
        preset="gpu",
    )
    read = ledger.read()
    assert read.problems == []
    assert read.rows == [expected]


def test_timestamp_is_filled_in_when_missing(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append({"status": "keep"})
    stamp = ledger.read().rows[0]["timestamp"]
    assert stamp[4] == "-" and stamp.endswith("+00:00")


def test_csv_module_reads_what_the_ledger_reads(tmp_path):
    path = tmp_path / "experiments.tsv"
    ledger = Ledger(path)
    ledger.append(row(commit="aaaaaaa", val_bpb=1.0, description='use "relu^2" in the MLP'))
    ledger.append(row(commit="bbbbbbb", val_bpb=0.99, status="discard", reason="-0.0100 >= -2 sigma"))
    ledger.append(row(status="crash", description="out of memory"))
    fieldnames, reference = csv_rows(path)
    assert fieldnames == list(COLUMNS)
    assert ledger.read().rows == reference
    assert reference[0]["description"] == 'use "relu^2" in the MLP'
    assert [r["commit"] for r in reference] == ["aaaaaaa", "bbbbbbb", ""]


def test_crash_without_val_bpb_writes_autoresearch_zeros(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(row(status="crash"))
    ledger.append(row(status="timeout"))
    crash, timeout = ledger.rows()
    assert (crash["val_bpb"], crash["memory_gb"]) == ("0.000000", "0.0")
    assert (timeout["val_bpb"], timeout["memory_gb"]) == ("", "")


def test_tabs_and_newlines_inside_values_become_spaces(tmp_path):
    path = tmp_path / "experiments.tsv"
    ledger = Ledger(path)
    ledger.append(row(description="a\tb\nc\r\nd", reason="one\u2028two"))
    ledger.append(row(description="next"))
    assert len(path.read_text().split("\n")) == 4
    _, reference = csv_rows(path)
    assert reference[0]["description"] == "a b c  d"
    assert reference[0]["reason"] == "one two"
    assert reference[1]["description"] == "next"


def test_unknown_column_and_bad_status_are_rejected(tmp_path):
    path = tmp_path / "experiments.tsv"
    ledger = Ledger(path)
    with pytest.raises(ValueError, match="bpb"):
        ledger.append(row(bpb=1.0))
    with pytest.raises(ValueError, match="kept"):
        ledger.append(row(status="kept"))
    with pytest.raises(ValueError):
        ledger.append({"commit": "aaaaaaa"})
    assert not path.exists()


def test_rows_filter_by_tag(tmp_path):
    ledger = Ledger(tmp_path / "experiments.tsv")
    ledger.append(row(tag="nov28", commit="a"))
    ledger.append(row(tag="nov29", commit="b"))
    assert [r["commit"] for r in ledger.rows("nov29")] == ["b"]
    assert len(ledger.rows()) == 2


def test_missing_file_reads_empty(tmp_path):
    read = Ledger(tmp_path / "experiments.tsv").read()
    assert (read.rows, read.problems) == ([], [])


def write_two_rows_and_a_fragment(path) -> bytes:
    ledger = Ledger(path)
    ledger.append(row(commit="aaaaaaa", val_bpb=1.0))
    ledger.append(row(commit="bbbbbbb", val_bpb=0.98))
    complete = path.read_bytes()
    with open(path, "ab") as file:
        file.write(b"ccccccc\t0.991000\t44.0\tdisc")
    return complete


def test_truncated_last_line_is_reported_and_kept(tmp_path):
    path = tmp_path / "experiments.tsv"
    write_two_rows_and_a_fragment(path)
    read = Ledger(path).read()
    assert [r["commit"] for r in read.rows] == ["aaaaaaa", "bbbbbbb", "ccccccc"]
    assert read.rows[1]["val_bpb"] == "0.980000"
    fragment = read.rows[2]
    assert (fragment["val_bpb"], fragment["memory_gb"], fragment["status"]) == ("0.991000", "44.0", "disc")
    assert all(fragment[column] == "" for column in COLUMNS[4:])
    assert len(read.problems) == 1
    assert "line 4" in read.problems[0] and "4 of 37 fields" in read.problems[0]


def test_a_complete_row_without_its_newline_is_not_dropped(tmp_path):
    path = tmp_path / "experiments.tsv"
    ledger = Ledger(path)
    ledger.append(row(commit="aaaaaaa"))
    ledger.append(row(commit="bbbbbbb", description="last"))
    before = ledger.read().rows
    path.write_bytes(path.read_bytes()[:-1])
    read = ledger.read()
    assert read.rows == before
    assert len(read.problems) == 1 and "line 3" in read.problems[0]


def test_a_short_line_in_the_middle_is_reported_and_kept(tmp_path):
    path = tmp_path / "experiments.tsv"
    path.write_text(HEADER + "\nshort\t1.0\n" + "\t".join(["x"] * len(COLUMNS)) + "\n")
    read = Ledger(path).read()
    assert [r["commit"] for r in read.rows] == ["short", "x"]
    assert read.problems == [f"{path} line 2 has 2 of 37 fields, read with the missing fields empty."]


def test_repair_moves_the_fragment_aside_and_the_next_append_is_clean(tmp_path):
    path = tmp_path / "experiments.tsv"
    complete = write_two_rows_and_a_fragment(path)
    ledger = Ledger(path)
    message = ledger.repair()
    assert message is not None and "line 4" in message and "experiments.tsv.truncated" in message
    assert path.read_bytes() == complete
    aside = tmp_path / "experiments.tsv.truncated"
    assert aside.read_bytes() == b"ccccccc\t0.991000\t44.0\tdisc\n"
    assert ledger.repair() is None

    ledger.append(row(commit="ddddddd", description="after the repair"))
    _, reference = csv_rows(path)
    assert [r["commit"] for r in reference] == ["aaaaaaa", "bbbbbbb", "ddddddd"]
    assert all(None not in r and None not in r.values() for r in reference)
    assert ledger.read().problems == []


def test_repair_appends_to_what_it_moved_before(tmp_path):
    path = tmp_path / "experiments.tsv"
    write_two_rows_and_a_fragment(path)
    ledger = Ledger(path)
    ledger.repair()
    with open(path, "ab") as file:
        file.write(b"eeeeeee\t0.97")
    ledger.repair()
    assert (tmp_path / "experiments.tsv.truncated").read_text() == (
        "ccccccc\t0.991000\t44.0\tdisc\neeeeeee\t0.97\n")


def test_append_never_glues_onto_a_fragment(tmp_path):
    path = tmp_path / "experiments.tsv"
    write_two_rows_and_a_fragment(path)
    message = Ledger(path).append(row(commit="ddddddd"))
    assert message is not None and "line 4" in message
    _, reference = csv_rows(path)
    assert [r["commit"] for r in reference] == ["aaaaaaa", "bbbbbbb", "ddddddd"]
    assert reference[2]["status"] == "keep"
    assert Ledger(path).append(row(commit="eeeeeee")) is None


def test_a_header_cut_short_reads_empty_and_is_repaired(tmp_path):
    path = tmp_path / "experiments.tsv"
    path.write_text("commit\tval_b")
    ledger = Ledger(path)
    read = ledger.read()
    assert read.rows == [] and len(read.problems) == 1
    assert ledger.append(row(commit="aaaaaaa")) is not None
    fieldnames, reference = csv_rows(path)
    assert fieldnames == list(COLUMNS)
    assert [r["commit"] for r in reference] == ["aaaaaaa"]


def test_an_older_header_raises_a_user_error(tmp_path):
    path = tmp_path / "experiments.tsv"
    old = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\na1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
    path.write_text(old)
    ledger = Ledger(path)
    for action in (ledger.read, ledger.repair, lambda: ledger.append(row())):
        with pytest.raises(LedgerError, match="move it aside") as error:
            action()
        assert isinstance(error.value, UserError)
        assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")
    assert path.read_text() == old
