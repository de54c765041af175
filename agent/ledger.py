"""The ledger `experiments.tsv`: one tab-separated row per experiment (a baseline run and a null twin are
experiments of their own), every metric the mean over the row's `runs`; append-only, each row fsynced.

The first five columns are karpathy/autoresearch's results.tsv columns with the same meaning, so its
analysis notebook still reads the file; a repeat baseline run carries status `baseline`, so the
notebook ranks only real keeps as improvements. The loop may be killed mid-write: a reader reports a
row cut short and carries on, `repair()` moves the fragment aside, and `append` never glues onto it.
"""

from __future__ import annotations

import csv
import io
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from agent.stops import UserError

COLUMNS = (
    "commit",            # short sha of the experiment's commit; empty when nothing was committed
    "val_bpb",           # validation bits per byte, lower is better; 0.000000 for a crash, as autoresearch writes
    "memory_gb",         # peak accelerator memory in GB; 0.0 for a crash
    "status",            # keep | discard | crash | timeout | invalid | contended | stale | baseline (a repeat baseline run)
    "description",       # one line saying what the experiment changed
    "tag",               # the run's tag; its branch is autoresearch/<tag>
    "experiment",        # backlog ID (MM-1), `baseline`, or an ID the proposer made up
    "val_loss",          # validation cross-entropy, nats per token
    "reason",            # why this status, in numbers ("-0.0123 < -2 sigma = -0.0082 (...)")
    "timestamp",         # when the row was written, ISO 8601 UTC; filled in when the caller gives none
    "preset",            # gpu | cpu; runs are compared only within one preset
    "data_fingerprint",  # the prepared data and tokenizer the run trained and evaluated on
    "seed",              # AUTORESEARCH_SEED of the run
    "time_budget",       # training seconds the run was given; runs are compared only within one budget
    "training_seconds",  # seconds spent training, from the summary block
    "num_steps",         # optimizer steps taken
    "val_accuracy",      # next-token accuracy on the validation split
    "val_perplexity",    # exp(val_loss)
    "lines_added",       # lines the experiment's diff added to train.py
    "lines_removed",     # lines the experiment's diff removed from train.py
    "delta",             # val_bpb minus the best it was judged against; negative is an improvement
    "sigma",             # the noise of one paired difference the decision used; else the baselines' cross-seed sigma
    "parent",            # the best commit the experiment started from
    "attempts",          # crash-repair attempts the proposer made
    "input_tokens",      # LLM input tokens spent on this experiment, cache reads excluded
    "cached_tokens",     # LLM input tokens read from the prompt cache
    "output_tokens",     # LLM output tokens
    "cost_usd",          # LLM cost of this experiment in US dollars
    "wall_seconds",      # wall-clock seconds of the row's training processes, summed over its runs
    "runs",              # training runs whose metrics this row averages (a confirmed experiment has two or more)
    "run_values",        # each judged run's val_bpb as seed:value, space-separated, in run order
    "tokens_per_second", # training throughput, averaged over the row's runs
    "probe_ratio",       # the slower machine-speed probe around the run over the tag's reference (1.00 = as fast)
    "probe_seconds",     # the slower machine-speed probe around the run; a clean first baseline's is the tag's reference
    "cpu_per_second",    # CPU-seconds per wall second the run's process group got (less than the reference: shared CPUs)
    "test_bpb",          # bits per byte on the test split of the first run's checkpoint (fresh verification process); empty if not scored
    "threshold",         # the bar the decision used: a keep needed delta < -threshold; empty when no judge ran
)

# An experiment's; contended: shared its machine, never judged; stale: beat its parent but not a best that moved
# while it ran (slots), so it runs again on the new best.
OUTCOMES = ("keep", "discard", "crash", "timeout", "invalid", "contended", "stale")
BASELINE = "baseline"  # the experiment name of every baseline run, and the status of each repeat after the first
STATUSES = OUTCOMES + (BASELINE,)  # every status a row may carry
TWIN = "twin"  # the experiment name of a null twin of a baseline: a noise measurement, never a candidate

_FLOAT_FORMATS = {
    "val_bpb": ".6f", "val_loss": ".6f", "delta": ".6f", "sigma": ".6f",
    "memory_gb": ".1f", "cost_usd": ".4f", "val_accuracy": ".6f", "val_perplexity": ".4f",
    "training_seconds": ".1f", "wall_seconds": ".1f", "time_budget": "g",
    "tokens_per_second": ".0f", "probe_ratio": ".3f", "probe_seconds": ".4f", "cpu_per_second": ".2f", "test_bpb": ".6f", "threshold": ".6f",
}
_INTEGER_COLUMNS = {
    "seed", "num_steps", "lines_added", "lines_removed", "attempts",
    "input_tokens", "cached_tokens", "output_tokens", "runs",
}
# Tab, and every character str.splitlines() breaks on, so a row is always one line for any reader.
_BREAKS = re.compile("[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_HEADER = "\t".join(COLUMNS) + "\n"


class LedgerError(UserError):
    """The ledger file cannot be read or extended as it is; the message says what to do."""


@dataclass(frozen=True)
class LedgerRead:
    """The rows of the ledger, and one sentence per line that could not be read as written."""

    rows: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _cell(column: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if column in _FLOAT_FORMATS:
            return format(number, _FLOAT_FORMATS[column])
        if column in _INTEGER_COLUMNS and number.is_integer():
            return str(int(number))
        return repr(number)
    return _BREAKS.sub(" ", str(value))


def _line(row: Mapping[str, object]) -> str:
    cells = {column: _cell(column, row.get(column)) for column in COLUMNS}
    if not cells["timestamp"]:
        cells["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if cells["status"] == "crash":
        cells["val_bpb"] = cells["val_bpb"] or "0.000000"
        cells["memory_gb"] = cells["memory_gb"] or "0.0"
    text = io.StringIO()
    csv.writer(text, delimiter="\t", lineterminator="\n").writerow(cells[column] for column in COLUMNS)
    return text.getvalue()


def _fields(line: str) -> list[str]:
    return next(csv.reader([line.rstrip("\r")], delimiter="\t"), [])


def baseline_status(index: int) -> str:
    """The status of baseline run `index` (0-based): the first is `keep`, the starting point, as in
    autoresearch; every repeat is `baseline`, which autoresearch's analysis notebook neither counts
    as a keep nor ranks as an improvement."""
    return "keep" if index == 0 else BASELINE


def is_baseline_run(row: Mapping[str, object]) -> bool:
    """A finished baseline run: its first (`keep`) or a repeat (`baseline`; ledgers written before the
    rule carry `keep` on repeats too, and read the same)."""
    return row.get("experiment") == BASELINE and row.get("status") in ("keep", BASELINE)


class Ledger:
    """The append-only experiments.tsv at `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def aside(self) -> Path:
        """Where repair() keeps the fragments it moves out of the ledger."""
        return self.path.with_name(self.path.name + ".truncated")

    def append(self, row: Mapping[str, object]) -> str | None:
        """Write one row (missing columns empty) and fsync it; returns repair()'s sentence if a cut-short
        last line had to be moved aside first, else None."""
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown ledger columns: {', '.join(unknown)}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"ledger status {row.get('status')!r} is not one of {', '.join(STATUSES)}")
        if row.get("status") == BASELINE and row.get("experiment") != BASELINE:
            raise ValueError(f"ledger status {BASELINE!r} marks a repeat baseline run, not experiment {row.get('experiment')!r}")
        repaired = self.repair()
        new = not self.path.exists() or self.path.stat().st_size == 0
        data = ((_HEADER if new else "") + _line(row)).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return repaired

    def read(self) -> LedgerRead:
        """All rows as strings; a line with the wrong number of fields is read as far as it goes and reported."""
        if not self.path.exists():
            return LedgerRead()
        data = self.path.read_bytes()
        if not self._check_header(data):
            return LedgerRead(problems=[
                f"{self.path} holds only part of its header line, so it reads as empty; "
                f"Ledger.repair() moves it to {self.aside}."])
        text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        ends_cleanly = lines[-1] == ""
        if ends_cleanly:
            lines.pop()
        result = LedgerRead()
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            fields = _fields(line)
            last = number == len(lines)
            if last and (not ends_cleanly or len(fields) < len(COLUMNS)):
                newline = "" if ends_cleanly else ", no final newline"
                result.problems.append(
                    f"{self.path} line {number} was cut short ({len(fields)} of {len(COLUMNS)} fields{newline}), "
                    f"read with the missing fields empty; Ledger.repair() moves it to {self.aside}.")
            elif len(fields) < len(COLUMNS):
                result.problems.append(
                    f"{self.path} line {number} has {len(fields)} of {len(COLUMNS)} fields, "
                    f"read with the missing fields empty.")
            elif len(fields) > len(COLUMNS):
                result.problems.append(
                    f"{self.path} line {number} has {len(fields)} fields for {len(COLUMNS)} columns, "
                    f"read with the extra fields left out.")
            fields += [""] * (len(COLUMNS) - len(fields))
            result.rows.append(dict(zip(COLUMNS, fields)))
        return result

    def rows(self, tag: str | None = None) -> list[dict[str, str]]:
        """The rows, only those of `tag` when given."""
        return [row for row in self.read().rows if tag is None or row["tag"] == tag]

    def repair(self) -> str | None:
        """Move a cut-short last line to the `.truncated` file (appending), truncate the ledger to its last
        complete row, and say so in one sentence; None when there was nothing to repair."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        self._check_header(data)
        start = self._cut_line_start(data)
        if start is None:
            return None
        fragment = data[start:]
        with open(self.aside, "ab") as aside:
            aside.write(fragment if fragment.endswith(b"\n") else fragment + b"\n")
            aside.flush()
            os.fsync(aside.fileno())
        with open(self.path, "r+b") as ledger:
            ledger.truncate(start)
            os.fsync(ledger.fileno())
        number = data.count(b"\n", 0, start) + 1
        return (f"{self.path} line {number} was cut short ({len(fragment)} bytes); moved it to {self.aside} "
                f"and truncated the ledger to its last complete row.")

    def _check_header(self, data: bytes) -> bool:
        """True when the file starts with this version's header; False when it holds only part of it."""
        if not data:
            return True
        first, newline, _ = data.partition(b"\n")
        if newline and first.decode("utf-8", errors="replace").rstrip("\r") == _HEADER[:-1]:
            return True
        if not newline and _HEADER.encode("utf-8").startswith(first):
            return False
        raise LedgerError(
            f"{self.path} has columns from another version of the harness; move it aside "
            f"(for example to {self.path.name}.old) and run again.")

    @staticmethod
    def _cut_line_start(data: bytes) -> int | None:
        """Byte offset of the last line when it lacks its newline or has too few fields; None when complete."""
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            return complete
        previous = data.rfind(b"\n", 0, complete - 1) + 1
        if previous == 0:
            return None
        last = data[previous:complete].decode("utf-8", errors="replace")
        return previous if last.strip() and len(_fields(last)) < len(COLUMNS) else None

    @property
    def removed(self) -> Path:
        """Where remove_rows() keeps the rows of a removed tag."""
        return self.path.with_name(self.path.name + ".removed")

    def remove_rows(self, tag: str) -> int:
        """Move every row of `tag` to the `.removed` file (appended, fsynced first), then rewrite the ledger
        without them in one atomic rename; how many rows moved. No loop may append meanwhile."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not self._check_header(data):
            return 0
        lines = data.decode("utf-8").splitlines(keepends=True)
        tag_index = COLUMNS.index("tag")
        ours = {i for i, line in enumerate(lines) if i and line.strip()
                and (_fields(line) + [""] * len(COLUMNS))[tag_index] == tag}
        moved = [lines[i] for i in sorted(ours)]
        if not moved:
            return 0
        new = not self.removed.exists() or self.removed.stat().st_size == 0
        with open(self.removed, "a", encoding="utf-8") as aside:
            aside.write((_HEADER if new else "") + "".join(moved))
            aside.flush()
            os.fsync(aside.fileno())
        kept = [line for i, line in enumerate(lines) if i not in ours]
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as rewritten:
            rewritten.write("".join(kept))
            rewritten.flush()
            os.fsync(rewritten.fileno())
        partial.replace(self.path)
        return len(moved)
