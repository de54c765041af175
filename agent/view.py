"""What the loop shows while it works: a live rich panel on a terminal, plain log lines otherwise."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from agent.summary import Progress

STATUS_STYLES = {"keep": "bold green", "discard": "yellow", "crash": "bold red", "timeout": "red", "invalid": "magenta",
                 "contended": "cyan", "stale": "cyan", "baseline": "blue"}
RECENT_ROWS = 8


class View(Protocol):
    def __enter__(self) -> View: ...
    def __exit__(self, *exc: object) -> None: ...
    def note(self, text: str) -> None: ...
    def best(self, val_bpb: float | None, floor: str) -> None: ...
    def started(self, name: str, description: str) -> None: ...
    def progress(self, progress: Progress) -> None: ...
    def finished(self, row: Mapping[str, object], rows: Sequence[Mapping[str, str]]) -> None: ...


def _number(value: object, spec: str) -> str:
    """A ledger value (a number from the loop, a string from the file) formatted, or '-' when it has none:
    never the float's full repr (2.9557485000000003)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return format(number, spec) if math.isfinite(number) else "-"


def _bpb(value: object) -> str:
    """val_bpb to 6 decimals; '-' for a run that has none (a crash's 0.000000 included)."""
    text = _number(value, ".6f")
    return "-" if text == "-" or float(text) <= 0 else text


def _run_size(row: Mapping[str, object]) -> str:
    """`600 steps, 10,000 tok/s, mean of 2 runs`: what the row's val_bpb rests on, as far as the row says."""
    steps, rate, runs = (_number(row.get(key), spec) for key, spec in
                         (("num_steps", ".0f"), ("tokens_per_second", ",.0f"), ("runs", ".0f")))
    parts = [f"{steps} steps" if steps != "-" else "", f"{rate} tok/s" if rate != "-" else "",
             f"mean of {runs} runs" if runs not in ("-", "0", "1") else ""]
    return ", ".join(part for part in parts if part)


def _row_line(row: Mapping[str, object]) -> str:
    size = _run_size(row)
    return (f"{row.get('experiment')}: {row.get('status')} val_bpb {_bpb(row.get('val_bpb'))}"
            + (f" ({size})" if size else "") + f" ({row.get('reason')}) [{str(row.get('commit') or '-')[:7]}]")


class PlainView:
    """One line per event, for logs and pipes; progress every tenth of the budget."""

    def __init__(self, tag: str, stream: TextIO = sys.stdout) -> None:
        self.tag = tag
        self.stream = stream
        self._next_percent = 0.0

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.flush()

    def _print(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} {self.tag}] {text}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self._print(text)

    def best(self, val_bpb: float | None, floor: str) -> None:
        self._print(f"best val_bpb {val_bpb:.6f}, {floor}" if val_bpb is not None else f"no best yet, {floor}")

    def started(self, name: str, description: str) -> None:
        self._next_percent = 0.0
        self._print(f"{name} started: {description}")

    def progress(self, progress: Progress) -> None:
        if progress.percent >= self._next_percent:
            self._next_percent = progress.percent + 10.0
            tok = f", {progress.tokens_per_second:,.0f} tok/s" if progress.tokens_per_second else ""
            self._print(f"  step {progress.step} ({progress.percent:.0f}%), loss {progress.loss:.4f}{tok}")

    def finished(self, row: Mapping[str, object], rows: Sequence[Mapping[str, str]]) -> None:
        self._print(_row_line(row))


class LiveView:
    """A rich panel: current experiment, a progress bar fed by train.py, best and noise floor, recent rows."""

    def __init__(self, tag: str, console: Console | None = None) -> None:
        self.tag = tag
        self.console = console or Console()
        self._live = Live(console=self.console, refresh_per_second=4, transient=False)
        self._current = ("starting", "")
        self._progress: Progress | None = None
        self._best = "no best yet"
        self._rows: list[Mapping[str, str]] = []
        self._notes: list[str] = []

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        self._refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)

    def _render(self) -> Group:
        name, description = self._current
        header = Text.assemble((f"autoresearch/{self.tag}  ", "bold"), (self._best, "cyan"))
        current = Text.assemble((f"{name}  ", "bold"), description)
        p = self._progress
        bar = ProgressBar(total=100.0, completed=p.percent if p else 0.0, width=50)
        status = Text(f" {p.percent:5.1f}%  step {p.step}  loss {p.loss:.4f}" +
                      (f"  {p.tokens_per_second:,.0f} tok/s" if p and p.tokens_per_second else "")) if p else Text(" waiting for train.py")
        table = Table(expand=True, box=None, pad_edge=False)
        for column in ("experiment", "status", "val_bpb", "steps", "tok/s", "description", "reason"):
            table.add_column(column, overflow="ellipsis", no_wrap=True,
                             ratio=3 if column in ("description", "reason") else 1)
        for row in self._rows[-RECENT_ROWS:]:
            status_text = str(row.get("status", ""))
            table.add_row(str(row.get("experiment", "")), Text(status_text, style=STATUS_STYLES.get(status_text, "")),
                          _bpb(row.get("val_bpb")), _number(row.get("num_steps"), ".0f"),
                          _number(row.get("tokens_per_second"), ",.0f"), str(row.get("description", "")),
                          str(row.get("reason", "")))
        notes = Text("\n".join(self._notes[-3:]), style="dim")
        return Group(Panel(Group(header, current, Group(bar, status)), title="autoresearch loop"), table, notes)

    def _refresh(self) -> None:
        self._live.update(self._render(), refresh=True)

    def note(self, text: str) -> None:
        self._notes.append(text)
        self._refresh()

    def best(self, val_bpb: float | None, floor: str) -> None:
        self._best = f"best val_bpb {val_bpb:.6f} | {floor}" if val_bpb is not None else f"no best yet | {floor}"
        self._refresh()

    def started(self, name: str, description: str) -> None:
        self._current = (name, description)
        self._progress = None
        self._refresh()

    def progress(self, progress: Progress) -> None:
        self._progress = progress
        self._refresh()

    def finished(self, row: Mapping[str, object], rows: Sequence[Mapping[str, str]]) -> None:
        self._rows = list(rows)
        self._notes.append(_row_line(row))
        self._refresh()


def make_view(tag: str) -> View:
    """The live panel on a terminal, plain lines when stdout is a pipe or a file."""
    return LiveView(tag) if sys.stdout.isatty() else PlainView(tag)
