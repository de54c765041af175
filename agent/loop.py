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
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import ValidationError  # noqa: E402

from agent.backlog import BacklogItem, backlog_from_flags, load_backlog  # noqa: E402
from agent.branch import ExperimentBranch, remove_tag, require_clean, tag_footprint  # noqa: E402
from agent.config import DEMO_BACKLOG, DEMO_BUDGET, DEMO_EXPERIMENTS, DEMO_TAG, LoopConfig, default_tag  # noqa: E402
from agent.fair_run import FairRuns, TrainRun, measured, stop_if_untrusted  # noqa: E402
from agent.guard import Guard, gap_noise, val_test_problem  # noqa: E402
from agent.judge import JUDGES, LOOP_CONFIRM_MARGIN, LOOP_K, Verdict  # noqa: E402
from agent.ledger import Ledger, is_baseline_run  # noqa: E402
from agent.limits import BacklogExhausted, Limits  # noqa: E402
from agent.lock import TagBusy, TagLock, busy_tags  # noqa: E402
from agent.noise_runs import NoiseRuns  # noqa: E402
from agent.proposer import BacklogProposer, Proposal, Proposer, ProposerState, Skip, usage_columns  # noqa: E402
from agent.runner import default_timeout, kill_stale, training_env  # noqa: E402
from agent.state import TagState, replay  # noqa: E402
from agent.stops import LoopStop, UserError  # noqa: E402
from agent.view import View, make_view  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


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


@dataclass(frozen=True)
class Candidate:
    """An experiment's commit while it runs: what it tries, where its runs go, and the best it must beat."""

    proposal: Proposal
    sha: str  # its commit on the branch; each repair amends it
    number: int  # its row's number, the prefix of its runs' directories and refs
    name: str  # its latest run's directory under runs/<tag>, and the ref that keeps its commit
    parent: str  # the best commit it started from
    best: tuple[float, ...]  # the best's val_bpb per seed, which its runs are paired with
    columns: dict[str, object]  # the row's columns known before it ran
    attempts: int = 0  # repair conversations its proposer had
    reruns: int = 0  # runs of what those repairs produced

    @property
    def repaired(self) -> str:
        """What a failure's reason adds when repairs ran."""
        return f" (still failing after {self.reruns} repaired run{'s' if self.reruns != 1 else ''})" if self.reruns else ""


class Loop:
    """Wires the backlog, proposer, branch, fair runs, judge and ledger; one experiment per iteration."""

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
        self.contended: set[str] = set()  # recorded contended in this invocation: they run again on resume, not now
        self.in_flight: set[str] = set()  # items claimed and not yet recorded (more than one with slots)
        self.slot_env: dict[str, str] = {}  # the one slot's CUDA_VISIBLE_DEVICES when --gpus names a GPU
        self.state = TagState()  # the tag's rows replayed; run() reads them, and every recorded row advances it

    def open(self) -> Loop:
        """Check the checkout, read the backlog and the prepared data, take the tag's lock, repair the ledger,
        open the experiment branch, the guard and the fair runs; every refusal is a UserError that says what to do."""
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
        self.data = prepared_data(config.python, config.repo_root, prepare_env(config), prepare_if_missing=config.demo)
        self.time_budget = config.time_budget or self.data.time_budget
        self.timeout = config.timeout or default_timeout(self.time_budget, config.startup_allowance)
        check_comparable(config, self.rows(), self.data.fingerprint, self.time_budget)
        self.lock = TagLock(config.runs_dir, config.tag).acquire()  # before anything of the tag's is touched
        repaired = self.ledger.repair()
        if repaired:
            view.note(repaired)
        self.branch = ExperimentBranch.open(config.repo_root, config.tag)
        self.guard = Guard(config.repo_root, self.branch.path, self.data.files, python=config.python,
                           env=dict(training_env(preset=config.preset, time_budget=self.time_budget, seed=config.seed,
                                                 run_dir=config.runs_dir, cache=config.cache), **self.slot_env),
                           preset=config.preset)
        pid_file = config.runs_dir / "train.pid"
        if kill_stale(pid_file):  # safe: this loop holds the tag's lock, so no live loop owns that run
            view.note("killed a training run that a previous, killed loop left behind")
        self.fair_runs = FairRuns(config, view, self.branch, self.guard, time_budget=self.time_budget,
                                  timeout=self.timeout, pid_file=pid_file, env=self.slot_env)
        self.noise_runs = NoiseRuns(config, view, self.branch, self.guard, self.fair_runs, timeout=self.timeout,
                                    record=self.record)
        return self

    # -- the tag's state: its ledger rows, replayed ---------------------------------------------

    def rows(self) -> list[dict[str, str]]:
        read = self.ledger.read()
        for problem in read.problems:
            self.view.note(problem)
        return [row for row in read.rows if row["tag"] == self.config.tag]

    @property
    def best_commit(self) -> str:
        """The best commit's full sha, for git."""
        return self.branch.repo.git.rev_parse(self.state.best_commit)

    def record(self, row: dict[str, object]) -> TagState:
        """Append the row to the ledger; the tag's rows replayed with it."""
        row.setdefault("tag", self.config.tag)
        row.setdefault("preset", self.config.preset)
        row.setdefault("data_fingerprint", self.data.fingerprint)
        row.setdefault("time_budget", self.time_budget)
        row.setdefault("sigma", self.state.floor.sigma)
        repaired = self.ledger.append(row)
        if repaired:
            self.view.note(repaired)
        rows = self.rows()
        self.state = replay(rows, start=self.state.start)
        self.view.finished(row, rows)
        return self.state

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """The tag's baselines and null twins, then one experiment a step until a limit or the backlog stops it."""
        self.state = replay(self.rows(), start=self.branch.head()[:7])
        self.branch.reset(self.best_commit)
        try:
            self.fair_runs.open()
            self.noise_runs.measure(self.state)
            self.view.best(self.state.best_val, self.state.floor.describe())
            while True:
                self.limits.check(self.experiments_run, self.crashes_in_a_row, self.refusals_in_a_row,
                                  self.contended_in_a_row)
                self.step()
        except KeyboardInterrupt:
            self.branch.reset(self.best_commit)
            raise
        finally:
            self.fair_runs.close()
            self.view.note(self.guard.costs.describe())

    # -- one experiment: propose -> commit -> run (with repair) -> judge (with confirmation) -> verify -> record

    def next_item(self) -> BacklogItem | None:
        for item in self.items:
            if item.id not in self.state.done | self.contended | self.left_for_llm | self.in_flight:
                return item
        return None

    def step(self) -> None:
        """Propose, and run what was proposed; raises BacklogExhausted when nothing is left."""
        claimed = self.claim()
        if claimed is not None:
            self.count_refusal(claimed[1], self.experiment(*claimed))

    def count_refusal(self, proposer: Proposer, ran: bool) -> None:
        if proposer is not self.backlog_proposer:
            self.refusals_in_a_row = 0 if ran else self.refusals_in_a_row + 1

    def claim(self) -> tuple[Proposal, Proposer, ProposerState] | None:
        """The next proposal on the best as it stands, with its proposer and what it was proposed from; None when
        nothing runs this time (an item left for an LLM, a proposal recorded invalid before it ran)."""
        item = self.next_item()
        proposer: Proposer = self.backlog_proposer if item is not None and item.edits else self.proposer
        if item is None and isinstance(self.proposer, BacklogProposer):
            raise BacklogExhausted("the backlog is exhausted: every item with a machine-readable edit has run"
                                   + (f"; {len(self.left_for_llm)} prose items need --proposer claude" if self.left_for_llm else "") + ".")
        best = self.best_commit
        state = ProposerState(tag=self.config.tag, best_commit=best, best_val_bpb=self.state.best_val,
                              sigma=self.state.floor.sigma, ledger_rows=self.rows(), item=item,
                              train_py=self.branch.read("train.py", best))
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
                             reason=result.reason, parent=best[:7], **usage_columns(result)))
            self.count_refusal(proposer, False)
            return None
        return result, proposer, state

    def experiment(self, proposal: Proposal, proposer: Proposer, state: ProposerState) -> bool:
        """Commit, run (with repair), judge (with confirmation), verify and record a proposal; whether it ran."""
        candidate = self.commit(proposal, state)
        if candidate is None:
            return False
        self.run_candidate(candidate, proposer, state)
        return True

    def run_candidate(self, candidate: Candidate, proposer: Proposer, state: ProposerState) -> None:
        """Run (with repair), judge (with confirmation), verify and record a committed proposal."""
        candidate, first = self.run_with_repair(candidate, proposer, state)
        runs, row = self.judged(candidate, first)
        if row["status"] == "keep":
            row = self.verify(candidate, runs[0], row)
        self.finish(candidate, dict(row, **measured(runs)))

    def commit(self, proposal: Proposal, state: ProposerState) -> Candidate | None:
        """The proposal as a commit on the best; None when it is refused before it runs (recorded invalid)."""
        parent, number = self.best_commit, self.candidate_number()
        columns = dict(experiment=proposal.experiment, description=proposal.description, parent=parent[:7],
                       seed=self.config.seed, **usage_columns(proposal))
        problem = syntax_problem(proposal.train_py)
        if problem or proposal.train_py == state.train_py:
            self.record(dict(columns, commit="", status="invalid", reason=problem or "the proposal leaves train.py unchanged"))
            return None
        sha = self.new_commit(f"{proposal.experiment}: {proposal.description}", proposal.train_py, parent)
        candidate = Candidate(proposal, sha, number, f"{number:03d}-{proposal.experiment}", parent,
                              self.state.best_values, columns)
        refused = self.guard.check_scope(self.branch.changed_paths(parent, sha)) or self.guard.check_source(proposal.train_py)
        if refused:
            self.finish(candidate, dict(columns, commit=sha[:7], status="invalid", reason=f"not run: {refused}"))
            return None
        self.experiments_run += 1
        return candidate

    def run_with_repair(self, c: Candidate, proposer: Proposer, state: ProposerState) -> tuple[Candidate, TrainRun]:
        """The first run, and while it crashes, the proposer's repairs of its own edit (amending the commit)."""
        run = self.train(c, c.name, c.proposal.description, self.config.seed)
        while run.outcome.status == "crash" and not run.contended and c.attempts < self.config.repair_attempts:
            fixed = proposer.repair(state, c.proposal, run.outcome.tail, c.attempts + 1)
            if fixed is None:  # this proposer cannot repair
                break
            c = replace(c, attempts=c.attempts + 1)
            if not isinstance(fixed, Proposal) or syntax_problem(fixed.train_py) or self.guard.check_source(fixed.train_py):
                break
            self.branch.keep_ref(c.sha, f"{c.name}-attempt{c.attempts}")
            sha = self.amend_commit(f"{fixed.experiment}: {fixed.description}", fixed.train_py, c.parent)
            c = replace(c, proposal=fixed, sha=sha, name=f"{c.number:03d}-{fixed.experiment}-repair{c.attempts}",
                        reruns=c.reruns + 1)
            run = self.train(c, c.name, fixed.description, self.config.seed)
        return c, run

    def judged(self, c: Candidate, first: TrainRun) -> tuple[list[TrainRun], dict[str, object]]:
        """The runs and the row: a run the guard refused, that shared its machine or that failed is not judged."""
        added, removed = self.branch.line_changes(c.parent, c.sha)
        row = dict(c.columns, commit=c.sha[:7], description=c.proposal.description, lines_added=added,
                   lines_removed=removed, attempts=c.attempts)
        if first.problem:
            return [first], dict(row, status="invalid", reason=first.problem)
        if first.contended:
            return [first], dict(row, status="contended", reason=self.fair_runs.contended_reason(first))
        if first.outcome.status != "ok":
            return [first], dict(row, status=first.outcome.status, reason=first.outcome.reason + c.repaired)
        runs, status, reason, verdict = self.confirmed(c, first, added, removed)
        return runs, dict(row, status=status, reason=reason, delta=verdict.delta, threshold=verdict.threshold,
                          sigma=verdict.sigma if verdict.sigma is not None else self.state.floor.sigma)

    def confirmed(self, c: Candidate, first: TrainRun, added: int, removed: int) -> tuple[list[TrainRun], str, str, Verdict]:
        """Judge the first run; while the judge asks to confirm, run again on the next baseline's seed, so
        each run is paired with the best's run on the same seed. The runs, the status, why, and the last verdict."""
        runs = [first]
        verdict = self.judge(runs, self.against(c), added, removed)
        while verdict.status == "confirm":
            if len(runs) >= self.config.max_runs:
                return runs, "discard", f"{verdict.reason}; still undecided after {len(runs)} runs (--max-runs)", verdict
            seed = self.config.seed + len(runs)
            again = self.train(c, f"{c.name}-run{len(runs) + 1}", f"confirming {c.proposal.description} (seed {seed})", seed)
            if again.problem:
                return runs + [again], "invalid", f"confirming run: {again.problem}", verdict
            if again.contended:
                return runs + [again], "contended", f"confirming run: {self.fair_runs.contended_reason(again)}", verdict
            if again.outcome.status != "ok":
                return runs, "discard", f"the confirming run (seed {seed}) failed: {again.outcome.reason}", verdict
            runs.append(again)
            verdict = self.judge(runs, self.against(c), added, removed)
        return runs, verdict.status, verdict.reason, verdict

    # -- where a candidate lives: one worktree on the branch here; agent/slots.py's ParallelLoop overrides these

    def candidate_number(self) -> int:
        """The next row's number: it prefixes the candidate's run directories and refs."""
        return self.state.row_count + 1

    def new_commit(self, message: str, train_py: str, parent: str) -> str:
        """The candidate's commit on `parent` (the best, where the branch stands); its sha."""
        return self.branch.commit(message, {"train.py": train_py})

    def amend_commit(self, message: str, train_py: str, parent: str) -> str:
        """The candidate's commit rewritten by a crash repair; its new sha."""
        return self.branch.amend(message, {"train.py": train_py})

    def train(self, c: Candidate, name: str, description: str, seed: int) -> TrainRun:
        """A fair run of the candidate's commit (the worktree's HEAD here)."""
        return self.fair_runs.train(name, description, seed, self.state.reference)

    def checkout_for_verify(self, c: Candidate) -> Guard:
        """The guard whose worktree holds the candidate's train.py, for its re-evaluation: the branch's here."""
        return self.guard

    def against(self, c: Candidate) -> tuple[float, ...]:
        """The best's per-seed values a candidate is judged against: here, the best it started from."""
        return c.best

    def judge(self, runs: list[TrainRun], best: tuple[float, ...], added: int, removed: int, *,
              bar_alone: bool = False) -> Verdict:
        """The configured judge on the runs; `bar_alone`: no confirmation margin, the bar decides on these runs."""
        c = self.config
        return JUDGES[c.judge]([r.outcome.summary.val_bpb for r in runs], best, self.state.floor, k=c.k,
                               min_delta=c.min_delta or 0.0, lines_added=added, lines_removed=removed,
                               confirm_margin=0.0 if bar_alone else c.confirm_margin,
                               max_runs=len(runs) if bar_alone else c.max_runs)

    def verify(self, c: Candidate, first: TrainRun, row: dict[str, object]) -> dict[str, object]:
        """A would-be keep, re-scored by the fixed code from its first run's checkpoint (its seed is the one every
        best has a test score on) and held to the val-vs-test rule: the gain on val must show on test."""
        problem, verified = self.checkout_for_verify(c).verify(first.outcome.log_path.parent, first.outcome.summary.val_bpb)
        best_test = self.state.best_test  # None for a tag begun before test scores existed: nothing to compare with
        if not problem and best_test is not None:
            noise = gap_noise([(float(r["val_bpb"]), float(r["test_bpb"])) for r in self.state.baselines if r["test_bpb"]])
            problem = val_test_problem((self.against(c)[0], best_test), (verified["val_bpb"], verified["test_bpb"]), noise,
                                       self.config.k)
        row = dict(row, test_bpb=verified.get("test_bpb"))
        if problem:
            row.update(status="invalid", reason=f"{problem} (the judge would have kept it: {row['reason']})")
        return row

    def leave(self, c: Candidate) -> None:
        """A candidate that is not kept: the branch goes back to where it started."""
        self.branch.reset(c.parent)

    def finish(self, c: Candidate, row: dict[str, object]) -> None:
        """Keep the commit under a ref, record the row, then advance the best or go back to it."""
        status = row["status"]
        self.crashes_in_a_row = self.crashes_in_a_row + 1 if status == "crash" else 0
        self.contended_in_a_row = self.contended_in_a_row + 1 if status == "contended" else 0
        self.branch.keep_ref(c.sha, c.name)
        self.record(row)
        if status == "contended":
            self.contended.add(str(row["experiment"]))
        if status == "keep":
            self.view.best(self.state.best_val, self.state.floor.describe())
        else:
            self.leave(c)
            for checkpoint in self.config.runs_dir.glob(f"{c.number:03d}-*/checkpoint.pt"):
                checkpoint.unlink()
        stop_if_untrusted(self.guard)


def prepare_env(config: LoopConfig) -> dict[str, str]:
    """The environment prepare.py is asked in: the user's, with the loop's own AUTORESEARCH_* settings only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_PRESET=config.preset)
    if config.cache:
        env["AUTORESEARCH_CACHE"] = str(config.cache)
    if config.time_budget:
        env["AUTORESEARCH_TIME_BUDGET"] = str(config.time_budget)
    return env


def check_comparable(config: LoopConfig, rows: list[dict[str, str]], fingerprint: str, time_budget: float) -> None:
    """A tag's runs share one preset, data fingerprint and budget, or they could not be compared."""
    first = next((r for r in rows if is_baseline_run(r)), None)
    if first is None:
        return
    then = (first["preset"], first["data_fingerprint"], float(first["time_budget"] or time_budget))
    now = (config.preset, fingerprint, time_budget)
    if then != now:
        flags = f"--preset {then[0]} --time-budget {then[2]:g}"
        resume = f"resume it with {flags} (a demo tag: --demo)" if then[1] == now[1] else "point AUTORESEARCH_CACHE at the data it ran on"
        raise UserError(f"tag {config.tag} was run with preset {then[0]} on data {then[1]} for "
                        f"{then[2]:g} s, not {now[0]} on {now[1]} for {now[2]:g} s; {resume}, or start a new "
                        f"--tag so runs are never compared across presets, data or budgets.")


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
    p.add_argument("--gpus", metavar="0,1,...", help="slots: one training process per GPU, several experiments at once "
                   "(default: every visible GPU with the gpu preset; one slot on a machine without one)")
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


def make_loop(config: LoopConfig, view: View, gpus: str | None) -> Loop:
    """One slot: this module's Loop (on its GPU when --gpus names one); more: agent/slots.py's ParallelLoop."""
    from agent.slots import CPU_SLOT, ParallelLoop, parse_gpus

    slots = parse_gpus(gpus, lambda: _visible_gpus(config.python) if config.preset == "gpu" else 0)
    if len(slots) > 1:
        return ParallelLoop(config, view, slots=slots)
    loop = Loop(config, view)
    loop.slot_env = {} if slots[0] == CPU_SLOT else {"CUDA_VISIBLE_DEVICES": slots[0]}
    return loop


def _visible_gpus(python: str) -> int:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True, text=True)
    return int(probe.stdout.strip()) if probe.stdout.strip().isdigit() else 0


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
            loop = make_loop(config, view, args.gpus).open()
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
