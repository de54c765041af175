"""
The overnight loop: backlog -> edit -> commit -> run -> judge -> record, unattended and resumable.

    python agent/loop.py --demo                 # offline: cpu preset, builtin data, backlog proposer
    python agent/loop.py --tag nov28            # overnight with the preset of this machine
    python agent/loop.py --tag nov28 --proposer claude --max-cost 5
    python agent/loop.py --tag nov28 --backlog-issue karpathy/autoresearch#7   # the backlog kept in a GitHub issue
    python agent/loop.py --remove-tag nov28     # its worktree, branch, refs and runs; its ledger rows set aside

Every experiment is one commit on autoresearch/<tag> (in worktrees/<tag>), one run of train.py
(log under runs/<tag>/), one verdict and one row of experiments.tsv. The same command with the
same tag resumes: the baseline is not re-run, an interrupted experiment is, nothing is recorded twice.
One loop runs per tag: a second one on the same tag is refused (agent/lock.py).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import ValidationError  # noqa: E402

from agent.backlog import Assignment, BacklogItem, backlog_from_flags, load_backlog  # noqa: E402
from agent.branch import ExperimentBranch, remove_tag, require_clean, tag_footprint  # noqa: E402
from agent.config import DEMO_BACKLOG, DEMO_BUDGET, DEMO_EXPERIMENTS, DEMO_TAG, LoopConfig, default_tag  # noqa: E402
from agent.guard import Guard, gap_noise, val_test_problem  # noqa: E402
from agent.judge import JUDGES, LOOP_CONFIRM_MARGIN, LOOP_K, NoiseFloor, Verdict, noise_floor  # noqa: E402
from agent.ledger import TWIN, Ledger, baseline_status, is_baseline_run  # noqa: E402
from agent.limits import BacklogExhausted, Limits  # noqa: E402
from agent.lock import TagBusy, TagLock, busy_tags  # noqa: E402
from agent.probe import Probe, ProbeError, Reference, contention, probe_ratio, wait_until_quiet  # noqa: E402
from agent.train_constants import ConstantEditError, read_constant, set_constants  # noqa: E402
from agent.proposer import BacklogProposer, Proposal, Proposer, ProposerState, Skip, usage_columns  # noqa: E402
from agent.runner import RunOutcome, default_timeout, kill_stale, run_training, training_env  # noqa: E402
from agent.stops import LoopStop, UserError  # noqa: E402
from agent.view import View, make_view  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_SETTLE_SECONDS = 1.0  # after a run, before the probe: the run's last writes and freed memory settle first
IDLE_PROBES = 5             # probes of the idle machine before a tag's first run: its slowest is the first reference


@dataclass(frozen=True)
class Data:
    """What prepare.py says about the prepared cache for this preset."""

    fingerprint: str
    time_budget: float
    files: tuple[str, ...]  # every file the data and the tokenizer live in (the guard pins them)


def prepared_data(python: str, repo_root: Path, env: dict[str, str], *, prepare_if_missing: bool = False) -> Data:
    """Ask the user's prepare.py about its cache; prepare the builtin corpus first if asked and missing."""
    query = ("import json, os, prepare; m = prepare.load_manifest(); "
             "files = m['train'] + m['val'] + m['test'] + [os.path.join(m['dir'], f) for f in "
             "('prepared.json', 'tokenizer.pkl', 'token_bytes.pt')]; "
             "print(json.dumps({'fingerprint': m['fingerprint'], 'budget': prepare.TIME_BUDGET, 'files': files}))")

    def ask() -> subprocess.CompletedProcess:
        return subprocess.run([python, "-c", query], cwd=repo_root, env=env, capture_output=True, text=True)

    answer = ask()
    if answer.returncode != 0 and prepare_if_missing:
        subprocess.run([python, "prepare.py", "--source", "builtin"], cwd=repo_root, env=env, check=True)
        answer = ask()
    if answer.returncode != 0:
        lines = [line for line in answer.stderr.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else "prepare.py failed"
        raise UserError(message.split("PrepareError: ")[-1])
    data = json.loads(answer.stdout.strip().splitlines()[-1])
    return Data(data["fingerprint"], float(data["budget"]), tuple(data["files"]))


class Loop:
    """Wires the backlog, proposer, branch, runner, judge and ledger; one experiment per iteration."""

    def __init__(self, config: LoopConfig, view: View, proposer: Proposer | None = None) -> None:
        """Only the settings and the counters; open() reads the repository, the backlog, the data and the ledger."""
        self.config = config
        self.view = view
        self.given_proposer = proposer
        self.limits = Limits(config.max_experiments, config.max_hours, config.max_crashes)
        self.experiments_run = 0
        self.crashes_in_a_row = 0   # in this invocation: a resumed tag gets a fresh allowance
        self.refusals_in_a_row = 0  # LLM proposals in a row that could not be run
        self.contended_in_a_row = 0  # experiments in a row that never got a quiet machine
        self.left_for_llm: set[str] = set()
        self.probe: Probe | None = None  # the machine-speed probe's worker, open while run() runs
        self.idle: Reference | None = None  # the idle machine's slowest probe, until the tag has its reference

    def open(self) -> Loop:
        """Check the checkout, read the backlog and the prepared data, take the tag's lock, repair the ledger,
        open the experiment branch and the guard; every refusal is a UserError that says what to do."""
        config, view = self.config, self.view
        require_clean(config.repo_root)
        self.items = load_backlog(config.backlog)
        self.ledger = Ledger(config.ledger_path)
        self.proposer = self.given_proposer or make_proposer(config)
        if isinstance(self.proposer, BacklogProposer) and not any(item.edits for item in self.items):
            raise UserError(f"{config.backlog} has no item with a machine-readable edit, so the backlog proposer "
                            f"has nothing to run: add edits to it (see agent/backlog.md's Edits section) or use "
                            f"--proposer claude.")
        self.backlog_proposer = BacklogProposer()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
        base_env.update(AUTORESEARCH_PRESET=config.preset)
        if config.cache:
            base_env["AUTORESEARCH_CACHE"] = str(config.cache)
        if config.time_budget:
            base_env["AUTORESEARCH_TIME_BUDGET"] = str(config.time_budget)
        self.data = prepared_data(config.python, config.repo_root, base_env, prepare_if_missing=config.demo)
        self.time_budget = config.time_budget or self.data.time_budget
        self.timeout = config.timeout or default_timeout(self.time_budget, config.startup_allowance)
        self.check_comparable(self.rows())
        self.lock = TagLock(config.runs_dir, config.tag).acquire()  # before anything of the tag's is touched
        repaired = self.ledger.repair()
        if repaired:
            view.note(repaired)
        self.branch = ExperimentBranch.open(config.repo_root, config.tag)
        self.guard = Guard(config.repo_root, self.branch.path, self.data.files, python=config.python,
                           env=training_env(preset=config.preset, time_budget=self.time_budget, seed=config.seed,
                                            run_dir=config.runs_dir, cache=config.cache),
                           preset=config.preset)
        self.pid_file = config.runs_dir / "train.pid"
        if kill_stale(self.pid_file):  # safe: this loop holds the tag's lock, so no live loop owns that run
            view.note("killed a training run that a previous, killed loop left behind")
        return self

    # -- state, derived from the ledger and git ----------------------------------------------

    def rows(self) -> list[dict[str, str]]:
        read = self.ledger.read()
        for problem in read.problems:
            self.view.note(problem)
        return [row for row in read.rows if row["tag"] == self.config.tag]

    def check_comparable(self, rows: list[dict[str, str]]) -> None:
        """A tag's runs share one preset, data fingerprint and budget, or they could not be compared."""
        first = next((r for r in rows if is_baseline_run(r)), None)
        if first is None:
            return
        then = (first["preset"], first["data_fingerprint"], float(first["time_budget"] or self.time_budget))
        now = (self.config.preset, self.data.fingerprint, self.time_budget)
        if then != now:
            flags = f"--preset {then[0]} --time-budget {then[2]:g}"
            resume = f"resume it with {flags} (a demo tag: --demo)" if then[1] == now[1] else "point AUTORESEARCH_CACHE at the data it ran on"
            raise UserError(f"tag {self.config.tag} was run with preset {then[0]} on data {then[1]} for "
                            f"{then[2]:g} s, not {now[0]} on {now[1]} for {now[2]:g} s; {resume}, or start a new "
                            f"--tag so runs are never compared across presets, data or budgets.")

    def _full_sha(self, short: str) -> str:
        return self.branch.repo.git.rev_parse(short)

    def derive(self, rows: list[dict[str, str]]) -> None:
        """Best commit, its runs (paired by seed), the noise floor and what is done, from this tag's rows."""
        self.baselines = [r for r in rows if is_baseline_run(r)]
        if self.baselines:
            self.base_commit = self._full_sha(self.baselines[0]["commit"])
        else:
            self.base_commit = self.branch.head() if not rows else self._full_sha(rows[0]["parent"] or rows[0]["commit"])
        self.best_commit = self.base_commit
        self.best_values = [float(r["val_bpb"]) for r in self.baselines]
        for row in rows:
            if row["status"] == "keep" and row["experiment"] != "baseline":
                self.best_commit, self.best_values = self._full_sha(row["commit"]), run_values(row)
        self.best_val = statistics.fmean(self.best_values) if self.best_values else None
        best_row = next((r for r in reversed(rows) if r["status"] == "keep" and r["experiment"] != "baseline"),
                        self.baselines[0] if self.baselines else None)
        self.best_test = float(best_row["test_bpb"]) if best_row and best_row["test_bpb"] else None  # its first run's
        self.twins = [r for r in rows if r["experiment"] == TWIN and r["status"] == "discard"]
        self.floor: NoiseFloor = noise_floor([float(r["val_bpb"]) for r in self.baselines],
                                             [float(r["val_bpb"]) for r in self.twins])
        first = self.baselines[0] if self.baselines else {}
        self.reference = (Reference(float(first["probe_seconds"]), float(first["cpu_per_second"]) if first["cpu_per_second"] else None)
                          if first.get("probe_seconds") else None)  # the machine as the first baseline found it
        # a contended experiment measured the load, not the change: it runs again
        self.done = {r["experiment"] for r in rows if r["experiment"] not in ("baseline", TWIN) and r["status"] != "contended"}

    # -- one run of train.py -----------------------------------------------------------------

    def train(self, name: str, description: str, seed: int) -> TrainRun:
        """A fair run of train.py: one that had its machine to itself. A run that shared it is never judged:
        wait until the probe is clean again and run it once more, up to --contention-retries times."""
        c = self.config
        run = self.train_once(name, description, seed)
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
            run = self.train_once(f"{name}-retry{retry}", description, seed)
        return run

    def train_once(self, name: str, description: str, seed: int) -> TrainRun:
        """One run of train.py in the worktree between two machine-speed probes: the outcome, whether it
        shared its machine, and what the guard found wrong, if anything."""
        run_dir = self.config.runs_dir / name
        env = training_env(preset=self.config.preset, time_budget=self.time_budget, seed=seed, run_dir=run_dir,
                           cache=self.config.cache)
        if self.guard.check_files():
            self.branch.reset(self.branch.head())
            self.stop_if_untrusted()
        reference = self.reference or self.idle_reference()
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
        contended = None if problem else contention(before, after, reference, outcome, self.config.contention_tolerance)
        slower = max(before.seconds, after.seconds, reference.probe_seconds if self.reference is None else 0.0)
        return TrainRun(outcome, seed, problem, contended, reference, slower, probe_ratio(before, after, reference))

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

    def stop_if_untrusted(self) -> None:
        """A changed harness or data cache cannot be trusted, nor restored from git: stop."""
        if not self.guard.harness_intact():
            raise LoopStop("a run changed prepare.py or agent/ in your checkout; inspect and restore them "
                           "(git status, git diff), then resume with the same tag.")
        if not self.guard.data_intact():
            raise LoopStop("the prepared data changed during a run; rebuild it with python prepare.py --force, "
                           "then resume with the same tag.")

    def record(self, row: dict[str, object]) -> None:
        row.setdefault("tag", self.config.tag)
        row.setdefault("preset", self.config.preset)
        row.setdefault("data_fingerprint", self.data.fingerprint)
        row.setdefault("time_budget", self.time_budget)
        row.setdefault("sigma", self.floor.sigma)
        repaired = self.ledger.append(row)
        if repaired:
            self.view.note(repaired)
        self.view.finished(row, self.rows())

    @staticmethod
    def measured(runs: list[TrainRun]) -> dict[str, object]:
        """The row's metrics: each one the mean over the runs that finished (one row per experiment)."""
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

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        rows = self.rows()
        self.derive(rows)
        self.branch.reset(self.best_commit)
        try:
            self.open_probe()
            self.run_baselines()
            self.view.best(self.best_val, self.floor.describe())
            while True:
                self.limits.check(self.experiments_run, self.crashes_in_a_row, self.refusals_in_a_row,
                                  self.contended_in_a_row)
                self.step()
        except KeyboardInterrupt:
            self.branch.reset(self.best_commit)
            raise
        finally:
            if self.probe is not None:
                self.probe.close()
            self.view.note(self.guard.costs.describe())

    def open_probe(self) -> None:
        """Start the machine-speed probe on the device the runs use, with the runs' environment."""
        env = training_env(preset=self.config.preset, time_budget=self.time_budget, seed=self.config.seed,
                           run_dir=self.config.runs_dir, cache=self.config.cache)
        try:
            self.probe = Probe("cuda" if self.config.preset == "gpu" else "cpu", env, python=self.config.python).open()
        except ProbeError as e:
            raise UserError(f"{e}; check that {self.config.python} can import torch (and see the GPU for the gpu preset).") from None
        if self.probe.gpu_note:
            self.view.note(self.probe.gpu_note)

    def run_baselines(self) -> None:
        while len(self.baselines) < self.config.baseline_repeats and not self.done:
            index = len(self.baselines)
            seed = self.config.seed + index
            name = f"{len(self.rows()) + 1:03d}-baseline"
            run = self.train(name, f"baseline {index + 1}/{self.config.baseline_repeats} (seed {seed})", seed)
            outcome, problem = run.outcome, run.problem
            row = dict(commit=self.base_commit[:7], experiment="baseline", seed=seed, parent=self.base_commit[:7],
                       description=f"baseline {index + 1}/{self.config.baseline_repeats}", **self.measured([run]))
            if run.contended:
                self.record(dict(row, status="contended", reason=self.contended_reason(run)))
                raise LoopStop(f"the baseline never had the machine to itself ({run.contended}), so it would "
                               f"measure the load, not train.py; stop what else is running, then run again.")
            if outcome.status == "ok" and not problem:  # every baseline: their test_bpb give the val-test noise
                problem, verified = self.guard.verify(outcome.log_path.parent, outcome.summary.val_bpb)  # a re-run has its own dir
                row["test_bpb"] = verified.get("test_bpb")
            if outcome.status != "ok" or problem:
                self.record(dict(row, status="invalid" if problem else outcome.status, reason=problem or outcome.reason))
                self.stop_if_untrusted()
                raise UserError(self.baseline_failure(outcome, problem))
            self.record(dict(row, status=baseline_status(index), reason=f"baseline run {index + 1} (seed {seed})"))
            self.derive(self.rows())
        self.run_twins()

    def run_twins(self) -> None:
        """Null twins: the baseline with a null edit (MATRIX_LR x 1.0001: the trajectory changes, the expected
        result does not) on the baselines' seeds. Twin minus baseline, seed by seed, is what a change that does
        not help looks like to the paired judge: its sigma."""
        wanted = min(self.config.null_twins, len(self.baselines))
        if len(self.twins) >= wanted or self.done:
            return
        base = self.branch.read("train.py", self.base_commit)
        try:
            twin = set_constants(base, [Assignment("MATRIX_LR", f"({read_constant(base, 'MATRIX_LR')}) * 1.0001")])
        except ConstantEditError as e:
            self.view.note(f"no null twins, so the judge's sigma is the baselines' cross-seed one: {e}")
            return
        sha = (self._full_sha(self.twins[0]["commit"]) if self.twins else
               self.branch.commit(f"{TWIN}: MATRIX_LR x 1.0001, a null edit that measures the paired noise", {"train.py": twin}))
        self.branch.reset(sha)
        try:
            while len(self.twins) < wanted:
                index = len(self.twins)
                seed = self.config.seed + index
                name = f"{len(self.rows()) + 1:03d}-{TWIN}"
                run = self.train(name, f"null twin {index + 1}/{wanted} of baseline {index + 1} (seed {seed})", seed)
                row = dict(commit=sha[:7], experiment=TWIN, seed=seed, parent=self.base_commit[:7],
                           description=f"null twin {index + 1}/{wanted}: MATRIX_LR x 1.0001", **self.measured([run]))
                self.branch.keep_ref(sha, name)
                if run.contended:
                    self.record(dict(row, status="contended", reason=self.contended_reason(run)))
                    raise LoopStop(f"a null twin never had the machine to itself ({run.contended}); stop what else "
                                   f"is running, then run again.")
                if run.outcome.status != "ok" or run.problem:
                    self.record(dict(row, status="invalid" if run.problem else run.outcome.status,
                                     reason=run.problem or run.outcome.reason))
                    self.stop_if_untrusted()
                    raise UserError(self.baseline_failure(run.outcome, run.problem))
                self.record(dict(row, status="discard", reason=f"null twin of baseline {index + 1} (seed {seed}): "
                                                               f"measures the paired noise, never a candidate"))
                self.derive(self.rows())
        finally:
            self.branch.reset(self.base_commit)

    def baseline_failure(self, outcome: RunOutcome, problem: str | None) -> str:
        """What to do about a failed baseline: the cause lies in train.py only when the branch changed it."""
        what, log, resume = problem or outcome.reason, outcome.log_path, self.config.resume_command
        if problem:
            return (f"the guard refused the baseline run ({problem}); read {log} and program.md's rules for "
                    f"train.py, fix train.py and commit it, then resume: {resume}")
        user_train = subprocess.run(["git", "rev-parse", "HEAD:train.py"], cwd=self.config.repo_root,
                                    capture_output=True, text=True).stdout.strip()
        if self.branch.repo.git.rev_parse(f"{self.base_commit}:train.py") != user_train:
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

    def next_item(self) -> BacklogItem | None:
        for item in self.items:
            if item.id not in self.done and item.id not in self.left_for_llm:
                return item
        return None

    def step(self) -> None:
        """Propose, and run what was proposed; raises BacklogExhausted when nothing is left."""
        item = self.next_item()
        proposer: Proposer = self.backlog_proposer if item is not None and item.edits else self.proposer
        if item is None and isinstance(self.proposer, BacklogProposer):
            raise BacklogExhausted("the backlog is exhausted: every item with a machine-readable edit has run"
                                   + (f"; {len(self.left_for_llm)} prose items need --proposer claude" if self.left_for_llm else "") + ".")
        state = ProposerState(tag=self.config.tag, best_commit=self.best_commit, best_val_bpb=self.best_val,
                              sigma=self.floor.sigma, ledger_rows=self.rows(), item=item,
                              train_py=self.branch.read("train.py", self.best_commit))
        if proposer is not self.backlog_proposer:
            self.view.started("proposing", f"{proposer.name}: " + (f"{item.id}: {item.description}" if item else "an idea of its own"))
        result = proposer.propose(state)
        if result is None:
            if item is None:
                raise BacklogExhausted("the proposer has nothing more to propose.")
            self.left_for_llm.add(item.id)
            self.view.note(f"{item.id} has no machine-readable edit; left for an LLM proposer")
            return
        if isinstance(result, Skip):
            self.record(dict(commit="", experiment=result.experiment, status="invalid", description="not run",
                             reason=result.reason, parent=self.best_commit[:7], **usage_columns(result)))
            self.done.add(result.experiment)
            ran = False
        else:
            ran = self.experiment(result, proposer, state)
        if proposer is not self.backlog_proposer:
            self.refusals_in_a_row = 0 if ran else self.refusals_in_a_row + 1

    def experiment(self, proposal: Proposal, proposer: Proposer, state: ProposerState) -> bool:
        """Commit, run, judge and record a proposal; whether it was run at all."""
        parent, best = self.best_commit, list(self.best_values)
        n = len(self.rows()) + 1
        name = f"{n:03d}-{proposal.experiment}"
        base = dict(experiment=proposal.experiment, description=proposal.description, parent=parent[:7],
                    seed=self.config.seed, **usage_columns(proposal))
        problem = syntax_problem(proposal.train_py)
        if problem or proposal.train_py == state.train_py:
            self.record(dict(base, commit="", status="invalid", reason=problem or "the proposal leaves train.py unchanged"))
            self.done.add(proposal.experiment)
            return False
        sha = self.branch.commit(f"{proposal.experiment}: {proposal.description}", {"train.py": proposal.train_py})
        refused = self.guard.check_scope(self.branch.changed_paths(parent, sha)) or self.guard.check_source(proposal.train_py)
        if refused:
            self.finish(name, sha, parent, dict(base, commit=sha[:7], status="invalid", reason=f"not run: {refused}"))
            return False
        self.experiments_run += 1
        proposal, sha, name, run, attempts, repaired = self.run_with_repair(proposal, proposer, state, sha, name, n)
        added, removed = self.branch.line_changes(parent, sha)
        row = dict(base, commit=sha[:7], description=proposal.description, lines_added=added, lines_removed=removed,
                   attempts=attempts)
        if run.problem:
            runs, status, reason = [run], "invalid", run.problem
        elif run.contended:
            runs, status, reason = [run], "contended", self.contended_reason(run)
        elif run.outcome.status != "ok":
            runs, status, reason = [run], run.outcome.status, run.outcome.reason + repaired
        else:
            runs, status, reason, verdict = self.judged(name, proposal, run, best, added, removed)
            row.update(delta=verdict.delta, threshold=verdict.threshold,
                       sigma=verdict.sigma if verdict.sigma is not None else self.floor.sigma)
            if status == "keep":  # the first run's checkpoint: its seed is the one every best has a test score on
                first = runs[0].outcome
                problem, verified = self.guard.verify(first.log_path.parent, first.summary.val_bpb)
                row["test_bpb"] = verified.get("test_bpb")
                problem = problem or self.val_test_check(verified, best[0])
                if problem:
                    status, reason = "invalid", f"{problem} (the judge would have kept it: {reason})"
        self.finish(name, sha, parent, dict(row, **self.measured(runs), status=status, reason=reason))
        return True

    def run_with_repair(self, proposal: Proposal, proposer: Proposer, state: ProposerState, sha: str, name: str,
                        n: int) -> tuple[Proposal, str, str, TrainRun, int, str]:
        """The first run, and while it crashes, the proposer's repairs of its own edit (amending the commit)."""
        run = self.train(name, proposal.description, self.config.seed)
        attempts = reruns = 0  # repair conversations, and the runs of what they repaired
        while run.outcome.status == "crash" and not run.contended and attempts < self.config.repair_attempts:
            fixed = proposer.repair(state, proposal, run.outcome.tail, attempts + 1)
            if fixed is None:  # this proposer cannot repair
                break
            attempts += 1
            if not isinstance(fixed, Proposal) or syntax_problem(fixed.train_py) or self.guard.check_source(fixed.train_py):
                break
            self.branch.keep_ref(sha, f"{name}-attempt{attempts}")
            proposal = fixed
            sha = self.branch.amend(f"{proposal.experiment}: {proposal.description}", {"train.py": proposal.train_py})
            name = f"{n:03d}-{proposal.experiment}-repair{attempts}"
            reruns += 1
            run = self.train(name, proposal.description, self.config.seed)
        repaired = f" (still failing after {reruns} repaired run{'s' if reruns != 1 else ''})" if reruns else ""
        return proposal, sha, name, run, attempts, repaired

    def judged(self, name: str, proposal: Proposal, first: TrainRun, best: list[float], added: int,
               removed: int) -> tuple[list[TrainRun], str, str, Verdict]:
        """Judge the first run; while the judge asks to confirm, run again on the next baseline's seed, so
        each run is paired with the best's run on the same seed. The runs, the status and why."""
        runs = [first]
        verdict = self.judge([r.outcome.summary.val_bpb for r in runs], best, added, removed)
        while verdict.status == "confirm":
            if len(runs) >= self.config.max_runs:
                return runs, "discard", f"{verdict.reason}; still undecided after {len(runs)} runs (--max-runs)", verdict
            seed = self.config.seed + len(runs)
            again = self.train(f"{name}-run{len(runs) + 1}", f"confirming {proposal.description} (seed {seed})", seed)
            if again.problem:
                return runs + [again], "invalid", f"confirming run: {again.problem}", verdict
            if again.contended:
                return runs + [again], "contended", f"confirming run: {self.contended_reason(again)}", verdict
            if again.outcome.status != "ok":
                return runs, "discard", f"the confirming run (seed {seed}) failed: {again.outcome.reason}", verdict
            runs.append(again)
            verdict = self.judge([r.outcome.summary.val_bpb for r in runs], best, added, removed)
        return runs, verdict.status, verdict.reason, verdict

    def val_test_check(self, verified: dict, best_val: float) -> str | None:
        """The val-vs-test rule for a verified would-be keep (its first run), against the best's run on the
        same seed: the gain on val must show on test."""
        if self.best_test is None:  # a tag begun before test scores existed: nothing to compare with
            return None
        noise = gap_noise([(float(r["val_bpb"]), float(r["test_bpb"])) for r in self.baselines if r["test_bpb"]])
        return val_test_problem((best_val, self.best_test), (verified["val_bpb"], verified["test_bpb"]), noise,
                                self.config.k)

    def finish(self, name: str, sha: str, parent: str, row: dict[str, object]) -> None:
        """Keep the commit under a ref, record the row, then advance the best or go back to it."""
        self.crashes_in_a_row = self.crashes_in_a_row + 1 if row["status"] == "crash" else 0
        self.contended_in_a_row = self.contended_in_a_row + 1 if row["status"] == "contended" else 0
        self.branch.keep_ref(sha, name)
        self.record(row)
        self.done.add(str(row["experiment"]))
        if row["status"] == "keep":
            self.best_commit, self.best_values = sha, run_values(row)
            self.best_val = statistics.fmean(self.best_values)
            self.best_test = float(row["test_bpb"]) if row.get("test_bpb") is not None else None
            self.view.best(self.best_val, self.floor.describe())
        else:
            self.branch.reset(parent)
            for checkpoint in (self.config.runs_dir).glob(f"{name.split('-')[0]}-*/checkpoint.pt"):
                checkpoint.unlink()
        self.stop_if_untrusted()

    def contended_reason(self, run: TrainRun) -> str:
        retries = self.config.contention_retries
        return (f"shared its machine, so not judged: {run.contended} (after {retries} re-run{'s' if retries != 1 else ''}); "
                f"it runs again on resume")

    def judge(self, values: list[float], best: list[float], added: int, removed: int) -> Verdict:
        c = self.config
        return JUDGES[c.judge](values, best, self.floor, k=c.k, min_delta=c.min_delta or 0.0, lines_added=added,
                               lines_removed=removed, confirm_margin=c.confirm_margin, max_runs=c.max_runs)


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


def run_values(row: dict[str, object]) -> list[float]:
    """A kept row's val_bpb per run in seed order (`seed:value ...`); rows without them count as one run."""
    text = str(row.get("run_values") or "")
    if text:
        return [float(pair.split(":", 1)[1]) for pair in text.split()]
    return [float(row["val_bpb"])]


def syntax_problem(source: str) -> str | None:
    try:
        ast.parse(source)
    except SyntaxError as e:
        return f"the proposed train.py does not parse: line {e.lineno}: {e.msg}"
    return None


def make_proposer(config: LoopConfig) -> Proposer:
    if config.proposer == "backlog" or (config.proposer == "auto" and not os.environ.get("ANTHROPIC_API_KEY")):
        return BacklogProposer()
    from agent.claude import ClaudeProposer, CostBudget, PriceTable  # the SDK is only needed here

    spent = sum(float(r["cost_usd"] or 0) for r in Ledger(config.ledger_path).rows(config.tag))
    return ClaudeProposer(config.repo_root, backlog_path=config.backlog, ledger_path=config.ledger_path,
                          budget=CostBudget(config.max_cost, spent=spent), model=config.model,
                          prices=PriceTable.load(config.prices) if config.prices else None)


# -- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python agent/loop.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", help=f"names the branch autoresearch/<tag> (default: today, e.g. nov28; with --demo: {DEMO_TAG})")
    p.add_argument("--proposer", choices=["backlog", "claude", "auto"], default="auto",
                   help="auto: claude when ANTHROPIC_API_KEY is set, else backlog")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--backlog", type=Path,
                        help="the backlog file (default: agent/backlog.md; with --demo, agent/demo_backlog.md)")
    source.add_argument("--backlog-issue", metavar="OWNER/REPO#N",
                        help="read the backlog from a GitHub issue's description (or its URL); "
                             "GITHUB_TOKEN is used when set")
    p.add_argument("--github-api-url", metavar="URL",
                   help="GitHub's REST API for --backlog-issue (default: GITHUB_API_URL or https://api.github.com; "
                        "GitHub Enterprise: https://HOST/api/v3)")
    p.add_argument("--max-experiments", type=int, help="experiments in this invocation (baselines not counted)")
    p.add_argument("--max-hours", type=float, help="start no experiment after this many hours")
    p.add_argument("--time-budget", type=float, help="training seconds per run (default: the preset's)")
    p.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu when CUDA is available, else cpu")
    p.add_argument("--null-twins", type=int, default=3,
                   help="runs of the baseline with MATRIX_LR x 1.0001 on the baselines' seeds: the paired noise (0: none)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="baseline runs, different seeds: the noise floor")
    p.add_argument("--judge", choices=["noise", "greedy"], default="noise")
    p.add_argument("--k", type=float, default=LOOP_K, help="sigmas a candidate must beat the best by (the bar is k sigma / sqrt(runs))")
    p.add_argument("--min-delta", type=float, help="smallest improvement worth keeping (needed with --baseline-repeats 1)")
    p.add_argument("--confirm-margin", type=float, default=LOOP_CONFIRM_MARGIN,
                   help="re-run every would-be keep and near misses within this fraction of the threshold (0: never)")
    p.add_argument("--max-runs", type=int, default=2,
                   help="runs one experiment may take while the judge asks to confirm (run i uses baseline i's seed)")
    p.add_argument("--contention-tolerance", type=float, default=0.10,
                   help="a run whose machine-speed probe is this much slower than the first baseline's is not judged")
    p.add_argument("--contention-retries", type=int, default=3,
                   help="re-runs of a run that shared its machine, each after waiting for a quiet probe")
    p.add_argument("--contention-wait", type=float, default=10.0,
                   help="seconds before the first re-probe of a busy machine; the wait doubles each time")
    p.add_argument("--max-crashes", type=int, default=3, help="stop after this many crashes in a row")
    p.add_argument("--repair-attempts", type=int, default=2, help="crash repairs an LLM proposer may try")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, help="seconds before a run is killed (default 2.5 x budget + startup)")
    p.add_argument("--model", help="Claude model (default: AUTORESEARCH_MODEL or the proposer's default)")
    p.add_argument("--max-cost", type=float, help="USD the Claude proposer may spend on this tag, counting earlier "
                                                  "invocations of the same tag (default: no cap)")
    p.add_argument("--prices", type=Path, help="JSON of per-model prices in USD per million tokens")
    p.add_argument("--demo", action="store_true", help="offline demo: cpu preset, builtin data, backlog proposer, short runs")
    p.add_argument("--remove-tag", metavar="T", help="remove tag T's worktree, branch, refs and runs/T, and move its "
                   "ledger rows to experiments.tsv.removed, after a confirmation; runs no loop")
    p.add_argument("--yes", action="store_true", help="with --remove-tag: do not ask for the confirmation")
    return p.parse_args(argv)


def resume_command(argv: list[str], args: argparse.Namespace, tag: str) -> str:
    """The command line that runs this invocation again on the same tag, as the user would paste it."""
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    return shlex.join(["python", script, *argv, *(["--tag", tag] if args.tag is None else [])])


def build_config(args: argparse.Namespace, argv: list[str] | None = None) -> LoopConfig:
    default = args.backlog or REPO_ROOT / (DEMO_BACKLOG if args.demo else "agent/backlog.md")
    backlog = backlog_from_flags(default, args.backlog_issue, args.github_api_url, "loop").path
    preset = args.preset
    if preset is None:
        preset = "cpu" if args.demo else os.environ.get("AUTORESEARCH_PRESET") or _detect_preset()
    cache = os.environ.get("AUTORESEARCH_CACHE")
    tag = args.tag if args.tag is not None else DEMO_TAG if args.demo else default_tag()
    try:
        return LoopConfig(
            repo_root=REPO_ROOT, tag=tag,
            proposer="backlog" if args.demo else args.proposer, backlog=backlog,
            max_experiments=args.max_experiments if args.max_experiments is not None else (DEMO_EXPERIMENTS if args.demo else None),
            max_hours=args.max_hours, preset=preset,
            time_budget=args.time_budget or (DEMO_BUDGET if args.demo else None),
            baseline_repeats=args.baseline_repeats, null_twins=args.null_twins, judge=args.judge, k=args.k, min_delta=args.min_delta,
            confirm_margin=args.confirm_margin, max_runs=args.max_runs, max_crashes=args.max_crashes,
            contention_tolerance=args.contention_tolerance, contention_retries=args.contention_retries,
            contention_wait=args.contention_wait, repair_attempts=args.repair_attempts,
            seed=args.seed, cache=Path(cache) if cache else None, timeout=args.timeout, demo=args.demo,
            model=args.model or os.environ.get("AUTORESEARCH_MODEL"), max_cost=args.max_cost,
            prices=args.prices, python=sys.executable,
            resume=resume_command(sys.argv[1:] if argv is None else argv, args, tag))
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}; see python agent/loop.py --help.") from None


def _detect_preset() -> str:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return "gpu" if probe.stdout.strip() == "True" else "cpu"


def remove_tag_command(tag: str, *, yes: bool, repo_root: Path = REPO_ROOT) -> int:
    """--remove-tag: what the tag left behind, a confirmation, then its removal; the exit code."""
    footprint = tag_footprint(repo_root, tag)
    runs_dir, ledger = repo_root / "runs" / tag, Ledger(repo_root / "experiments.tsv")
    lock = TagLock(runs_dir, tag)
    if lock.is_held_elsewhere():
        raise TagBusy(f"tag {tag} is in use by a running loop ({lock.holder()}): stop it first (Ctrl-C in its "
                      f"terminal), then remove the tag.")
    others = [busy for busy in busy_tags(repo_root / "runs") if not busy.startswith(f"{tag} (")]
    if others:
        raise TagBusy(f"a loop is running on tag {others[0]} and appends to {ledger.path}, which removing {tag} "
                      f"rewrites: wait for it to stop, then remove the tag.")
    rows = len(ledger.rows(tag))
    parts = footprint.describe() + ([f"the runs directory {runs_dir}"] if runs_dir.exists() else [])
    parts += [f"its {rows} row{'s' if rows != 1 else ''} in {ledger.path} (moved to {ledger.removed})"] if rows else []
    if not parts:
        raise UserError(f"there is nothing of tag {tag} to remove: no branch autoresearch/{tag}, worktree, refs, "
                        f"runs directory or ledger rows.")
    print(f"removing tag {tag}: " + "; ".join(parts) + ". Your checkout and other tags are not touched.")
    if not yes:
        try:
            answer = input(f"remove tag {tag}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print(f"loop: nothing removed; answer y to remove tag {tag}, or pass --yes.", file=sys.stderr)
            return 1
    with lock.acquire() if runs_dir.exists() else lock:  # no loop may start on the tag while it goes
        remove_tag(repo_root, footprint)
        moved = ledger.remove_rows(tag)
        if runs_dir.exists():
            shutil.rmtree(runs_dir)
    print(f"removed tag {tag}" + (f"; its {moved} ledger rows are in {ledger.removed}" if moved else "") + ".")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.remove_tag is not None:
            return remove_tag_command(args.remove_tag, yes=args.yes)
        config = build_config(args, argv)
    except UserError as e:
        print(f"loop: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill stops like Ctrl-C
    view = make_view(config.tag)
    report = shlex.join(["python", os.path.relpath(REPO_ROOT / "agent" / "report.py", Path.cwd()), "--tag", config.tag])
    with view:
        try:
            loop = Loop(config, view).open()
            loop.run()
        except UserError as e:
            view.note(f"loop: {e}")
            return 2
        except LoopStop as e:
            view.note(f"loop stopped: {e} Ledger: {config.ledger_path}; the report: {report}; "
                      f"resume: {config.resume_command}")
            return 0
        except KeyboardInterrupt:
            view.note(f"loop interrupted: what finished is in {config.ledger_path} and the branch is back on the "
                      f"best commit; the report: {report}; run the same command (--tag {config.tag}) to resume: "
                      f"{config.resume_command}")
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
