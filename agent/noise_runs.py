"""The noise a tag's judge needs, measured once per tag before its first experiment.

Baseline runs, the unchanged train.py on seeds seed, seed+1, ..., give the best to beat and the cross-seed
sigma; each is verified, so their test_bpb give the val-test noise. Null twins, the baseline with a null
edit (MATRIX_LR x 1.0001: the trajectory changes, the expected result does not) on the baselines' seeds,
give the paired sigma: twin minus baseline, seed by seed, is what a change that does not help looks like to
the paired judge. A baseline or twin that shared its machine or failed stops the loop, with what to do.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.backlog import Assignment
from agent.branch import ExperimentBranch
from agent.config import LoopConfig
from agent.fair_run import FairRuns, TrainRun, measured, stop_if_untrusted
from agent.guard import Guard
from agent.ledger import TWIN, baseline_status
from agent.runner import RunOutcome
from agent.state import TagState
from agent.stops import LoopStop, UserError
from agent.train_constants import ConstantEditError, read_constant, set_constants
from agent.view import View

Record = Callable[[dict[str, object]], TagState]  # appends a row to the ledger; returns the tag's state with it


@dataclass(frozen=True)
class NoiseRuns:
    """The baseline runs and null twins a tag still lacks; each row goes through `record`."""

    config: LoopConfig
    view: View
    branch: ExperimentBranch
    guard: Guard
    fair_runs: FairRuns
    timeout: float  # seconds before a run is killed: a timed-out baseline's advice doubles it
    record: Record

    def measure(self, state: TagState) -> None:
        """Run what is missing: nothing on a tag whose experiments have begun."""
        self.twins(self.baselines(state))

    def baselines(self, state: TagState) -> TagState:
        repeats = self.config.baseline_repeats
        while len(state.baselines) < repeats and not state.done:
            index, base = len(state.baselines), state.base_commit
            seed = self.config.seed + index
            run = self.fair_runs.train(f"{state.row_count + 1:03d}-baseline",
                                       f"baseline {index + 1}/{repeats} (seed {seed})", seed, state.reference)
            state = self.record_baseline(index, run, state)
        return state

    def record_baseline(self, index: int, run: TrainRun, state: TagState) -> TagState:
        """Baseline run `index`, verified by the guard (whose worktree holds the base commit), as a row."""
        base, seed = state.base_commit, run.seed
        row = dict(commit=base, experiment="baseline", seed=seed, parent=base,
                   description=f"baseline {index + 1}/{self.config.baseline_repeats}", **measured([run]))
        if run.contended is None and run.outcome.status == "ok" and not run.problem:  # a re-run has its own dir
            problem, verified = self.guard.verify(run.outcome.log_path.parent, run.outcome.summary.val_bpb)
            run, row["test_bpb"] = replace(run, problem=problem), verified.get("test_bpb")
        self.stop_unless_measured(run, row, state, "the baseline", ", so it would measure the load, not train.py")
        return self.record(dict(row, status=baseline_status(index), reason=f"baseline run {index + 1} (seed {seed})"))

    def twins_wanted(self, state: TagState) -> int:
        """How many null twins the tag still lacks: none once its experiments have begun."""
        return 0 if state.done else max(0, min(self.config.null_twins, len(state.baselines)) - len(state.twins))

    def twin_source(self, state: TagState) -> str | None:
        """The base commit's train.py with the null edit; None (and a note) when it has no MATRIX_LR to edit."""
        source = self.branch.read("train.py", self.branch.repo.git.rev_parse(state.base_commit))
        try:
            return set_constants(source, [Assignment("MATRIX_LR", f"({read_constant(source, 'MATRIX_LR')}) * 1.0001")])
        except ConstantEditError as e:
            self.view.note(f"no null twins, so the judge's sigma is the baselines' cross-seed one: {e}")
            return None

    def record_twin(self, run: TrainRun, sha: str, state: TagState) -> TagState:
        """Null twin `len(state.twins)`, run at `sha` on its baseline's seed, as a row."""
        index, wanted = len(state.twins), len(state.twins) + self.twins_wanted(state)
        base = self.branch.repo.git.rev_parse(state.base_commit)
        row = dict(commit=sha[:7], experiment=TWIN, seed=run.seed, parent=base[:7],
                   description=f"null twin {index + 1}/{wanted}: MATRIX_LR x 1.0001", **measured([run]))
        self.stop_unless_measured(run, row, state, "a null twin")
        return self.record(dict(row, status="discard", reason=f"null twin of baseline {index + 1} (seed {run.seed}): "
                                                              f"measures the paired noise, never a candidate"))

    def twins(self, state: TagState) -> None:
        if not self.twins_wanted(state):
            return
        base = self.branch.repo.git.rev_parse(state.base_commit)
        twin = self.twin_source(state)
        if twin is None:
            return
        sha = (self.branch.repo.git.rev_parse(state.twins[0]["commit"]) if state.twins else
               self.branch.commit(f"{TWIN}: MATRIX_LR x 1.0001, a null edit that measures the paired noise", {"train.py": twin}))
        self.branch.reset(sha)
        try:
            while self.twins_wanted(state):
                index, wanted = len(state.twins), len(state.twins) + self.twins_wanted(state)
                seed = self.config.seed + index
                name = f"{state.row_count + 1:03d}-{TWIN}"
                run = self.fair_runs.train(name, f"null twin {index + 1}/{wanted} of baseline {index + 1} (seed {seed})",
                                           seed, state.reference)
                self.branch.keep_ref(sha, name)
                state = self.record_twin(run, sha, state)
        finally:
            self.branch.reset(base)

    def stop_unless_measured(self, run: TrainRun, row: dict[str, object], state: TagState, who: str, why: str = "") -> None:
        """A baseline or null twin that shared its machine or failed is recorded, and the loop stops: every
        experiment would be judged against what it did not measure."""
        if run.contended:
            self.record(dict(row, status="contended", reason=self.fair_runs.contended_reason(run)))
            raise LoopStop(f"{who} never had the machine to itself ({run.contended}){why}; stop what else is running, "
                           f"then run again.")
        if run.outcome.status != "ok" or run.problem:
            self.record(dict(row, status="invalid" if run.problem else run.outcome.status,
                             reason=run.problem or run.outcome.reason))
            stop_if_untrusted(self.guard)
            raise UserError(self.failure(run.outcome, run.problem, state.base_commit))

    def failure(self, outcome: RunOutcome, problem: str | None, base: str) -> str:
        """What to do about a failed baseline: the cause lies in train.py only when the branch changed it."""
        what, log, resume = problem or outcome.reason, outcome.log_path, self.config.resume_command
        if problem:
            return (f"the guard refused the baseline run ({problem}); read {log} and program.md's rules for "
                    f"train.py, fix train.py and commit it, then resume: {resume}")
        user_train = subprocess.run(["git", "rev-parse", "HEAD:train.py"], cwd=self.config.repo_root,
                                    capture_output=True, text=True).stdout.strip()
        if self.branch.repo.git.rev_parse(f"{base}:train.py") != user_train:
            return (f"the baseline run failed ({what}) on a train.py that differs from your checkout's; read {log}, "
                    f"fix train.py on {self.branch.branch} (in {self.branch.path}) and commit it there, then "
                    f"resume: {resume}")
        if outcome.status == "timeout":
            load, cores = os.getloadavg()[0], os.cpu_count()
            return (f"the baseline of your unchanged train.py timed out ({what}): the machine's load average is "
                    f"{load:.1f} on {cores} cores, so it was probably slowed down by other work; wait for a quieter "
                    f"machine or allow more time than --timeout {self.timeout:g}, e.g. resume: {resume} "
                    f"--timeout {2 * self.timeout:g}")
        return (f"the baseline of your unchanged train.py crashed ({what}), so the cause is its environment or "
                f"data, not an experiment: read {log}; if it points at the data or the tokenizer, rebuild them with "
                f"python prepare.py --force (the source you prepared), check that python train.py runs on its own, "
                f"then resume: {resume}")
