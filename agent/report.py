"""
The morning report: progress.png, and an account of what the loop kept, discarded and refused, and why.

    python agent/report.py                         # plot the latest tag, summarise every tag
    python agent/report.py --tag nov28             # only nov28
    python agent/report.py --ledger results.tsv    # karpathy/autoresearch's 5-column results.tsv
    python agent/report.py --backlog-status        # each backlog item with its latest outcome

The plot goes to progress.png and the summary to stdout and report.md, both at the repository root
unless --out / --markdown say otherwise. Nothing here writes to the ledger.
"""

from __future__ import annotations

import argparse
import csv
import math
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

from agent.backlog import BacklogItem, load_backlog  # noqa: E402
from agent.judge import noise_floor  # noqa: E402
from agent.ledger import COLUMNS, Ledger  # noqa: E402
from agent.ledger import STATUSES as OUTCOMES  # noqa: E402
from agent.stops import UserError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
AUTORESEARCH_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
FAILED = ("crash", "timeout", "invalid")
PAUSE_SECONDS = 3600.0  # a gap between two rows longer than this is a stopped loop, not an experiment
_ID = re.compile(r"^\s*([A-Z][A-Z0-9]*-\d+)\b")


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
    """Read experiments.tsv, or autoresearch's results.tsv (commit, val_bpb, memory_gb, status, description)."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            header = f.readline().rstrip("\r\n").split("\t")
    except FileNotFoundError:
        raise ReportError(f"there is no ledger at {path}; run python agent/loop.py first, "
                          f"or point --ledger at an experiments.tsv or results.tsv.") from None
    if header == list(AUTORESEARCH_COLUMNS):
        return _read_results_tsv(path)
    read = Ledger(path).read()  # raises LedgerError, a UserError, for a file of another version
    return Rows(read.rows, read.problems, "experiments.tsv")


def _read_results_tsv(path: Path) -> Rows:
    """autoresearch's results.tsv has no tag, IDs, sigma or times: the tag is the file's stem, the first
    row (or one described as a baseline) is the baseline, and an ID is the description's leading
    `XX-N`, else the row number."""
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)
        for number, fields in enumerate(reader, start=2):
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
            if not rows or description.lower().startswith("baseline"):
                row["experiment"] = "baseline"
            else:
                row["experiment"] = found.group(1) if found else f"#{len(rows) + 1}"
            rows.append(row)
    return Rows(rows, problems, "results.tsv")


def tags_in_order(rows: list[dict[str, str]]) -> list[str]:
    """Every tag, in the order each first appears."""
    return list(dict.fromkeys(row["tag"] for row in rows))


def _float(text: str | None) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


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
    value: float        # val_bpb; nan when the run has none worth plotting (crash, timeout, invalid)
    best: float         # the best val_bpb after this row
    delta: float        # val_bpb minus the best it was judged against; nan when unknown


@dataclass(frozen=True)
class TagSummary:
    tag: str
    rows: list[dict[str, str]]
    points: list[Point]
    baselines: list[dict[str, str]]
    baseline: float            # the first baseline's val_bpb (seed of every candidate): what the judge started from
    sigma: float               # the noise floor; nan when unknown
    best_row: dict[str, str] | None
    best: float
    counts: Counter
    cost: float
    tokens: tuple[int, int, int]  # input, cached, output
    hours: float               # loop time spanned by the rows, pauses left out; nan when the rows carry no times
    pauses: int

    @property
    def experiments(self) -> list[dict[str, str]]:
        return [row for row in self.rows if row["experiment"] != "baseline"]

    @property
    def kept(self) -> list[Point]:
        return [p for p in self.points if p.row["status"] == "keep" and p.row["experiment"] != "baseline"]


def summarize(tag: str, rows: list[dict[str, str]]) -> TagSummary:
    """Replay the tag's rows as the loop saw them: the baseline, then each keep moves the best."""
    baselines = [r for r in rows if r["experiment"] == "baseline" and r["status"] == "keep"]
    baseline = _float(baselines[0]["val_bpb"]) if baselines else math.nan
    floor = noise_floor([_float(r["val_bpb"]) for r in baselines])
    sigma = floor.sigma if floor.sigma is not None else _float(next((r["sigma"] for r in reversed(rows) if r["sigma"]), ""))
    best, best_row, points = baseline, (baselines[0] if baselines else None), []
    for index, row in enumerate(rows):
        status, value = row["status"], _float(row["val_bpb"])
        judged = status in ("keep", "discard") and math.isfinite(value) and value > 0
        delta = _float(row["delta"])
        if row["experiment"] == "baseline":
            delta = math.nan  # the best starts at the first baseline; later baselines only measure noise
        elif judged:
            if math.isnan(delta) and math.isfinite(best):
                delta = value - best  # results.tsv carries no delta
            if status == "keep":
                best, best_row = value, row
        points.append(Point(index, row, value if judged else math.nan, best, delta))
    counts = Counter(r["status"] for r in rows if r["experiment"] != "baseline")
    cost = sum(v for v in (_float(r["cost_usd"]) for r in rows) if math.isfinite(v))
    tokens = tuple(sum(int(_float(r[c])) for r in rows if math.isfinite(_float(r[c])))
                   for c in ("input_tokens", "cached_tokens", "output_tokens"))
    hours, pauses = _loop_hours(rows)
    return TagSummary(tag, rows, points, baselines, baseline, sigma, best_row, best, counts, cost,
                      tokens, hours, pauses)  # type: ignore[arg-type]


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


def _describe_tag(s: TagSummary) -> list[str]:
    first = s.rows[0]
    setting = ", ".join(part for part in (
        f"{first['preset']} preset" if first["preset"] else "",
        f"data {first['data_fingerprint']}" if first["data_fingerprint"] else "",
        f"{_float(first['time_budget']):g} s per run" if math.isfinite(_float(first["time_budget"])) else "",
    ) if part)
    lines = [f"## {s.tag}" + (f" ({setting})" if setting else ""), ""]
    experiments = len(s.experiments)
    runs = f"- runs: {len(s.rows)} ({len(s.rows) - experiments} baseline, {experiments} experiments)"
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
        lines.append(f"- baseline: val_bpb {s.baseline:.6f} at {s.baselines[0]['commit'] or '-'}; {noise}{spread}")
    else:
        lines.append("- baseline: none finished, so nothing was judged")
    if s.best_row is not None and s.best_row["experiment"] != "baseline":
        gain = s.best - s.baseline
        lines.append(f"- best: val_bpb {s.best:.6f} at {s.best_row['commit']} ({s.best_row['experiment']}), "
                     f"{gain:+.6f} ({100 * gain / s.baseline:+.2f}%) from the baseline over {len(s.kept)} kept "
                     f"experiment{'s' if len(s.kept) != 1 else ''}")
    elif s.baselines:
        lines.append(f"- best: the baseline, val_bpb {s.baseline:.6f}; no experiment beat it")
    lines.append("- outcomes: " + ", ".join(f"{s.counts.get(status, 0)} {status}" for status in OUTCOMES))
    if s.cost or any(s.tokens):
        lines.append(f"- API cost: ${s.cost:.2f} ({s.tokens[0]:,} input, {s.tokens[1]:,} cached, "
                     f"{s.tokens[2]:,} output tokens)")
    else:
        lines.append("- API cost: $0.00 (no LLM calls recorded)")

    if s.kept:
        lines += ["", "Kept, in order (each one is the branch's new tip):", "",
                  "| commit | experiment | val_bpb | delta | reason | description |", "|---|---|---|---|---|---|"]
        lines += [f"| {p.row['commit']} | {p.row['experiment']} | {p.value:.6f} | "
                  f"{p.delta:+.6f} | {_cell(p.row['reason']) or '-'} | {_cell(p.row['description'])} |" for p in s.kept]
    failed = [r for r in s.experiments if r["status"] in FAILED]
    if failed:
        lines += ["", "Crashed, timed out or refused:", ""]
        lines += [f"- {r['commit'] or '-'} {r['experiment']} ({r['status']}): {_cell(r['reason']) or _cell(r['description'])}"
                  for r in failed]
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


def plot(s: TagSummary, out: Path, *, k: float = 2.0) -> None:
    """val_bpb per run in ledger order: discards faint, keeps prominent and labelled, the best so far as a
    step line with its noise band (best ± k sigma), and crashes, timeouts and invalid runs marked
    along the top edge, where a value they may not have cannot distort the scale."""
    fig, ax = plt.subplots(figsize=(12, 6), dpi=100)
    xs = [p.index + 1 for p in s.points]
    values = [p.value for p in s.points if math.isfinite(p.value)]
    if values:
        band = [p.best - k * s.sigma for p in s.points if math.isfinite(p.best) and math.isfinite(s.sigma)]
        low, middle = min(values + band), statistics.median(values)
        spread = max(middle - low, 3 * s.sigma if math.isfinite(s.sigma) else 0.0, 1e-3)
        top = min(max(values), middle + 4 * spread)  # a diverged run must not flatten the rest
        pad = 0.08 * max(top - low, 1e-3)
        ymin, ymax = low - pad, top + 2 * pad
    else:
        ymin, ymax = 0.0, 1.0
    edge = ymax - 0.04 * (ymax - ymin)  # where failed runs are marked

    bests = [p.best for p in s.points]
    if any(math.isfinite(b) for b in bests):
        steps_x, steps_y = xs + [xs[-1] + 0.5], bests + [bests[-1]]  # the last best holds to the right edge
        ax.step(steps_x, steps_y, where="post", color="tab:green", linewidth=2, label="best so far", zorder=2)
        if math.isfinite(s.sigma):
            ax.fill_between(steps_x, [b - k * s.sigma for b in steps_y], [b + k * s.sigma for b in steps_y],
                            step="post", color="tab:green", alpha=0.12,
                            label=f"noise band: best ± {k:g} sigma\n(sigma {s.sigma:.4f})", zorder=1)

    def scatter(points: list[Point], **style) -> None:
        if points:
            ax.scatter([p.index + 1 for p in points], [min(p.value, ymax) for p in points], **style)

    baseline = [p for p in s.points if p.row["experiment"] == "baseline" and math.isfinite(p.value)]
    discarded = [p for p in s.points if p.row["status"] == "discard" and math.isfinite(p.value)]
    scatter(baseline, color="tab:blue", s=60, marker="s", label="baseline", zorder=4)
    scatter(discarded, color="0.55", alpha=0.35, s=28, label="discard", zorder=3)
    scatter(s.kept, color="tab:green", edgecolors="black", linewidths=1.2, s=110, marker="*", label="keep", zorder=5)
    for p in s.kept:
        ax.annotate(f"{_label(p.row)} {p.delta:+.4f}" if math.isfinite(p.delta) else _label(p.row),
                    (p.index + 1, p.value), textcoords="offset points", xytext=(6, -14), fontsize=9,
                    fontweight="bold", color="darkgreen")
    if len(discarded) <= 40:  # beyond that, labels would only hide each other
        for p in discarded:
            ax.annotate(_label(p.row), (p.index + 1, min(p.value, ymax)), textcoords="offset points", xytext=(0, 6),
                        fontsize=7, color="0.5", alpha=0.8, ha="center")
    off_chart = [p for p in discarded + baseline if p.value > ymax]
    for p in off_chart:
        ax.annotate(f"{p.value:.3f}", (p.index + 1, ymax), textcoords="offset points", xytext=(3, -10), fontsize=7,
                    color="0.4")
    styles = {"crash": ("X", "tab:red", "crash"), "timeout": ("v", "tab:orange", "timeout"),
              "invalid": ("D", "tab:purple", "invalid (refused)")}
    for status, (marker, colour, label) in styles.items():
        failed = [p for p in s.points if p.row["status"] == status]
        if failed:
            ax.scatter([p.index + 1 for p in failed], [edge] * len(failed), marker=marker, color=colour, s=70,
                       label=label, zorder=5, clip_on=False)
            for p in failed:
                ax.annotate(_label(p.row), (p.index + 1, edge), textcoords="offset points", xytext=(0, -14),
                            fontsize=7, color=colour, ha="center")

    first = s.rows[0]
    setting = ", ".join(x for x in (first["preset"] and f"{first['preset']} preset",
                                    first["data_fingerprint"] and f"data {first['data_fingerprint']}") if x)
    gain = f"best {s.best:.4f}, {s.best - s.baseline:+.4f} from the baseline" if math.isfinite(s.baseline) else "no baseline"
    ax.set_title(f"autoresearch/{s.tag}: {len(s.rows)} runs, {gain}" + (f"\n{setting}" if setting else ""), fontsize=11)
    ax.set_xlabel("run, in ledger order")
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

def outcome(row: dict[str, str] | None) -> str:
    """The latest outcome of a backlog item in a few words."""
    if row is None:
        return "pending"
    delta = _float(row["delta"])
    shown = f" {delta:+.6f}" if math.isfinite(delta) else ""
    where = f" ({row['tag']} {row['commit']})" if row["commit"] else f" ({row['tag']})"
    words = {"keep": "kept", "discard": "discarded", "crash": "crashed", "timeout": "timed out", "invalid": "invalid"}
    text = f"{words.get(row['status'], row['status'])}{shown}{where}"
    if row["status"] in FAILED and row["reason"]:
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


def _load_items(args: argparse.Namespace) -> list[BacklogItem]:
    from agent.github_backlog import backlog_file  # requests is only needed here

    return load_backlog(backlog_file(args.backlog, args.backlog_issue, args.github_api_url, "report"))


# -- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python agent/report.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--tag", help="plot and summarise only this tag (default: plot the latest, summarise all)")
    p.add_argument("--ledger", type=Path, help="experiments.tsv or autoresearch's results.tsv "
                                                "(default: experiments.tsv, else results.tsv, at the repository root)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "progress.png", help="where the plot goes")
    p.add_argument("--markdown", type=Path, default=REPO_ROOT / "report.md", help="where the summary goes")
    p.add_argument("--k", type=float, default=2.0, help="the noise band's half-width in sigmas (the loop's --k)")
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
    """`path` as a link from a file in `start` when it lies below it (report.md next to progress.png)."""
    try:
        return path.resolve().relative_to(start.resolve())
    except ValueError:
        return path


def run(args: argparse.Namespace) -> None:
    source = args.ledger or default_ledger()
    read = read_rows(source)
    for problem in read.problems:
        print(f"report: {problem}", file=sys.stderr)
    rows = read.rows
    if args.tag is not None:
        rows = [row for row in rows if row["tag"] == args.tag]
        if not rows:
            known = ", ".join(tags_in_order(read.rows)) or "none"
            raise ReportError(f"{source} has no rows for tag {args.tag!r} (its tags: {known}); pick one with --tag.")

    if args.backlog_status:
        print(backlog_status(_load_items(args), rows), end="")
        return
    if not rows:
        raise ReportError(f"{source} has no rows yet; let python agent/loop.py finish a run first.")
    tags = tags_in_order(rows)
    summaries = [summarize(tag, [row for row in rows if row["tag"] == tag]) for tag in reversed(tags)]
    plot(summaries[0], args.out, k=args.k)
    text = report_text(summaries, source, _relative(args.out, args.markdown.parent))
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"\n(written to {args.markdown} and {args.out})")


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
