"""
The morning report: progress.png, and an account of what the loop kept, discarded and refused, and why.

    python agent/report.py                         # plot the latest tag, summarise every tag
    python agent/report.py --tag nov28             # only nov28
    python agent/report.py --ledger results.tsv    # autoresearch's 5-column results.tsv, header or not
    python agent/report.py --backlog-status        # each backlog item with its latest outcome

The plot goes to progress.png and the summary to stdout and report.md: next to the ledger that
--ledger names, else at the repository root, unless --out / --markdown say otherwise. Nothing here
writes to the ledger.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from agent.backlog import BacklogItem, backlog_from_flags  # noqa: E402
from agent.judge import NoiseFloor  # noqa: E402
from agent.ledger import BASELINE, COLUMNS, OUTCOMES, STATUSES, TWIN, Ledger, is_baseline_run  # noqa: E402
from agent.state import TagState, replay, run_values  # noqa: E402
from agent.stops import UserError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
AUTORESEARCH_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
NOT_MEASURED = tuple(s for s in OUTCOMES if s not in ("keep", "discard", "stale"))  # no verdict: failed or contended
NOISE_RUNS = ("baseline", TWIN)  # the noise measurements: never judged, never counted as experiments
PAUSE_SECONDS = 3600.0  # a gap between two rows longer than this is a stopped loop, not an experiment
STEPS_TOLERANCE = 0.10  # a run whose steps differ from the baseline's by more than this is flagged
_ID = re.compile(r"^\s*([A-Z][A-Z0-9]*-\d+)\b")
_NO_TIME = datetime.min.replace(tzinfo=timezone.utc)


class ReportError(UserError):
    """The report cannot be made from what it was given; the message says what to do."""


# -- reading -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rows:
    """The rows of a ledger (every column a string), sentences about lines that read badly, and the format."""

    rows: list[dict[str, str]]
    problems: list[str]
    format: str  # "experiments.tsv" | "results.tsv"


def read_rows(path: Path) -> Rows:
    """Read experiments.tsv, or autoresearch's results.tsv (commit, val_bpb, memory_gb, status, description),
    with its header line or, as program.md asks an outside agent to write it, without one."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            first = f.readline().rstrip("\r\n").split("\t")
    except FileNotFoundError:
        raise ReportError(f"there is no ledger at {path}; run python agent/loop.py first, "
                          f"or point --ledger at an experiments.tsv or results.tsv.") from None
    if first == list(AUTORESEARCH_COLUMNS):
        return _read_results_tsv(path, header=True)
    if _is_result_row(first):
        return _read_results_tsv(path, header=False)
    if len(first) == len(AUTORESEARCH_COLUMNS):
        raise ReportError(f"the first line of {path} has five fields but is neither results.tsv's header nor a "
                          f"row of it (commit, val_bpb as a number, memory_gb, status: one of "
                          f"{', '.join(STATUSES)}, description); correct that line and run again.")
    read = Ledger(path).read()  # raises LedgerError, a UserError, for a file of another version
    return Rows(read.rows, read.problems, "experiments.tsv")


def _is_result_row(fields: list[str]) -> bool:
    """A results.tsv data line: five fields, a number for val_bpb, and a known status."""
    return (len(fields) == len(AUTORESEARCH_COLUMNS) and math.isfinite(_float(fields[1]))
            and fields[3].strip() in STATUSES)


def _read_results_tsv(path: Path, *, header: bool) -> Rows:
    """autoresearch's results.tsv has no tag, IDs, sigma or times: the tag is the file's stem, the first
    row (or one described as a baseline) is the baseline, and an ID is the description's leading
    `XX-N`, else the row number."""
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        if header:
            next(reader, None)
        for number, fields in enumerate(reader, start=2 if header else 1):
            if not any(cell.strip() for cell in fields):
                continue
            if len(fields) != len(AUTORESEARCH_COLUMNS):
                problems.append(f"{path} line {number} has {len(fields)} of {len(AUTORESEARCH_COLUMNS)} fields; "
                                f"read as far as it goes.")
            cells = dict(zip(AUTORESEARCH_COLUMNS, fields + [""] * len(AUTORESEARCH_COLUMNS)))
            row = {column: "" for column in COLUMNS}
            row.update(cells, tag=path.stem)
            description = cells["description"].strip()
            found = _ID.match(description)
            if not rows or description.lower().startswith("baseline") or cells["status"].strip() == BASELINE:
                row["experiment"] = "baseline"
            else:
                row["experiment"] = found.group(1) if found else f"#{len(rows) + 1}"
            rows.append(row)
    return Rows(rows, problems, "results.tsv")


def tags_by_recency(rows: list[dict[str, str]]) -> list[str]:
    """Every tag, the one with the newest row (by timestamp) first; rows without a timestamp are older
    than any with one and rank by their place in the file."""
    newest: dict[str, tuple[datetime, int]] = {}
    for index, row in enumerate(rows):
        newest[row["tag"]] = max(newest.get(row["tag"], (_NO_TIME, -1)), (_time(row["timestamp"]) or _NO_TIME, index))
    return sorted(newest, key=newest.__getitem__, reverse=True)


def _float(text: str | None) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _score(text: str) -> float:
    """A bits-per-byte score; nan when the row has none (empty, or a crash's 0)."""
    value = _float(text)
    return value if value > 0 else math.nan


def _time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# -- what happened in one tag ------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One ledger row placed on the plot, and where the best stood after it."""

    index: int
    row: dict[str, str]
    value: float        # val_bpb; nan when the run measured nothing worth plotting (failed or contended)
    best: float         # the best val_bpb after this row
    delta: float        # val_bpb minus the best it was judged against; nan when unknown
    bar: float          # the value a keep had to beat at this decision (best - threshold); nan when not judged
    runs: int           # training runs the row averages

    @property
    def confirmed(self) -> bool:
        return self.runs >= 2 and math.isfinite(self.value)


@dataclass(frozen=True)
class TagSummary:
    tag: str
    rows: list[dict[str, str]]
    points: list[Point]
    state: TagState            # the rows replayed as the loop replays them: baselines, null twins, best, noise floor
    baseline_steps: float      # mean optimizer steps of the finished baselines; nan when unknown
    sigma: float               # the noise of one paired difference, as the judge used it; nan when unknown
    counts: Counter            # experiments by status
    baseline_counts: Counter   # baseline runs by status
    cost: float
    tokens: tuple[int, int, int]  # input, cached, output
    hours: float               # loop time spanned by the rows, pauses left out; nan when the rows carry no times
    pauses: int

    @property
    def baselines(self) -> list[dict[str, str]]:
        """The finished baseline runs."""
        return list(self.state.baselines)  # type: ignore[arg-type]

    @property
    def baseline(self) -> float:
        """The first baseline's val_bpb (seed of every candidate): what the judge started from."""
        return _float(self.baselines[0]["val_bpb"]) if self.baselines else math.nan

    @property
    def baseline_test(self) -> float:
        """The first baseline's test_bpb; nan when not scored."""
        return _score(self.baselines[0]["test_bpb"]) if self.baselines else math.nan

    @property
    def floor(self) -> NoiseFloor:
        return self.state.floor

    @property
    def best_row(self) -> dict[str, str] | None:
        return self.state.best_row  # type: ignore[return-value]

    @property
    def best(self) -> float:
        return _float(self.best_row["val_bpb"]) if self.best_row is not None else math.nan

    @property
    def experiments(self) -> list[dict[str, str]]:
        return [row for row in self.rows if row["experiment"] not in NOISE_RUNS]

    @property
    def kept(self) -> list[Point]:
        return [p for p in self.points if p.row["status"] == "keep" and p.row["experiment"] != "baseline"]

    @property
    def best_test(self) -> float:
        return _score(self.best_row["test_bpb"]) if self.best_row is not None else math.nan

    @property
    def training_runs(self) -> int:
        return sum(_runs(row) for row in self.rows)


def _runs(row: dict[str, str]) -> int:
    """Training runs behind a row: its `runs` column, else one."""
    runs = _float(row["runs"])
    return int(runs) if math.isfinite(runs) and runs >= 1 else 1


def summarize(tag: str, rows: list[dict[str, str]], *, k: float = 2.0) -> TagSummary:
    """Replay the tag's rows as the loop does (agent/state.py), one row at a time: where the best stood after
    each, and the bar each decision used. The sigma is the judge's (null twins included); a ledger without
    baselines to measure it takes the last row's `sigma`. A row without a `threshold` (older ledgers,
    results.tsv) is taken to have been judged at k x sigma."""
    final = replay(rows)
    unit = final.floor.unit
    sigma = unit if unit is not None else _float(next((r["sigma"] for r in reversed(rows) if r["sigma"]), ""))
    steps = [v for v in (_float(r["num_steps"]) for r in final.baselines) if math.isfinite(v)]
    state, points = TagState(), []
    for index, row in enumerate(rows):
        best = _float(state.best_row["val_bpb"]) if state.best_row is not None else math.nan  # before this row
        state = state.after(row)
        status, value = row["status"], _float(row["val_bpb"])
        plotted = ((status in ("keep", "discard") and row["experiment"] != TWIN or is_baseline_run(row))
                   and math.isfinite(value) and value > 0)
        delta, bar = _float(row["delta"]), math.nan
        if row["experiment"] == "baseline":
            delta = math.nan  # the best starts at the first baseline; later baselines only measure noise
        elif plotted:  # an experiment, judged against the best so far
            if math.isnan(delta) and math.isfinite(best):
                delta = value - best  # results.tsv carries no delta
            threshold = _float(row["threshold"])
            if math.isnan(threshold):
                row_sigma = _float(row["sigma"])
                threshold = k * (row_sigma if math.isfinite(row_sigma) else sigma)
            bar = best - threshold
        after = _float(state.best_row["val_bpb"]) if state.best_row is not None else math.nan
        points.append(Point(index, row, value if plotted else math.nan, after, delta, bar, _runs(row)))
    counts = Counter(r["status"] for r in rows if r["experiment"] not in NOISE_RUNS)
    baseline_counts = Counter(r["status"] for r in rows if r["experiment"] == "baseline")
    cost = sum(v for v in (_float(r["cost_usd"]) for r in rows) if math.isfinite(v))
    tokens = tuple(sum(int(_float(r[c])) for r in rows if math.isfinite(_float(r[c])))
                   for c in ("input_tokens", "cached_tokens", "output_tokens"))
    hours, pauses = _loop_hours(rows)
    return TagSummary(tag, rows, points, final, statistics.fmean(steps) if steps else math.nan, sigma, counts,
                      baseline_counts, cost, tokens, hours, pauses)  # type: ignore[arg-type]


def _loop_hours(rows: list[dict[str, str]]) -> tuple[float, int]:
    """Hours from the first run's start to the last row, leaving out gaps longer than PAUSE_SECONDS
    (the loop was stopped and resumed later); nan when the rows carry no timestamps."""
    stamps = [(t, _float(r["wall_seconds"])) for r in rows if (t := _time(r["timestamp"])) is not None]
    if not stamps:
        return math.nan, 0
    first_time, first_wall = stamps[0]
    seconds = first_wall if math.isfinite(first_wall) else 0.0
    pauses = 0
    for (before, _), (after, wall) in zip(stamps, stamps[1:]):
        gap = (after - before).total_seconds()
        if gap > PAUSE_SECONDS:
            pauses += 1
            gap = wall if math.isfinite(wall) else 0.0  # the run after the pause still took its time
        seconds += max(gap, 0.0)
    return seconds / 3600, pauses


# -- the summary -------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _bpb(value: float) -> str:
    """A bits-per-byte value, or n/a where the row has none (never 0)."""
    return f"{value:.6f}" if math.isfinite(value) and value > 0 else "n/a"


def _signed(value: float) -> str:
    return f"{value:+.6f}" if math.isfinite(value) else "n/a"


def _steps(row: dict[str, str], baseline_steps: float) -> tuple[float, float]:
    """The run's optimizer steps, and their relative difference from the baseline's when it exceeds
    STEPS_TOLERANCE (else nan): a value from a shorter run is not a measurement of the change alone."""
    steps = _float(row["num_steps"])
    off = steps / baseline_steps - 1 if baseline_steps > 0 else math.nan
    return steps, off if abs(off) > STEPS_TOLERANCE else math.nan


def steps_cell(row: dict[str, str], baseline_steps: float) -> str:
    steps, off = _steps(row, baseline_steps)
    if not math.isfinite(steps):
        return "n/a"
    return f"{steps:.0f}" + (f" ({off:+.0%} vs baseline)" if math.isfinite(off) else "")


def _tokens_per_second(row: dict[str, str]) -> str:
    rate = _float(row["tokens_per_second"])
    return f"{rate:,.0f}" if math.isfinite(rate) else "n/a"


def _failure(row: dict[str, str]) -> str:
    status = "contended, runs again on resume" if row["status"] == "contended" else row["status"]
    return (f"- {row['commit'] or '-'} {row['experiment']} ({status}): "
            f"{_cell(row['reason']) or _cell(row['description']) or 'no reason recorded'}")


def _describe_tag(s: TagSummary) -> list[str]:
    first = s.rows[0]
    setting = ", ".join(part for part in (
        f"{first['preset']} preset" if first["preset"] else "",
        f"data {first['data_fingerprint']}" if first["data_fingerprint"] else "",
        f"{_float(first['time_budget']):g} s per run" if math.isfinite(_float(first["time_budget"])) else "",
    ) if part)
    lines = [f"## {s.tag}" + (f" ({setting})" if setting else ""), ""]
    experiments = len(s.experiments)
    twins = sum(row["experiment"] == TWIN for row in s.rows)
    counted = f"{len(s.rows) - experiments - twins} baseline, " + (f"{twins} null twin{'s' if twins != 1 else ''}, " if twins else "")
    runs = (f"- rows: {len(s.rows)} ({counted}{experiments} experiments; "
            f"{s.training_runs} training run{'s' if s.training_runs != 1 else ''})")
    if math.isfinite(s.hours) and s.hours > 0:
        paused = f", {s.pauses} pause{'s' if s.pauses != 1 else ''} over an hour left out" if s.pauses else ""
        runs += f" in {s.hours:.2f} h of loop time{paused}: {experiments / s.hours:.1f} experiments per hour"
    else:
        runs += "; the ledger carries no times, so experiments per hour is unknown"
    lines.append(runs)

    if s.baselines:
        values = ", ".join(r["val_bpb"] for r in s.baselines)
        noise = (f"noise floor sigma {s.sigma:.6f}" if math.isfinite(s.sigma) else "noise floor unknown")
        spread = f" from {len(s.baselines)} runs ({values})" if len(s.baselines) > 1 else " (one baseline run)"
        if s.floor.paired:  # the judge's sigma came from the null twins; the baselines' spread is shown beside it
            cross = f"{s.floor.sigma:.6f}" if s.floor.sigma is not None else "unknown"
            spread = (f", the paired sigma of {s.floor.twins} null twins that the judge used (the baselines' "
                      f"cross-seed sigma: {cross}{spread})")
        steps = f", {s.baseline_steps:.0f} steps" if math.isfinite(s.baseline_steps) else ""
        lines.append(f"- baseline: val_bpb {s.baseline:.6f}, test_bpb {_bpb(s.baseline_test)} at "
                     f"{s.baselines[0]['commit'] or '-'}{steps}; {noise}{spread}")
    else:
        lines.append("- baseline: none finished, so nothing was judged")
    failed_baselines = {status: s.baseline_counts[status] for status in NOT_MEASURED if s.baseline_counts[status]}
    if failed_baselines:
        lines.append(f"- failed baseline runs: {sum(failed_baselines.values())} ("
                     + ", ".join(f"{n} {status}" for status, n in failed_baselines.items()) + "), listed below")
    if s.best_row is not None and s.best_row["experiment"] != "baseline":
        gain, test_gain = s.best - s.baseline, s.best_test - s.baseline_test
        lines.append(f"- best: val_bpb {s.best:.6f}, test_bpb {_bpb(s.best_test)} at {s.best_row['commit']} "
                     f"({s.best_row['experiment']}), {gain:+.6f} ({100 * gain / s.baseline:+.2f}%) from the baseline "
                     f"over {len(s.kept)} kept experiment{'s' if len(s.kept) != 1 else ''}")
        unscored = " and ".join(name for name, value in (("the baseline", s.baseline_test), ("the best", s.best_test))
                                if math.isnan(value))
        on_test = (f"{test_gain:+.6f} ({100 * test_gain / s.baseline_test:+.2f}%)" if math.isfinite(test_gain)
                   else f"n/a (no test_bpb for {unscored})")
        lines.append(f"- gain on test: {on_test}, the unbiased estimate; on val: {gain:+.6f}, biased in the "
                     f"night's favour, because the search kept what happened to score well on val")
    elif s.baselines:
        lines.append(f"- best: the baseline, val_bpb {s.baseline:.6f}; no experiment beat it")
    lines.append("- outcomes: " + ", ".join(f"{s.counts.get(status, 0)} {status}" for status in OUTCOMES))
    if s.cost or any(s.tokens):
        lines.append(f"- API cost: ${s.cost:.2f} ({s.tokens[0]:,} input, {s.tokens[1]:,} cached, "
                     f"{s.tokens[2]:,} output tokens)")
    else:
        lines.append("- API cost: $0.00 (no LLM calls recorded)")

    baseline_rows = [r for r in s.rows if r["experiment"] == "baseline"]
    if baseline_rows:
        lines += ["", "Baseline runs:", "", "| commit | seed | status | val_bpb | test_bpb | steps | tok/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['commit'] or '-'} | {r['seed'] or '-'} | {r['status']} | {_bpb(_float(r['val_bpb']))} | "
                  f"{_bpb(_float(r['test_bpb']))} | {steps_cell(r, s.baseline_steps)} | {_tokens_per_second(r)} |"
                  for r in baseline_rows]
    if s.kept:
        previous_test = s.baseline_test
        lines += ["", "Kept, in order (each one is the branch's new tip):", "",
                  "| commit | experiment | val_bpb | delta | test_bpb | test delta | steps | tok/s | runs | reason | "
                  "description |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in s.kept:
            test = _score(p.row["test_bpb"])
            lines.append(f"| {p.row['commit']} | {p.row['experiment']} | {p.value:.6f} | {_signed(p.delta)} | "
                         f"{_bpb(test)} | {_signed(test - previous_test)} | {steps_cell(p.row, s.baseline_steps)} | "
                         f"{_tokens_per_second(p.row)} | {p.runs} | {_cell(p.row['reason']) or '-'} | "
                         f"{_cell(p.row['description'])} |")
            previous_test = test
    experiment_points = [p for p in s.points if p.row["experiment"] != "baseline"]
    if experiment_points:
        lines += ["", "Every experiment, in ledger order (bar: the val_bpb a keep had to beat):", "",
                  "| # | experiment | status | val_bpb | delta | bar | steps | tok/s | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p.index + 1} | {p.row['experiment']} | {p.row['status']} | {_bpb(_float(p.row['val_bpb']))} | "
                  f"{_signed(p.delta)} | "
                  f"{_bpb(p.bar)} | {steps_cell(p.row, s.baseline_steps)} | {_tokens_per_second(p.row)} | {p.runs} |"
                  for p in experiment_points]
    failed = [r for r in s.rows if r["status"] in NOT_MEASURED]
    if failed:
        lines += ["", "Crashed, timed out, refused or contended (baselines included):", ""]
        lines += [_failure(r) for r in failed]
    return lines


def report_text(summaries: list[TagSummary], source: Path, plotted: Path | None) -> str:
    lines = [f"# autoresearch report: {source.name}", ""]
    if plotted is not None:
        lines += [f"Plot of {summaries[0].tag}: {plotted}", ""]
    for s in summaries:
        lines += _describe_tag(s) + [""]
    return "\n".join(lines).rstrip() + "\n"


# -- the plot ----------------------------------------------------------------------------------

def _label(row: dict[str, str]) -> str:
    name = row["experiment"]
    if name.startswith("#"):  # results.tsv rows without an ID: a few words of the description
        words = row["description"].split()
        name = " ".join(words[:3]) + ("…" if len(words) > 3 else "")
    return name


def _other_length(p: Point, baseline_steps: float) -> str:
    """`, 380 steps (-37% vs baseline)` for a run of another length than the baseline's, else nothing."""
    steps, off = _steps(p.row, baseline_steps)
    return f", {steps:.0f} steps ({off:+.0%} vs baseline)" if math.isfinite(off) else ""


MARKERS = {  # rows that measured nothing, marked along the top edge: marker, colour, legend label
    "crash": ("X", "tab:red", "crash"), "timeout": ("v", "tab:orange", "timeout"),
    "invalid": ("D", "tab:purple", "invalid (refused)"), "contended": ("P", "tab:brown", "contended (runs again)"),
}


def plot(s: TagSummary, out: Path) -> None:
    """val_bpb per row in ledger order: discards faint, keeps prominent and labelled, confirmed rows ringed
    with their runs beside them, the best so far as a step line, the bar each decision used (best -
    threshold) as a dash at that decision, and failed and contended rows marked along the top edge, where
    a value they may not have cannot distort the scale."""
    fig, ax = plt.subplots(figsize=(12, 6), dpi=100)
    xs = [p.index + 1 for p in s.points]
    values = [p.value for p in s.points if math.isfinite(p.value)]
    bars = [p for p in s.points if math.isfinite(p.bar)]
    if values:
        spread_values = values + [v for p in s.points if p.confirmed for v in run_values(p.row)]
        low, middle = min(spread_values + [p.bar for p in bars]), statistics.median(values)
        spread = max(middle - low, 3 * s.sigma if math.isfinite(s.sigma) else 0.0, 1e-3)
        top = min(max(spread_values), middle + 4 * spread)  # a diverged run must not flatten the rest
        pad = 0.08 * max(top - low, 1e-3)
        ymin, ymax = low - pad, top + 2 * pad
    else:
        ymin, ymax = 0.0, 1.0
    edge = ymax - 0.04 * (ymax - ymin)  # where failed and contended rows are marked

    bests = [p.best for p in s.points]
    if any(math.isfinite(b) for b in bests):
        ax.step(xs + [xs[-1] + 0.5], bests + [bests[-1]], where="post", color="tab:green", linewidth=2,
                label="best so far", zorder=2)  # the last best holds to the right edge
    if bars:
        ax.hlines([p.bar for p in bars], [p.index + 0.6 for p in bars], [p.index + 1.4 for p in bars],
                  colors="tab:cyan", linestyles="--", linewidth=2, zorder=2,
                  label="bar the decision used:\nbest - threshold (a keep is below)")

    def scatter(points: list[Point], **style) -> None:
        if points:
            ax.scatter([p.index + 1 for p in points], [min(p.value, ymax) for p in points], **style)

    baseline = [p for p in s.points if p.row["experiment"] == "baseline" and math.isfinite(p.value)]
    discarded = [p for p in s.points if p.row["status"] == "discard" and math.isfinite(p.value)]
    confirmed = [p for p in s.points if p.confirmed and p.row["experiment"] != "baseline"]
    scatter(baseline, color="tab:blue", s=60, marker="s", label="baseline", zorder=4)
    scatter(discarded, color="0.55", alpha=0.35, s=28, label="discard", zorder=3)
    scatter(s.kept, color="tab:green", edgecolors="black", linewidths=1.2, s=110, marker="*", label="keep", zorder=5)
    if confirmed:
        scatter(confirmed, facecolors="none", edgecolors="tab:pink", linewidths=2, s=320, zorder=6,
                label="confirmed: the mean of its runs (dots)")
        runs = [(p.index + 1, min(v, ymax)) for p in confirmed for v in run_values(p.row)]
        if runs:
            ax.scatter(*zip(*runs), color="tab:pink", s=14, zorder=6)
    for p in s.kept:
        delta = f" {p.delta:+.4f}" if math.isfinite(p.delta) else ""
        ax.annotate(f"{_label(p.row)}{delta}{_other_length(p, s.baseline_steps)}", (p.index + 1, p.value),
                    textcoords="offset points", xytext=(6, -14), fontsize=9, fontweight="bold", color="darkgreen")
    if len(discarded) <= 40:  # beyond that, labels would only hide each other
        for p in discarded:
            ax.annotate(_label(p.row) + _other_length(p, s.baseline_steps), (p.index + 1, min(p.value, ymax)),
                        textcoords="offset points", xytext=(0, 6), fontsize=7, color="0.5", alpha=0.8, ha="center")
    off_chart = [p for p in discarded + baseline if p.value > ymax]
    for p in off_chart:
        ax.annotate(f"{p.value:.3f}", (p.index + 1, ymax), textcoords="offset points", xytext=(3, -10), fontsize=7,
                    color="0.4")
    for status, (marker, colour, label) in MARKERS.items():
        failed = [p for p in s.points if p.row["status"] == status]
        if failed:
            ax.scatter([p.index + 1 for p in failed], [edge] * len(failed), marker=marker, color=colour, s=70,
                       label=label, zorder=5, clip_on=False)
            for p in failed:
                ax.annotate(_label(p.row), (p.index + 1, edge), textcoords="offset points", xytext=(0, -14),
                            fontsize=7, color=colour, ha="center")

    first = s.rows[0]
    setting = ", ".join(x for x in (first["preset"] and f"{first['preset']} preset",
                                    first["data_fingerprint"] and f"data {first['data_fingerprint']}",
                                    math.isfinite(s.baseline_steps) and f"baseline {s.baseline_steps:.0f} steps",
                                    math.isfinite(s.sigma) and f"sigma {s.sigma:.4f}") if x)
    gain = f"best {s.best:.4f}, {s.best - s.baseline:+.4f} from the baseline" if math.isfinite(s.baseline) else "no baseline"
    if math.isfinite(s.best_test - s.baseline_test) and s.best_row is not None and s.best_row["experiment"] != "baseline":
        gain += f" ({s.best_test - s.baseline_test:+.4f} on test)"
    ax.set_title(f"autoresearch/{s.tag}: {len(s.rows)} rows, {gain}" + (f"\n{setting}" if setting else ""), fontsize=11)
    ax.set_xlabel("ledger row (one per experiment), in order")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_ylim(ymin, ymax)
    ax.set_xlim(0.5, max(len(s.points), 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


# -- backlog status ----------------------------------------------------------------------------

OUTCOME_WORDS = {"keep": "kept", "discard": "discarded", "crash": "crashed", "timeout": "timed out",
                 "invalid": "invalid", "contended": "contended (runs again on resume)",
                 "stale": "a stale win (runs again on the new best)"}


def outcome(row: dict[str, str] | None) -> str:
    """The latest outcome of a backlog item in a few words."""
    if row is None:
        return "pending"
    delta = _float(row["delta"])
    shown = f" {delta:+.6f}" if math.isfinite(delta) else ""
    where = f" ({row['tag']} {row['commit']})" if row["commit"] else f" ({row['tag']})"
    text = f"{OUTCOME_WORDS.get(row['status'], row['status'])}{shown}{where}"
    if row["status"] in NOT_MEASURED and row["reason"]:
        text += f": {_cell(row['reason'])[:120]}"
    return text


def backlog_status(items: list[BacklogItem], rows: list[dict[str, str]]) -> str:
    """Each backlog item in the order the loop takes them, with its latest outcome; then IDs the ledger
    has that the backlog does not (the proposer's own ideas)."""
    latest: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["experiment"] != "baseline":
            latest[row["experiment"]] = row
    lines = ["| ID | priority | outcome | change |", "|---|---|---|---|"]
    lines += [f"| {item.id} | {item.priority} | {outcome(latest.get(item.id))} | {_cell(item.description)} |"
              for item in items]
    known = {item.id for item in items}
    others = [row for name, row in latest.items() if name not in known]
    if others:
        lines += ["", "Not in this backlog:", ""]
        lines += [f"- {row['experiment']}: {outcome(row)}: {_cell(row['description'])}" for row in others]
    counts = Counter("pending" if item.id not in latest else latest[item.id]["status"] for item in items)
    lines += ["", f"{len(items)} items: " + ", ".join(f"{counts[k]} {k}" for k in ("pending",) + OUTCOMES if counts[k])]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python agent/report.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--tag", help="plot and summarise only this tag (default: plot the latest, summarise all)")
    p.add_argument("--ledger", type=Path, help="experiments.tsv, or autoresearch's results.tsv with or without its header "
                                                "(default: experiments.tsv, else results.tsv, at the repository root)")
    p.add_argument("--out", type=Path, help="where the plot goes (default: progress.png next to the ledger "
                                             "that --ledger names, else at the repository root)")
    p.add_argument("--markdown", type=Path, help="where the summary goes (default: report.md next to the ledger "
                                                  "that --ledger names, else at the repository root)")
    p.add_argument("--k", type=float, default=2.0, help="the bar in sigmas for rows without a threshold column "
                                                        "(the loop's --k)")
    p.add_argument("--backlog-status", action="store_true", help="print each backlog item with its latest outcome")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--backlog", type=Path, default=REPO_ROOT / "agent" / "backlog.md",
                        help="the backlog for --backlog-status")
    source.add_argument("--backlog-issue", metavar="OWNER/REPO#N", help="read the backlog from a GitHub issue")
    p.add_argument("--github-api-url", help="GitHub API base URL (default: GITHUB_API_URL or https://api.github.com)")
    return p.parse_args(argv)


def default_ledger() -> Path:
    experiments, results = REPO_ROOT / "experiments.tsv", REPO_ROOT / "results.tsv"
    return results if results.exists() and not experiments.exists() else experiments


def _relative(path: Path, start: Path) -> Path:
    """`path` as a link from a file in `start`, so report.md's link to the plot works wherever both went."""
    return Path(os.path.relpath(path.resolve(), start.resolve()))


def run(args: argparse.Namespace) -> None:
    source = args.ledger or default_ledger()
    read = read_rows(source)
    for problem in read.problems:
        print(f"report: {problem}", file=sys.stderr)
    rows = read.rows
    if args.tag is not None:
        rows = [row for row in rows if row["tag"] == args.tag]
        if not rows:
            known = ", ".join(tags_by_recency(read.rows)) or "none"
            raise ReportError(f"{source} has no rows for tag {args.tag!r} (its tags: {known}); pick one with --tag.")

    if args.backlog_status:
        backlog = backlog_from_flags(args.backlog, args.backlog_issue, args.github_api_url, "report")
        print(backlog_status(backlog.items, rows), end="")
        return
    if not rows:
        raise ReportError(f"{source} has no rows yet; let python agent/loop.py finish a run first.")
    summaries = [summarize(tag, [row for row in rows if row["tag"] == tag], k=args.k) for tag in tags_by_recency(rows)]
    folder = source.parent if args.ledger else REPO_ROOT  # a ledger from elsewhere never overwrites this repository's
    out, markdown = args.out or folder / "progress.png", args.markdown or folder / "report.md"
    plot(summaries[0], out)
    text = report_text(summaries, source, _relative(out, markdown.parent))
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"\n(written to {markdown} and {out})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
