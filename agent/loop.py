"""
The overnight loop: backlog -> edit -> commit -> run -> judge -> record, unattended and resumable.

    python agent/loop.py --demo                 # offline: cpu preset, builtin data, backlog proposer
    python agent/loop.py --tag nov28            # overnight with the preset of this machine
    python agent/loop.py --tag nov28 --proposer claude --max-cost 5
    python agent/loop.py --tag nov28 --backlog-issue karpathy/autoresearch#7   # the backlog kept in a GitHub issue

Every experiment is one commit on autoresearch/<tag> (in worktrees/<tag>), one run of train.py
(log under runs/<tag>/), one verdict and one row of experiments.tsv. The same command with the
same tag resumes: the baseline is not re-run, an interrupted experiment is, nothing is recorded twice.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import ValidationError  # noqa: E402

from agent.backlog import BacklogItem, load_backlog  # noqa: E402
from agent.branch import ExperimentBranch, require_clean  # noqa: E402
from agent.config import DEMO_BUDGET, DEMO_EXPERIMENTS, LoopConfig, default_tag  # noqa: E402
from agent.github_backlog import fetch_issue_backlog  # noqa: E402
from agent.guard import Guard, gap_noise, val_test_problem  # noqa: E402
from agent.judge import JUDGES, NoiseFloor, noise_floor  # noqa: E402
from agent.ledger import Ledger  # noqa: E402
from agent.limits import BacklogExhausted, Limits  # noqa: E402
from agent.proposer import BacklogProposer, Proposal, Proposer, ProposerState, Skip  # noqa: E402
from agent.runner import RunOutcome, default_timeout, kill_stale, run_training, training_env  # noqa: E402
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


class Loop:
    """Wires the backlog, proposer, branch, runner, judge and ledger; one experiment per iteration."""

    def __init__(self, config: LoopConfig, view: View, proposer: Proposer | None = None) -> None:
        self.config = config
        self.view = view
        require_clean(config.repo_root)
        self.items = load_backlog(config.backlog)
        self.ledger = Ledger(config.ledger_path)
        repaired = self.ledger.repair()
        if repaired:
            view.note(repaired)
        self.proposer = proposer or make_proposer(config)
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
        self.branch = ExperimentBranch.open(config.repo_root, config.tag)
        self.guard = Guard(config.repo_root, self.branch.path, self.data.files, python=config.python,
                           env=training_env(preset=config.preset, time_budget=self.time_budget, seed=config.seed,
                                            run_dir=config.runs_dir, cache=config.cache),
                           preset=config.preset)
        self.pid_file = config.runs_dir / "train.pid"
        if kill_stale(self.pid_file):
            view.note("killed a training run that a previous, killed loop left behind")
        self.limits = Limits(config.max_experiments, config.max_hours, config.max_crashes)
        self.experiments_run = 0
        self.crashes_in_a_row = 0   # in this invocation: a resumed tag gets a fresh allowance
        self.refusals_in_a_row = 0  # LLM proposals in a row that could not be run
        self.left_for_llm: set[str] = set()

    # -- state, derived from the ledger and git ----------------------------------------------

    def rows(self) -> list[dict[str, str]]:
        read = self.ledger.read()
        for problem in read.problems:
            self.view.note(problem)
        return [row for row in read.rows if row["tag"] == self.config.tag]

    def check_comparable(self, rows: list[dict[str, str]]) -> None:
        """A tag's runs share one preset, data fingerprint and budget, or they could not be compared."""
        first = next((r for r in rows if r["experiment"] == "baseline" and r["status"] == "keep"), None)
        if first is None:
            return
        then = (first["preset"], first["data_fingerprint"], float(first["time_budget"] or self.time_budget))
        now = (self.config.preset, self.data.fingerprint, self.time_budget)
        if then != now:
            raise UserError(f"tag {self.config.tag} was run with preset {then[0]} on data {then[1]} for "
                            f"{then[2]:g} s, not {now[0]} on {now[1]} for {now[2]:g} s; start a new --tag so runs "
                            f"are never compared across presets, data or budgets.")

    def _full_sha(self, short: str) -> str:
        return self.branch.repo.git.rev_parse(short)

    def derive(self, rows: list[dict[str, str]]) -> None:
        """Best commit, its value, the noise floor and what is done, from this tag's rows."""
        self.baselines = [r for r in rows if r["experiment"] == "baseline" and r["status"] == "keep"]
        if self.baselines:
            self.base_commit = self._full_sha(self.baselines[0]["commit"])
        else:
            self.base_commit = self.branch.head() if not rows else self._full_sha(rows[0]["parent"] or rows[0]["commit"])
        self.best_commit, self.best_val = self.base_commit, float(self.baselines[0]["val_bpb"]) if self.baselines else None
        for row in rows:
            if row["status"] == "keep" and row["experiment"] != "baseline":
                self.best_commit, self.best_val = self._full_sha(row["commit"]), float(row["val_bpb"])
        self.floor: NoiseFloor = noise_floor([float(r["val_bpb"]) for r in self.baselines])
        self.done = {r["experiment"] for r in rows if r["experiment"] != "baseline"}

    # -- one run of train.py -----------------------------------------------------------------

    def train(self, name: str, description: str, seed: int) -> tuple[RunOutcome, str | None]:
        """One run of train.py in the worktree; the outcome and what the guard found wrong, if anything."""
        run_dir = self.config.runs_dir / name
        env = training_env(preset=self.config.preset, time_budget=self.time_budget, seed=seed, run_dir=run_dir,
                           cache=self.config.cache)
        if self.guard.check_files():
            self.branch.reset(self.branch.head())
            self.stop_if_untrusted()
        self.view.started(name, description)
        outcome = run_training(self.branch.path, env, run_dir / "train.log", self.timeout,
                               on_progress=self.view.progress, command=(self.config.python, "train.py"),
                               pid_file=self.pid_file)
        problem = self.guard.check_files()
        if problem:
            self.branch.reset(self.branch.head())  # puts the worktree's prepare.py back
        elif outcome.status == "ok":
            problem = self.guard.check_time(outcome, self.time_budget)
        return outcome, problem

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
    def measured(outcome: RunOutcome) -> dict[str, object]:
        s = outcome.summary
        if s is None:
            return {"wall_seconds": round(outcome.wall_seconds, 1)}
        return {"val_bpb": s.val_bpb, "val_loss": s.number("val_loss"), "memory_gb": s.number("peak_memory_mb") / 1024,
                "training_seconds": s.get("training_seconds"), "num_steps": s.get("num_steps"),
                "val_accuracy": s.get("val_accuracy"), "val_perplexity": s.get("val_perplexity"),
                "wall_seconds": round(outcome.wall_seconds, 1)}

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        rows = self.rows()
        self.derive(rows)
        self.branch.reset(self.best_commit)
        try:
            self.run_baselines()
            self.view.best(self.best_val, self.floor.describe())
            while True:
                self.limits.check(self.experiments_run, self.crashes_in_a_row, self.refusals_in_a_row)
                self.step()
        except KeyboardInterrupt:
            self.branch.reset(self.best_commit)
            raise
        finally:
            self.view.note(self.guard.costs.describe())

    def run_baselines(self) -> None:
        while len(self.baselines) < self.config.baseline_repeats and not self.done:
            index = len(self.baselines)
            seed = self.config.seed + index
            name = f"{len(self.rows()) + 1:03d}-baseline"
            outcome, problem = self.train(name, f"baseline {index + 1}/{self.config.baseline_repeats} (seed {seed})", seed)
            row = dict(commit=self.base_commit[:7], experiment="baseline", seed=seed, parent=self.base_commit[:7],
                       description=f"baseline {index + 1}/{self.config.baseline_repeats}", **self.measured(outcome))
            if outcome.status == "ok" and not problem:  # every baseline: their test_bpb give the val-test noise
                problem, verified = self.guard.verify(self.config.runs_dir / name, outcome.summary.val_bpb)
                row["test_bpb"] = verified.get("test_bpb")
            if outcome.status != "ok" or problem:
                self.record(dict(row, status="invalid" if problem else outcome.status, reason=problem or outcome.reason))
                self.stop_if_untrusted()
                raise UserError(f"the baseline run failed ({problem or outcome.reason}); read {outcome.log_path}, "
                                f"fix train.py on your branch and commit it, then start the loop again.")
            self.record(dict(row, status="keep", reason=f"baseline run {index + 1} (seed {seed})"))
            self.derive(self.rows())

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
                             reason=result.reason, parent=self.best_commit[:7], **usage_columns(proposer)))
            self.done.add(result.experiment)
            ran = False
        else:
            ran = self.experiment(result, proposer, state)
        if proposer is not self.backlog_proposer:
            self.refusals_in_a_row = 0 if ran else self.refusals_in_a_row + 1

    def experiment(self, proposal: Proposal, proposer: Proposer, state: ProposerState) -> bool:
        """Commit, run, judge and record a proposal; whether it was run at all."""
        parent, best = self.best_commit, self.best_val
        n = len(self.rows()) + 1
        name = f"{n:03d}-{proposal.experiment}"
        base = dict(experiment=proposal.experiment, description=proposal.description, parent=parent[:7],
                    seed=self.config.seed, **usage_columns(proposer))
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
        outcome, problem = self.train(name, proposal.description, self.config.seed)
        attempts = reruns = 0  # repair conversations, and the runs of what they repaired
        while outcome.status == "crash" and attempts < self.config.repair_attempts and hasattr(proposer, "repair"):
            attempts += 1
            fixed = proposer.repair(state, proposal, outcome.tail, attempts)
            if not isinstance(fixed, Proposal) or syntax_problem(fixed.train_py) or self.guard.check_source(fixed.train_py):
                break
            self.branch.keep_ref(sha, f"{name}-attempt{attempts}")
            proposal = fixed
            sha = self.branch.amend(f"{proposal.experiment}: {proposal.description}", {"train.py": proposal.train_py})
            name = f"{n:03d}-{proposal.experiment}-repair{attempts}"
            reruns += 1
            outcome, problem = self.train(name, proposal.description, self.config.seed)
        added, removed = self.branch.line_changes(parent, sha)
        row = dict(base, commit=sha[:7], description=proposal.description, lines_added=added, lines_removed=removed,
                   attempts=attempts, **self.measured(outcome))
        repaired = f" (still failing after {reruns} repaired run{'s' if reruns != 1 else ''})" if reruns else ""
        if problem:
            status, reason = "invalid", problem
        elif outcome.status != "ok":
            status, reason = outcome.status, outcome.reason + repaired
        else:
            values = [outcome.summary.val_bpb]
            verdict = self.judge(values, best, added, removed)
            status, reason = verdict.status, verdict.reason
            if status == "confirm":
                again, problem = self.train(f"{name}-confirm", f"confirming {proposal.description}", self.config.seed)
                if problem:
                    status, reason = "invalid", f"confirming re-run: {problem}"
                elif again.status != "ok":
                    status, reason = "discard", f"the confirming re-run failed: {again.reason}"
                else:
                    outcome = again
                    values.append(again.summary.val_bpb)
                    verdict = self.judge(values, best, added, removed)
                    status, reason = verdict.status, verdict.reason
                    row.update(val_bpb=statistics.fmean(values))
            row["delta"] = statistics.fmean(values) - best
            if status == "keep":
                problem, verified = self.guard.verify(outcome.log_path.parent, outcome.summary.val_bpb)
                row["test_bpb"] = verified.get("test_bpb")
                problem = problem or self.val_test_check(verified)
                if problem:
                    status, reason = "invalid", f"{problem} (the judge would have kept it: {reason})"
        self.finish(name, sha, parent, dict(row, status=status, reason=reason))
        return True

    def val_test_check(self, verified: dict) -> str | None:
        """The val-vs-test rule for a verified would-be keep, against the best it would replace."""
        keeps = [r for r in self.rows() if r["status"] == "keep" and r["experiment"] != "baseline"]
        best = keeps[-1] if keeps else self.baselines[0]  # the baseline run with the candidates' seed
        noise = gap_noise([(float(r["val_bpb"]), float(r["test_bpb"])) for r in self.baselines])
        return val_test_problem((float(best["val_bpb"]), float(best["test_bpb"])),
                                (verified["val_bpb"], verified["test_bpb"]), noise, self.config.k)

    def finish(self, name: str, sha: str, parent: str, row: dict[str, object]) -> None:
        """Keep the commit under a ref, record the row, then advance the best or go back to it."""
        self.crashes_in_a_row = self.crashes_in_a_row + 1 if row["status"] == "crash" else 0
        self.branch.keep_ref(sha, name)
        self.record(row)
        self.done.add(str(row["experiment"]))
        if row["status"] == "keep":
            self.best_commit, self.best_val = sha, float(row["val_bpb"])
            self.view.best(self.best_val, self.floor.describe())
        else:
            self.branch.reset(parent)
            for checkpoint in (self.config.runs_dir).glob(f"{name.split('-')[0]}-*/checkpoint.pt"):
                checkpoint.unlink()
        self.stop_if_untrusted()

    def judge(self, values: list[float], best: float, added: int, removed: int):
        c = self.config
        return JUDGES[c.judge](values, best, self.floor, k=c.k, min_delta=c.min_delta or 0.0,
                               lines_added=added, lines_removed=removed, confirm_margin=c.confirm_margin)


def syntax_problem(source: str) -> str | None:
    try:
        ast.parse(source)
    except SyntaxError as e:
        return f"the proposed train.py does not parse: line {e.lineno}: {e.msg}"
    return None


def usage_columns(proposer: object) -> dict[str, object]:
    usage = getattr(proposer, "last_usage", None) or {}
    return {key: usage.get(key) for key in ("input_tokens", "cached_tokens", "output_tokens", "cost_usd")}


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
    p.add_argument("--tag", help="names the branch autoresearch/<tag> (default: today, e.g. nov28)")
    p.add_argument("--proposer", choices=["backlog", "claude", "auto"], default="auto",
                   help="auto: claude when ANTHROPIC_API_KEY is set, else backlog")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--backlog", type=Path, default=REPO_ROOT / "agent" / "backlog.md",
                        help="the backlog file (default: agent/backlog.md)")
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
    p.add_argument("--baseline-repeats", type=int, default=2, help="baseline runs, different seeds: the noise floor")
    p.add_argument("--judge", choices=["noise", "greedy"], default="noise")
    p.add_argument("--k", type=float, default=2.0, help="sigmas a candidate must beat the best by")
    p.add_argument("--min-delta", type=float, help="smallest improvement worth keeping (needed with --baseline-repeats 1)")
    p.add_argument("--confirm-margin", type=float, default=0.5,
                   help="re-run every would-be keep and near misses within this fraction of the threshold (0: never)")
    p.add_argument("--max-crashes", type=int, default=3, help="stop after this many crashes in a row")
    p.add_argument("--repair-attempts", type=int, default=2, help="crash repairs an LLM proposer may try")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, help="seconds before a run is killed (default 2.5 x budget + startup)")
    p.add_argument("--model", help="Claude model (default: AUTORESEARCH_MODEL or the proposer's default)")
    p.add_argument("--max-cost", type=float, help="USD the Claude proposer may spend in this run")
    p.add_argument("--prices", type=Path, help="JSON of per-model prices in USD per million tokens")
    p.add_argument("--demo", action="store_true", help="offline demo: cpu preset, builtin data, backlog proposer, short runs")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> LoopConfig:
    backlog = args.backlog
    if args.backlog_issue:
        fetched = fetch_issue_backlog(args.backlog_issue, api_url=args.github_api_url)
        if fetched.note:
            print(f"loop: {fetched.note}", file=sys.stderr)
        backlog = fetched.path
    preset = args.preset
    if preset is None:
        preset = "cpu" if args.demo else os.environ.get("AUTORESEARCH_PRESET") or _detect_preset()
    cache = os.environ.get("AUTORESEARCH_CACHE")
    try:
        return LoopConfig(
            repo_root=REPO_ROOT, tag=args.tag or (default_tag() + ("-demo" if args.demo else "")),
            proposer="backlog" if args.demo else args.proposer, backlog=backlog,
            max_experiments=args.max_experiments if args.max_experiments is not None else (DEMO_EXPERIMENTS if args.demo else None),
            max_hours=args.max_hours, preset=preset,
            time_budget=args.time_budget or (DEMO_BUDGET if args.demo else None),
            baseline_repeats=args.baseline_repeats, judge=args.judge, k=args.k, min_delta=args.min_delta,
            confirm_margin=args.confirm_margin, max_crashes=args.max_crashes, repair_attempts=args.repair_attempts,
            seed=args.seed, cache=Path(cache) if cache else None, timeout=args.timeout, demo=args.demo,
            model=args.model or os.environ.get("AUTORESEARCH_MODEL"), max_cost=args.max_cost,
            prices=args.prices, python=sys.executable)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}; see python agent/loop.py --help.") from None


def _detect_preset() -> str:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return "gpu" if probe.stdout.strip() == "True" else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except UserError as e:
        print(f"loop: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill stops like Ctrl-C
    view = make_view(config.tag)
    with view:
        try:
            loop = Loop(config, view)
            loop.run()
        except UserError as e:
            view.note(f"loop: {e}")
            return 2
        except LoopStop as e:
            view.note(f"loop stopped: {e} Ledger: {config.ledger_path}; resume with --tag {config.tag}; "
                      f"the report: python agent/report.py --tag {config.tag}.")
            return 0
        except KeyboardInterrupt:
            view.note(f"loop interrupted: what finished is in {config.ledger_path}; the branch is back on the best "
                      f"commit; run the same command (--tag {config.tag}) to resume.")
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
