"""Slots: one training process per GPU, several experiments at once, one driver that judges them all.

    python agent/loop.py --tag dec02 --gpus 0,1,2,3

A slot is one device (`CUDA_VISIBLE_DEVICES=<name>`) with its own detached worktree
(`worktrees/<tag>.slot-<name>`), probe and pid file; exactly one train.py runs on it at a time. The
loop process is the driver and the only writer of git, experiments.tsv and the best: it claims a
proposal on the best as it stands, commits it (with git plumbing, so no shared worktree moves), and
hands the run to a free slot. Everything but training happens under the driver's lock, so the
single-slot `Loop`'s steps run unchanged, one experiment at a time between runs.

Judging with a moving best: a result is judged against the best when it is judged. A candidate that
beats the commit it started from, but not a best that moved meanwhile, is a *stale win*: recorded
`stale`, its change merged onto the new best and run again before any new item. A would-be keep on one
run is confirmed on a different slot before the best moves. Baselines and null twins run on all slots
at once: N slots give N noise samples in one budget.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from agent.branch import _IDENTITY
from agent.fair_run import FairRuns, TrainRun
from agent.guard import Guard
from agent.ledger import TWIN
from agent.limits import BacklogExhausted
from agent.loop import Candidate, Loop
from agent.proposer import Proposal, Proposer, ProposerState
from agent.runner import kill_stale, training_env
from agent.stops import LoopStop, UserError

CPU_SLOT = "cpu"  # the one slot of a machine without a GPU: no CUDA_VISIBLE_DEVICES of its own


def parse_gpus(text: str | None, visible: Callable[[], int]) -> tuple[str, ...]:
    """--gpus 0,1,2,3 as slot names; without it every visible GPU, or one CPU slot on a machine with none."""
    if text is None:
        count = visible()
        return tuple(str(i) for i in range(count)) if count else (CPU_SLOT,)
    names = tuple(name.strip() for name in text.split(","))
    if not all(name.isdigit() for name in names):
        raise UserError(f"--gpus {text}: give GPU indices separated by commas, e.g. --gpus 0,1,2,3.")
    if len(set(names)) != len(names):
        raise UserError(f"--gpus {text} names a GPU twice; one training process per GPU, so name each once.")
    return names


def _git(cwd: Path, *args: str, input: str | None = None, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["git", *args], cwd=cwd, input=input, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def commit_on(repo: Path, parent: str, files: dict[str, str], message: str) -> str:
    """A commit of `files` on `parent`, written without a worktree (a private index); its sha."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(scratch) / "index"), **_IDENTITY)
        _git(repo, "read-tree", parent, env=env)
        for name, text in files.items():
            blob = _git(repo, "hash-object", "-w", "--stdin", input=text).stdout.strip()
            _git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", env=env)
        tree = _git(repo, "write-tree", env=env).stdout.strip()
        return _git(repo, "commit-tree", tree, "-p", parent, "-m", message, env=env).stdout.strip()


def merge_onto(repo: Path, parent: str, candidate: str, onto: str, path: str = "train.py") -> str | None:
    """The candidate's change to `path` (parent -> candidate) applied to `onto`'s, line by line; None when it
    touches a line that `onto` changed too. Unlike `git merge-file`, a change next to one of `onto`'s applies:
    two edits of neighbouring constants are the common case here, and they do not conflict."""
    def lines(commit: str) -> list[str]:
        return _git(repo, "show", f"{commit}:{path}").stdout.splitlines(keepends=True)

    base, theirs, ours = lines(parent), lines(candidate), lines(onto)
    kept = {}  # base line -> ours line, for every base line that `onto` left as it was
    for block in difflib.SequenceMatcher(None, base, ours, autojunk=False).get_matching_blocks():
        kept.update({block.a + k: block.b + k for k in range(block.size)})
    edits = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, theirs, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if i1 < i2:  # replaces or deletes base lines: each must be untouched in ours
            if any(i not in kept for i in range(i1, i2)) or kept[i2 - 1] - kept[i1] != i2 - 1 - i1:
                return None
            start, end = kept[i1], kept[i2 - 1] + 1
        else:  # an insertion before base line i1: anchored on an untouched neighbour
            if i1 in kept:
                start = end = kept[i1]
            elif i1 - 1 in kept:
                start = end = kept[i1 - 1] + 1
            elif i1 == 0:
                start = end = 0
            else:
                return None
        edits.append((start, end, theirs[j1:j2]))
    merged = list(ours)
    for start, end, replacement in sorted(edits, reverse=True):
        merged[start:end] = replacement
    return "".join(merged)


@dataclass
class Slot:
    """One device and its detached worktree; `fair_runs` runs train.py there, one run at a time."""

    name: str
    path: Path
    repo: Path
    fair_runs: FairRuns | None = None
    guard: Guard | None = None

    @property
    def env(self) -> dict[str, str]:
        return {} if self.name == CPU_SLOT else {"CUDA_VISIBLE_DEVICES": self.name}

    def head(self) -> str:
        return _git(self.path, "rev-parse", "HEAD").stdout.strip()

    def reset(self, sha: str) -> None:
        """The worktree at `sha`, detached, without what a run left behind."""
        _git(self.path, "checkout", "-q", "--detach", "--force", sha)
        _git(self.path, "clean", "-fdq")

    def open(self, at: str) -> Slot:
        """Create the worktree (or reuse it from an earlier loop on the tag) at `at`."""
        if not (self.path / ".git").exists():
            _git(self.repo, "worktree", "prune")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _git(self.repo, "worktree", "add", "-q", "--detach", str(self.path), at)
        self.reset(at)
        return self


class SlotPool:
    """Free slots, handed out one at a time; `take(avoid=...)` waits for one other than `avoid`."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.free = list(slots)
        self.ready = threading.Condition()
        self.closed = False  # the driver stopped: no new run starts

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()

    def take(self, avoid: Slot | None = None) -> Slot:
        with self.ready:
            while True:
                if self.closed:
                    raise KeyboardInterrupt  # the driver stopped: this thread records nothing
                for slot in self.free:
                    if slot is not avoid:
                        self.free.remove(slot)
                        return slot
                self.ready.wait()

    def give(self, slot: Slot) -> None:
        with self.ready:
            self.free.append(slot)
            self.ready.notify_all()


class ParallelLoop(Loop):
    """The loop with one training process per slot; `Loop`'s steps, run by one thread per experiment under
    the driver's lock, which a thread lets go of only while its train.py runs."""

    def __init__(self, config, view, proposer=None, *, slots: Sequence[str]) -> None:
        super().__init__(config, view, proposer)
        self.slot_names = tuple(slots)
        self.driver_lock = threading.Lock()
        self.requeued: list[tuple[Proposal, Proposer, ProposerState]] = []  # stale wins, merged on the new best
        self.last_slot: dict[int, Slot] = {}  # where each candidate's latest run was, so a confirmation runs elsewhere
        self.stopping = False
        self.numbered = 0  # the last candidate number handed out

    def open(self) -> ParallelLoop:
        super().open()
        c = self.config
        root = self.branch.path.parent
        self.slots = [Slot(name, root / f"{c.tag}.slot-{name}", c.repo_root) for name in self.slot_names]
        self.verifier = Slot("verify", root / f"{c.tag}.verify", c.repo_root).open(self.branch.head())
        self.verify_guard = self.make_guard(self.verifier)
        for slot in self.slots:
            slot.open(self.branch.head())
            slot.guard = self.make_guard(slot)
            pid_file = c.runs_dir / f"train-slot-{slot.name}.pid"
            if kill_stale(pid_file):  # this loop holds the tag's lock, so no live loop owns that run
                self.view.note(f"killed a training run on slot {slot.name} that a previous, killed loop left behind")
            slot.fair_runs = FairRuns(c, self.view, slot, slot.guard, time_budget=self.time_budget, timeout=self.timeout,
                                      pid_file=pid_file, env=slot.env, cpu_check=False)
        self.pool = SlotPool(self.slots)
        return self

    def make_guard(self, slot: Slot) -> Guard:
        c = self.config
        return Guard(c.repo_root, slot.path, self.data.files, python=c.python, preset=c.preset,
                     env=dict(training_env(preset=c.preset, time_budget=self.time_budget, seed=c.seed,
                                           run_dir=c.runs_dir, cache=c.cache), **slot.env))

    # -- the driver ----------------------------------------------------------------------------

    def run(self) -> None:
        from agent.state import replay

        self.state = replay(self.rows(), start=self.branch.head()[:7])
        self.branch.reset(self.best_commit)
        try:
            for slot in self.slots:
                slot.fair_runs.open()
            self.noise()
            self.view.best(self.state.best_val, self.state.floor.describe())
            self.drive()
        except KeyboardInterrupt:
            self.branch.reset(self.best_commit)
            raise
        finally:
            for slot in self.slots:
                slot.fair_runs.close()
            self.view.note(self.guard.costs.describe())

    def drive(self) -> None:
        """Claim proposals while a slot is free, each experiment in a thread of its own; when a limit or the
        backlog says stop, claim no more and return once the experiments in flight are recorded."""
        running: set[Future] = set()
        stop: LoopStop | None = None
        with ThreadPoolExecutor(len(self.slots), thread_name_prefix="slot") as threads:
            try:
                while True:
                    with self.driver_lock:
                        if isinstance(stop, BacklogExhausted) and self.requeued:
                            stop = None  # a stale win came back meanwhile: it runs first
                        while stop is None and len(running) < len(self.slots):
                            try:
                                self.claim_one(threads, running)
                            except LoopStop as e:
                                stop = e
                    if not running:
                        raise stop or BacklogExhausted("nothing is left to run.")
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        if future.exception() is not None:
                            raise future.exception()
            except BaseException:
                self.halt()
                raise

    def claim_one(self, threads: ThreadPoolExecutor, running: set[Future]) -> None:
        """Check the limits, claim a proposal and start its experiment; LoopStop when a limit is reached."""
        self.limits.check(self.experiments_run, self.crashes_in_a_row, self.refusals_in_a_row, self.contended_in_a_row)
        claimed = self.claim()
        if claimed is None:
            return
        proposal, proposer, state = claimed
        candidate = self.commit(proposal, state)  # on the best it was proposed from, before the best can move
        if candidate is None:
            self.count_refusal(proposer, False)
            return
        self.in_flight.add(proposal.experiment)
        running.add(threads.submit(self.experiment_thread, candidate, proposer, state))

    def halt(self) -> None:
        """Stop every slot's run (its process group, from the pid file the runner wrote) and start no other."""
        self.stopping = True
        self.pool.close()
        for slot in self.slots:
            kill_stale(slot.fair_runs.pid_file)

    def claim(self):
        if self.requeued:
            return self.requeued.pop(0)
        return super().claim()

    def next_item(self):
        queued = {proposal.experiment for proposal, _, _ in self.requeued}
        return next((item for item in self.items if item.id not in queued and
                     item.id not in self.state.done | self.contended | self.left_for_llm | self.in_flight), None)

    def candidate_number(self) -> int:
        """Numbers stay unique while several candidates are in flight: each names its runs and refs."""
        self.numbered = max(self.numbered, self.state.row_count) + 1
        return self.numbered

    def experiment_thread(self, candidate: Candidate, proposer: Proposer, state: ProposerState) -> None:
        with self.driver_lock:
            try:
                self.run_candidate(candidate, proposer, state)
                self.count_refusal(proposer, True)
            finally:
                self.in_flight.discard(candidate.proposal.experiment)

    # -- Loop's hooks: commits without a worktree, runs on a slot, judging against the best of the moment --

    def new_commit(self, message: str, train_py: str, parent: str) -> str:
        return commit_on(self.config.repo_root, parent, {"train.py": train_py}, message)

    def amend_commit(self, message: str, train_py: str, parent: str) -> str:
        return commit_on(self.config.repo_root, parent, {"train.py": train_py}, message)

    def train(self, c: Candidate, name: str, description: str, seed: int) -> TrainRun:
        """The run on a free slot (for a confirmation, not the slot of the candidate's last run). The driver's
        lock is let go first: waiting for a slot under it would keep the runs that hold them from finishing."""
        avoid = self.last_slot.get(c.number) if name != c.name else None
        reference = self.state.reference

        def on_a_slot() -> TrainRun:
            slot = self.pool.take(avoid=avoid)
            self.last_slot[c.number] = slot
            try:
                slot.reset(c.sha)
                return slot.fair_runs.train(name, f"{description} [slot {slot.name}]", seed, reference)
            finally:
                self.pool.give(slot)

        return self.unlocked(on_a_slot)

    def unlocked(self, work: Callable[[], TrainRun]) -> TrainRun:
        self.driver_lock.release()
        try:
            return work()
        finally:
            self.driver_lock.acquire()
            if self.stopping:
                raise KeyboardInterrupt  # the driver stopped while this ran: record nothing

    def against(self, c: Candidate) -> tuple[float, ...]:
        return self.state.best_values  # the best of the moment, not the one the candidate started from

    def confirmed(self, c: Candidate, first: TrainRun, added: int, removed: int):
        runs, status, reason, verdict = super().confirmed(c, first, added, removed)
        if status == "keep" and len(runs) == 1 and self.config.max_runs > 1 and len(self.slots) > 1:
            seed = self.config.seed + 1  # a would-be keep on one run is confirmed on another slot first
            again = self.train(c, f"{c.name}-run2", f"confirming {c.proposal.description} (seed {seed})", seed)
            if again.problem or again.contended or again.outcome.status != "ok":
                return runs + [again], "discard", f"{reason}; its confirming run on another slot did not finish cleanly", verdict
            runs.append(again)
            verdict = self.judge(runs, self.against(c), added, removed)
            status, reason = verdict.status, f"{verdict.reason}; confirmed on a second slot"
            if status == "confirm":
                status = "discard"
        moved = not c.parent.startswith(self.state.best_commit or "")
        if status != "keep" and moved:
            old = self.judge(runs, c.best, added, removed, bar_alone=True)
            if old.status == "keep":
                return runs, *self.requeue(c, old.reason), verdict
        return runs, status, reason, verdict

    def requeue(self, c: Candidate, beat: str) -> tuple[str, str]:
        """A stale win's change merged onto the new best, queued before any new item; the row's status and reason
        (a change that conflicts with the new best is discarded: there is nothing to run)."""
        best = self.best_commit
        merged = merge_onto(self.config.repo_root, c.parent, c.sha, best)
        won = f"stale win: it beat the commit it started from ({beat}) but not the best that moved meanwhile"
        if merged is None:
            return "discard", f"{won}; its change conflicts with the new best {best[:7]}, so it is not run again"
        proposal = replace(c.proposal, train_py=merged)
        state = ProposerState(tag=self.config.tag, best_commit=best, best_val_bpb=self.state.best_val,
                              sigma=self.state.floor.sigma, ledger_rows=self.rows(), item=None,
                              train_py=self.branch.read("train.py", best))
        self.requeued.append((proposal, self.backlog_proposer, state))
        return "stale", f"{won}; re-applied onto the new best {best[:7]} and queued to run again"

    def checkout_for_verify(self, c: Candidate) -> Guard:
        self.verifier.reset(c.sha)
        return self.verify_guard

    def leave(self, c: Candidate) -> None:
        pass  # the branch never moved: it holds the best

    def finish(self, c: Candidate, row: dict[str, object]) -> None:
        if row["status"] == "stale":
            self.branch.keep_ref(c.sha, c.name)
            self.record(row)
            return
        super().finish(c, row)
        if row["status"] == "keep":
            self.branch.reset(c.sha)  # the branch moves to the new best; every slot's worktree is detached

    # -- the noise runs, on every slot at once ----------------------------------------------------

    def on_slots(self, jobs: Sequence[tuple[str, str, int]], sha: str) -> list[TrainRun]:
        """Runs (name, description, seed) of `sha`, each on a slot of its own, at once; in the jobs' order."""
        def one(job: tuple[str, str, int]) -> TrainRun:
            slot = self.pool.take()
            try:
                slot.reset(sha)
                return slot.fair_runs.train(job[0], f"{job[1]} [slot {slot.name}]", job[2], self.state.reference)
            finally:
                self.pool.give(slot)

        with ThreadPoolExecutor(len(self.slots), thread_name_prefix="noise") as threads:
            return list(threads.map(one, jobs))

    def noise(self) -> None:
        """The baselines the tag lacks, then its null twins, each batch on all slots at once; the first baseline
        runs alone when the tag has no machine-speed reference yet, so every other run is held to one."""
        c, noise = self.config, self.noise_runs
        base = self.branch.repo.git.rev_parse(self.state.base_commit)
        while len(self.state.baselines) < c.baseline_repeats and not self.state.done:
            first = len(self.state.baselines)
            count = 1 if self.state.reference is None else min(len(self.slots), c.baseline_repeats - first)
            jobs = [(f"{self.state.row_count + 1 + j:03d}-baseline", f"baseline {first + j + 1}/{c.baseline_repeats} "
                     f"(seed {c.seed + first + j})", c.seed + first + j) for j in range(count)]
            for j, run in enumerate(self.on_slots(jobs, base)):
                self.state = noise.record_baseline(first + j, run, self.state)
        if not noise.twins_wanted(self.state):
            return
        source = noise.twin_source(self.state)
        if source is None:
            return
        sha = (self.branch.repo.git.rev_parse(self.state.twins[0]["commit"]) if self.state.twins else
               self.new_commit(f"{TWIN}: MATRIX_LR x 1.0001, a null edit that measures the paired noise", source, base))
        while noise.twins_wanted(self.state):
            first, wanted = len(self.state.twins), len(self.state.twins) + noise.twins_wanted(self.state)
            jobs = [(f"{self.state.row_count + 1 + j:03d}-{TWIN}", f"null twin {first + j + 1}/{wanted} of baseline "
                     f"{first + j + 1} (seed {c.seed + first + j})", c.seed + first + j)
                    for j in range(min(len(self.slots), wanted - first))]
            for (name, _, _), run in zip(jobs, self.on_slots(jobs, sha)):
                self.branch.keep_ref(sha, name)
                self.state = noise.record_twin(run, sha, self.state)
