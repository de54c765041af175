"""A tag's state, replayed from its ledger rows: the loop resumes from it, the report summarises it.

The rules of the replay live here and nowhere else: which rows are the finished baseline runs and null
twins, the noise floor the judge uses (null twins included), where the best stands after each keep, the
machine-speed reference, and which experiments are done. `TagState.after(row)` is one row's step, so the
report can show where the best stood after each row; `replay(rows)` is all of them. Commit ids are the
rows' short ones; the loop resolves them to full shas where git needs them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from agent.judge import NoiseFloor, noise_floor
from agent.ledger import BASELINE, TWIN, is_baseline_run
from agent.probe import Reference

Row = Mapping[str, str]  # a ledger row as read: every column a string


def score(text: object) -> float | None:
    """A positive finite number from a ledger cell (val_bpb, test_bpb, probe seconds); None for an empty cell,
    a crash's 0 or anything that does not read as one."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def run_values(row: Row) -> tuple[float, ...]:
    """A row's val_bpb per judged run in seed order (`seed:value ...`); a row without them counts as one run."""
    values = tuple(value for token in (row.get("run_values") or "").split()
                   if (value := score(token.rpartition(":")[2])) is not None)
    if values:
        return values
    single = score(row.get("val_bpb"))
    return (single,) if single is not None else ()


def is_kept_experiment(row: Row) -> bool:
    """A keep that moves the best: an experiment (not a baseline run or a null twin) with a measured val_bpb."""
    return row.get("status") == "keep" and row.get("experiment") not in (BASELINE, TWIN) and score(row.get("val_bpb")) is not None


@dataclass(frozen=True)
class TagState:
    """Where a tag stands after some of its rows, in ledger order."""

    row_count: int = 0  # rows replayed
    start: str | None = None  # the commit the tag began on: its first row's parent (or commit), else what replay was given
    baselines: tuple[Row, ...] = ()  # finished baseline runs: the first (seed of every candidate), then the repeats
    twins: tuple[Row, ...] = ()  # finished null twins: twin i ran on baseline i's seed
    kept: Row | None = None  # the last kept experiment; None while the best is the baseline
    done: frozenset[str] = frozenset()  # experiments with a row; a contended or stale one runs again

    def after(self, row: Row) -> TagState:
        """This state with one more row."""
        state = replace(self, row_count=self.row_count + 1)
        if state.start is None:
            state = replace(state, start=row.get("parent") or row.get("commit") or None)
        if is_baseline_run(row):
            return replace(state, baselines=state.baselines + (row,))
        if row.get("experiment") == TWIN:
            return replace(state, twins=state.twins + (row,)) if row.get("status") == "discard" else state
        if row.get("experiment") == BASELINE:
            return state  # a failed baseline run: recorded, measures nothing
        if is_kept_experiment(row):
            state = replace(state, kept=row)
        if row.get("status") not in ("contended", "stale"):  # each runs again: on resume, on the new best
            state = replace(state, done=state.done | {row.get("experiment", "")})
        return state

    @property
    def base_commit(self) -> str | None:
        """The commit the baselines ran on (the first baseline's), else where the tag began."""
        return self.baselines[0]["commit"] if self.baselines else self.start

    @property
    def best_row(self) -> Row | None:
        """The row of the best: the last kept experiment, else the first baseline run."""
        return self.kept or (self.baselines[0] if self.baselines else None)

    @property
    def best_commit(self) -> str | None:
        return self.kept["commit"] if self.kept else self.base_commit

    @property
    def best_values(self) -> tuple[float, ...]:
        """The best's val_bpb per seed, the values a candidate's runs are paired with: the kept experiment's
        runs, else every baseline run's."""
        if self.kept:
            return run_values(self.kept)
        return tuple(value for row in self.baselines if (value := score(row.get("val_bpb"))) is not None)

    @property
    def best_val(self) -> float | None:
        return statistics.fmean(self.best_values) if self.best_values else None

    @property
    def best_test(self) -> float | None:
        """The best's test_bpb (its first run's, scored in the fresh verification process); None when not scored."""
        return score(self.best_row.get("test_bpb")) if self.best_row else None

    @property
    def floor(self) -> NoiseFloor:
        """The noise floor exactly as the judge uses it: the baselines' cross-seed sigma and the null twins' paired one."""
        return noise_floor([score(row.get("val_bpb")) or math.nan for row in self.baselines],
                           [score(row.get("val_bpb")) or math.nan for row in self.twins])

    @property
    def reference(self) -> Reference | None:
        """The machine as the first baseline found it; None before a baseline that was probed."""
        first = self.baselines[0] if self.baselines else {}
        seconds = score(first.get("probe_seconds"))
        if seconds is None:
            return None
        cpu = first.get("cpu_per_second")
        return Reference(seconds, float(cpu) if cpu else None)


def replay(rows: Iterable[Row], start: str | None = None) -> TagState:
    """A tag's rows, replayed in ledger order; `start` is where a tag without rows begins."""
    state = TagState(start=None)
    for row in rows:
        state = state.after(row)
    return state if state.start is not None else replace(state, start=start)
