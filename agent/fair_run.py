"""Fair runs of train.py: a run measures its change only when it had its machine to itself.

`FairRuns` runs train.py in the experiment worktree between two machine-speed probes (agent/probe.py), with
the guard's file checks around it. A run that shared its machine is never judged: it waits for a quiet probe
and runs again, up to --contention-retries times, and is otherwise returned as contended. A tag's first run is
held to the slowest of IDLE_PROBES probes of the machine at rest; every later run to the reference that the
first baseline stored in the ledger (agent/state.py reads it back).
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from agent.branch import ExperimentBranch
from agent.config import LoopConfig
from agent.guard import Guard
from agent.probe import Probe, ProbeError, Reference, contention, probe_ratio, wait_until_quiet
from agent.runner import RunOutcome, run_training, training_env
from agent.stops import LoopStop, UserError
from agent.view import View

PROBE_SETTLE_SECONDS = 1.0  # after a run, before the probe: the run's last writes and freed memory settle first
# Signals another process sends; a segfault or an abort is the run's own error, and a crash like any other.
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
IDLE_PROBES = 5             # probes of the idle machine before a tag's first run: its slowest is the first reference


@dataclass(frozen=True)
class TrainRun:
    """One run of train.py: how it ended, its seed, what the guard found wrong with it, and whether it
    shared its machine (then it measured the load, not the change)."""

    outcome: RunOutcome
    seed: int
    problem: str | None
    contended: str | None  # why the run was not alone on its machine; None when it was
    reference: Reference  # the machine-speed reference it was compared with (for a tag's first run: the idle probes')
    probe_seconds: float  # the slower probe around the run: a clean first baseline's is the tag's reference
    probe_ratio: float  # the slower probe around the run over the reference


class Worktree(Protocol):
    """Where runs happen: a path whose HEAD holds the commit that runs, and a reset back to a commit."""

    path: Path

    def head(self) -> str: ...

    def reset(self, sha: str) -> None: ...


def killed_from_outside(run: TrainRun) -> bool:
    """A run ended by a signal it did not raise itself (someone's kill, a node's OOM killer): it measured nothing
    about its change, so it runs once more instead of counting as the change's crash."""
    returncode = run.outcome.returncode
    return (run.outcome.status == "crash" and returncode is not None and -returncode in OUTSIDE_SIGNALS
            and run.problem is None)


def stop_if_untrusted(guard: Guard) -> None:
    """A changed harness or data cache cannot be trusted, nor restored from git: stop."""
    if not guard.harness_intact():
        raise LoopStop("a run changed prepare.py or agent/ in your checkout; inspect and restore them "
                       "(git status, git diff), then resume with the same tag.")
    if not guard.data_intact():
        raise LoopStop("the prepared data changed during a run; rebuild it with python prepare.py --force, "
                       "then resume with the same tag.")


def measured(runs: list[TrainRun]) -> dict[str, object]:
    """A row's metrics: each one the mean over the runs that finished (one row per experiment)."""
    finished = [run for run in runs if run.outcome.summary is not None]
    cpu = [run.outcome.cpu_per_second for run in runs if run.outcome.cpu_per_second is not None]
    columns: dict[str, object] = {"runs": len(runs), "wall_seconds": round(sum(r.outcome.wall_seconds for r in runs), 1),
                                  "probe_ratio": max(run.probe_ratio for run in runs),
                                  "probe_seconds": max(run.probe_seconds for run in runs),
                                  "cpu_per_second": statistics.fmean(cpu) if cpu else None}
    if not finished:
        return columns

    def mean(key: str) -> float | None:
        values = [run.outcome.summary.number(key) for run in finished if key in run.outcome.summary.values]
        values = [value for value in values if math.isfinite(value)]
        return statistics.fmean(values) if values else None

    columns.update(val_bpb=mean("val_bpb"), val_loss=mean("val_loss"), val_accuracy=mean("val_accuracy"),
                   val_perplexity=mean("val_perplexity"), training_seconds=mean("training_seconds"),
                   num_steps=mean("num_steps"), tokens_per_second=mean("tokens_per_second"),
                   memory_gb=max(run.outcome.summary.number("peak_memory_mb") for run in finished) / 1024,
                   run_values=" ".join(f"{run.seed}:{run.outcome.summary.val_bpb:.6f}" for run in finished))
    return columns


class FairRuns:
    """Runs of train.py in the worktree, each between two probes of the machine's speed; open() starts the
    probe's worker, close() ends it."""

    def __init__(self, config: LoopConfig, view: View, branch: ExperimentBranch | Worktree, guard: Guard, *,
                 time_budget: float, timeout: float, pid_file: Path, env: Mapping[str, str] | None = None,
                 cpu_check: bool = True) -> None:
        self.config = config
        self.cpu_check = cpu_check  # compare the run's CPU share with the reference's (not on GPU slots: see probe.contention)
        self.env = dict(env or {})  # the slot's own settings (CUDA_VISIBLE_DEVICES), over the runs' environment
        self.view = view
        self.branch = branch
        self.guard = guard
        self.time_budget = time_budget
        self.timeout = timeout
        self.pid_file = pid_file  # the running train.py's pid, for a later loop to kill if this one is killed
        self.probe: Probe | None = None  # the machine-speed probe's worker, open between open() and close()
        self.idle: Reference | None = None  # the idle machine's slowest probe, until the tag has its reference

    def open(self) -> FairRuns:
        """Start the machine-speed probe on the device the runs use, with the runs' environment."""
        c = self.config
        env = training_env(preset=c.preset, time_budget=self.time_budget, seed=c.seed, run_dir=c.runs_dir, cache=c.cache)
        env.update(self.env)
        try:
            self.probe = Probe("cuda" if c.preset == "gpu" else "cpu", env, python=c.python).open()
        except ProbeError as e:
            raise UserError(f"{e}; check that {c.python} can import torch (and see the GPU for the gpu preset).") from None
        if self.probe.gpu_note:
            self.view.note(self.probe.gpu_note)
        return self

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()

    def train(self, name: str, description: str, seed: int, reference: Reference | None) -> TrainRun:
        """A fair run of train.py: one that had its machine to itself. A run that shared it is never judged:
        wait until the probe is clean again and run it once more, up to --contention-retries times.
        `reference` is the tag's (None before its first baseline stored one)."""
        c = self.config
        run = self.train_once(name, description, seed, reference)
        for retry in range(1, c.contention_retries + 2):
            if run.contended is None:
                break
            self.view.note(f"{name} is not judged, it shared its machine: {run.contended}")
            if retry > c.contention_retries:
                break
            quiet = wait_until_quiet(self.probe, run.reference, c.contention_tolerance, first_wait=c.contention_wait)
            if not quiet.quiet:
                run = replace(run, contended=f"{run.contended}; then {quiet.reason}")
                continue
            self.view.note(f"{name}: {quiet.reason}; running it again ({retry}/{c.contention_retries})")
            run = self.train_once(f"{name}-retry{retry}", description, seed, reference)
        if killed_from_outside(run):
            self.view.note(f"{name} was {run.outcome.reason.split(':')[0]}, not by an error of its own: running it once more")
            run = self.train_once(f"{name}-rerun", description, seed, reference)
        return run

    def train_once(self, name: str, description: str, seed: int, reference: Reference | None) -> TrainRun:
        """One run of train.py in the worktree between two machine-speed probes: the outcome, whether it
        shared its machine, and what the guard found wrong, if anything."""
        run_dir = self.config.runs_dir / name
        env = training_env(preset=self.config.preset, time_budget=self.time_budget, seed=seed, run_dir=run_dir,
                           cache=self.config.cache)
        env.update(self.env)
        if self.guard.check_files():
            self.branch.reset(self.branch.head())
            stop_if_untrusted(self.guard)
        held_to = reference or self.idle_reference()
        self.view.started(name, description)
        before = self.probe.measure()
        outcome = run_training(self.branch.path, env, run_dir / "train.log", self.timeout,
                               on_progress=self.view.progress, command=(self.config.python, "train.py"),
                               pid_file=self.pid_file, gpu_watch=self.probe.gpu_watch)
        time.sleep(PROBE_SETTLE_SECONDS)
        after = self.probe.measure()
        problem = self.guard.check_files()
        if problem:
            self.branch.reset(self.branch.head())  # puts the worktree's prepare.py back
        elif outcome.status == "ok":
            problem = self.guard.check_time(outcome, self.time_budget)
        contended = None if problem else contention(before, after, held_to, outcome, self.config.contention_tolerance,
                                                    self.cpu_check)
        slower = max(before.seconds, after.seconds, held_to.probe_seconds if reference is None else 0.0)
        return TrainRun(outcome, seed, problem, contended, held_to, slower, probe_ratio(before, after, held_to))

    def idle_reference(self) -> Reference:
        """Before the tag has a reference: the slowest of IDLE_PROBES probes of the machine at rest, so the first
        baseline is held to the machine's own spread (on a VM, 0.043-0.056 s between quiet probes) and not to
        one fast moment; the first clean baseline's row then stores the slower of this and its own probes."""
        if self.idle is None:
            seconds = []
            for _ in range(IDLE_PROBES):
                seconds.append(self.probe.measure().seconds)
                time.sleep(PROBE_SETTLE_SECONDS / 2)
            self.idle = Reference(max(seconds), None)
            self.view.note(f"machine-speed probe at rest: {min(seconds):.3f}-{max(seconds):.3f} s over {IDLE_PROBES} "
                           f"probes; a run with a probe over {self.idle.probe_seconds:.3f} s "
                           f"x {1 + self.config.contention_tolerance:.2f} shared its machine")
        return self.idle

    def contended_reason(self, run: TrainRun) -> str:
        """The ledger's reason for a run that shared its machine after every re-run."""
        retries = self.config.contention_retries
        return (f"shared its machine, so not judged: {run.contended} (after {retries} re-run{'s' if retries != 1 else ''}); "
                f"it runs again on resume")
