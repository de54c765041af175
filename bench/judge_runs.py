"""Measured runs for the judge benches: train.py, or a variant of it with constants edited, trained at the
cpu preset on a given seed, and the JSON file that records them, so that the judges' statistics can be
recomputed without training and a long measurement can be taken in chunks.

A variant is written as it is stored: `base` (the unchanged train.py), `NAME*FACTOR` (the constant's value
scaled, e.g. `MATRIX_LR*1.0001`: a null change that alters the trajectory without helping) or `NAME=VALUE`.
Several edits are joined by commas.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.backlog import Assignment
from agent.runner import default_timeout, run_training, training_env
from agent.train_constants import ConstantEditError, read_constant, set_constants

REPO = Path(__file__).resolve().parent.parent
FIRST_SEED = 42  # the loop's default --seed: the first baseline's
BASE = "base"


class MeasureError(Exception):
    """A run that did not produce a val_bpb, or a runs file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Run:
    """One finished training run: which train.py, which seed, what it measured."""

    variant: str
    seed: int
    val_bpb: float
    num_steps: int
    budget_seconds: float
    data_fingerprint: str
    source_sha256: str = ""  # of the variant's train.py and prepare.py: a resumed measurement reuses only its own code's runs


def source_sha256(variant: str) -> str:
    """What a run of this variant trains with: its train.py and the prepare.py beside it."""
    source = variant_source(variant, (REPO / "train.py").read_text()) + (REPO / "prepare.py").read_text()
    return hashlib.sha256(source.encode()).hexdigest()


def variant_source(variant: str, source: str) -> str:
    """train.py's source with the variant's edits applied."""
    if variant == BASE:
        return source
    edits = []
    try:
        for edit in variant.split(","):
            if "=" in edit:
                name, value = (part.strip() for part in edit.split("=", 1))
                edits.append(Assignment(name, value))
            elif "*" in edit:
                name, factor = (part.strip() for part in edit.split("*", 1))
                edits.append(Assignment(name, f"({read_constant(source, name)}) * {factor}"))
            else:
                raise MeasureError(f"variant {variant!r}: write each edit as NAME*FACTOR or NAME=VALUE, "
                                   "or use 'base'.")
        return set_constants(source, edits)
    except ConstantEditError as error:
        raise MeasureError(f"variant {variant!r}: {error}") from None


def train(variant: str, seed: int, budget: float) -> Run:
    """Train the variant once at the cpu preset in a scratch copy of the project, on the data prepared in
    $AUTORESEARCH_CACHE (or the default cache); its measured Run."""
    cache = Path(os.environ["AUTORESEARCH_CACHE"]) if os.environ.get("AUTORESEARCH_CACHE") else None
    source = variant_source(variant, (REPO / "train.py").read_text())
    with tempfile.TemporaryDirectory(prefix="judge-run-") as scratch:
        work = Path(scratch)
        shutil.copy(REPO / "prepare.py", work / "prepare.py")
        (work / "train.py").write_text(source)
        env = training_env(preset="cpu", time_budget=budget, seed=seed, run_dir=work / "run", cache=cache)
        outcome = run_training(work, env, work / "train.log", default_timeout(budget, 120))
    if outcome.status != "ok":
        raise MeasureError(f"{variant} with seed {seed} failed: {outcome.reason}")
    summary = outcome.summary
    return Run(variant, seed, summary.val_bpb, int(summary.number("num_steps")), budget,
               str(summary.get("data_fingerprint", "")), source_sha256(variant))


def load_runs(path: Path | None) -> list[Run]:
    """The runs recorded in `path`; none when it is None or does not exist yet."""
    if path is None or not path.exists():
        return []
    try:
        return [Run(**record) for record in json.loads(path.read_text())["runs"]]
    except (ValueError, KeyError, TypeError) as error:
        raise MeasureError(f"{path} is not a runs file written by the judge benches ({error}); "
                           "give another --runs path or delete it.") from None


def save_runs(path: Path, runs: list[Run]) -> None:
    """Write the runs to `path` atomically, so an interrupted measurement loses at most the run in progress."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"runs": [asdict(run) for run in runs]}, indent=1) + "\n")
    partial.replace(path)


def measure(plan: list[tuple[str, int]], budget: float, runs_file: Path | None, minutes: float | None,
            log=print, recorded_only: bool = False) -> tuple[list[Run], int]:
    """Every (variant, seed) of the plan that the runs file lacks at this budget (a pair listed twice is
    run twice), trained and saved after each run; stops starting runs after `minutes`. Returns the runs
    for the plan and how many are still missing. A recorded run counts only when it trained today's code
    (train.py and prepare.py), unless recorded_only: then the file's runs are taken as they are, to
    recompute a table from an earlier measurement. The runs used must share one data fingerprint."""
    recorded = load_runs(runs_file)
    available = [run for run in recorded if run.budget_seconds == budget]
    current = {variant: source_sha256(variant) for variant, _ in plan}
    chosen, missing = [], []
    for variant, seed in plan:
        match = next((run for run in available if (run.variant, run.seed) == (variant, seed)
                      and (recorded_only or run.source_sha256 == current[variant])), None)
        if match is None:
            missing.append((variant, seed))
        else:
            available.remove(match)
            chosen.append(match)
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    while missing and (deadline is None or time.monotonic() < deadline):
        variant, seed = missing.pop(0)
        run = train(variant, seed, budget)
        log(f"run: {variant} seed {seed} val_bpb {run.val_bpb:.6f} steps {run.num_steps}")
        chosen.append(run)
        recorded.append(run)
        if runs_file is not None:
            save_runs(runs_file, recorded)
    fingerprints = sorted({run.data_fingerprint for run in chosen})
    if len(fingerprints) > 1:
        raise MeasureError(f"the runs were trained on different data ({', '.join(fingerprints)}); give a new --runs "
                           "file for this data, or AUTORESEARCH_CACHE of the data the file was measured on.")
    return chosen, len(missing)
