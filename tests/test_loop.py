"""The loop end to end: agent/loop.py run as a real subprocess in a temp git repository with a
prepared cache, checked through the ledger (read with csv), git and /proc.

Most tests train tests/fakes/train.py: a deterministic stand-in whose val_bpb is a known function of
its constants and seed (see its docstring), measured by prepare.evaluate on a checkpoint the guard
re-evaluates, in a few seconds a run (importing torch, mostly). The demo test runs the real
train.py and is marked slow.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from agent.backlog import load_backlog
from agent.judge import NoiseFloor, judge_noise
from agent.ledger import Ledger
from agent.summary import Progress
from agent.view import LiveView

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_TRAIN = Path(__file__).resolve().parent / "fakes" / "train.py"
TAG = "t"
# A noisy shared machine must not turn these tests' runs contended: tests/test_fair_runs.py tests the default tolerance.
# Two baselines, no null twins and k 2 keep these tests' arithmetic on the fake's known values (see NS_1 below).
FAST = ("--preset", "cpu", "--time-budget", "1", "--confirm-margin", "0", "--contention-tolerance", "0.5",
        "--contention-wait", "0.2", "--baseline-repeats", "2", "--null-twins", "0", "--k", "2")
PLAIN_LINE = re.compile(r"^\[\d\d:\d\d:\d\d (?P<tag>\S+)\] (?P<text>.*)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# The fake's val_bpb (tests/fakes/train.py): seed 43 is ~0.003 above seed 42 (2 sigma ~0.004).
NS_1 = ("NS-1", "MUON_NS_STEPS = 3")  # improves by ~0.06: kept
MM_1 = ("MM-1", "MUON_MOMENTUM_START = 0.9")  # val_bpb unchanged: discarded
MB_2 = ("MB-2", "MUON_BETA2 = 0.99")  # improves by ~0.0003, within the noise
ABL_1 = ("ABL-1", 'MATRIX_OPTIMIZER = "adamw"; MATRIX_LR = 0.04')  # crashes
ABL_2 = ("ABL-2", 'MATRIX_OPTIMIZER = "adamw"; MATRIX_LR = 0.001')  # crashes
SLOW_1 = ("SLOW-1", "SLEEP = 30")  # a 30 s run, cut short when the hold file is gone


def backlog_text(*items: tuple[str, str | None]) -> str:
    """A backlog in agent/backlog.md's format whose execution order is the order given."""
    rows = "\n".join(f"| {item_id} | set {edit or 'something in prose'} | HIGH |" for item_id, edit in items)
    order = "\n".join(f"- {item_id}" for item_id, _ in items)
    edits = "\n".join(f"{item_id}: {edit}" for item_id, edit in items if edit)
    return (f"# Test backlog\n\n| ID | Change | Priority |\n|---|---|---|\n{rows}\n\n"
            f"## Execution Order\n\n{order}\n\n## Edits\n\n{edits}\n")


def run_git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def is_running(pid: int) -> bool:
    """True for a live process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_under(root: Path) -> list[int]:
    """Live processes whose command line names `root` or whose working directory lies under it."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if (str(root) in cmdline or Path(cwd).is_relative_to(root)) and is_running(pid):
            found.append(pid)
    return found


def wait_for(condition: Callable[[], object], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def messages(output: str) -> list[str]:
    """The text of the plain view's lines, without their time and tag."""
    return [m.group("text") for line in output.splitlines() if (m := PLAIN_LINE.match(line))]


@dataclass
class Project:
    """A user's repository under test: a git checkout holding agent/, prepare.py and a train.py."""

    root: Path
    env: dict[str, str]

    @property
    def ledger(self) -> Path:
        return self.root / "experiments.tsv"

    @property
    def worktree(self) -> Path:
        return self.root / "worktrees" / TAG

    @property
    def runs(self) -> Path:
        return self.root / "runs" / TAG

    def git(self, *args: str) -> str:
        return run_git(self.root, *args)

    def backlog(self, *items: tuple[str, str | None]) -> str:
        path = self.root.parent / "backlog.md"  # outside the checkout, which must stay clean
        path.write_text(backlog_text(*items))
        return str(path)

    def loop(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "agent/loop.py", *args], cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def report(self, *args: str) -> subprocess.CompletedProcess[str]:
        """agent/report.py of this repository, as the researcher runs it in the morning."""
        return subprocess.run([sys.executable, "agent/report.py", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """The loop in the background, stdout and stderr to loop.out beside the checkout, Ctrl-C not ignored."""
        out = open(self.root.parent / "loop.out", "w")
        with out:
            return subprocess.Popen([sys.executable, "agent/loop.py", *args], cwd=self.root,
                                    env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def output(self) -> str:
        return (self.root.parent / "loop.out").read_text()

    def rows(self, tag: str = TAG) -> list[dict[str, str]]:
        if not self.ledger.exists():
            return []
        with open(self.ledger, newline="") as f:
            return [row for row in csv.DictReader(f, delimiter="\t") if row["tag"] == tag]

    def sha(self, rev: str) -> str:
        return self.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")

    def branch(self, tag: str = TAG) -> str:
        return self.sha(f"refs/heads/autoresearch/{tag}")

    def user_state(self) -> tuple[str, str, str]:
        return self.git("symbolic-ref", "HEAD"), self.git("rev-parse", "HEAD"), self.git("status", "--porcelain")

    def running_pid(self, experiment: str) -> int:
        """The pid of `experiment`'s train.py, once it has printed its progress; waits for it."""
        pid_file, log = self.runs / "train.pid", self.runs / experiment / "train.log"

        def started() -> bool:
            return pid_file.exists() and log.exists() and "step 00002" in log.read_text()

        assert wait_for(started, 120), self.output()
        pid = json.loads(pid_file.read_text())["pid"]
        assert is_running(pid) and Path(os.readlink(f"/proc/{pid}/cwd")) == self.worktree.resolve()
        return pid


@pytest.fixture(scope="session")
def cache(prepared_builtin: dict) -> Path:
    """The session's AUTORESEARCH_CACHE, holding the builtin source prepared for the cpu preset."""
    return Path(prepared_builtin["dir"]).parents[1]


@pytest.fixture
def make_project(tmp_path: Path, cache: Path) -> Callable[..., Project]:
    def make(train: Path = FAKE_TRAIN) -> Project:
        root = tmp_path / "repo"
        root.mkdir()
        shutil.copytree(REPO_ROOT / "agent", root / "agent", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("prepare.py", ".gitignore", "program.md"):
            if (REPO_ROOT / name).exists():
                shutil.copy(REPO_ROOT / name, root / name)
        (root / "program.md").touch()
        shutil.copy(train, root / "train.py")
        run_git(root, "init", "-q", "-b", "main")
        run_git(root, "config", "user.name", "Researcher")
        run_git(root, "config", "user.email", "researcher@example.com")
        run_git(root, "add", "-A")
        run_git(root, "commit", "-q", "-m", "the project")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "AUTORESEARCH_"))}
        env.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PRESET="cpu")
        return Project(root, env)

    return make


@pytest.fixture
def project(make_project) -> Project:
    return make_project()


@pytest.fixture(autouse=True)
def no_stray_processes(tmp_path: Path):
    """Whatever a failing test leaves running under its tmp dir is killed."""
    yield
    for pid in processes_under(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------
# Keep, discard, crash, skip
# ---------------------------------------------------------------------------

def test_keeps_an_improvement_discards_the_rest_and_stops_when_the_backlog_is_exhausted(project: Project):
    before = project.user_state()
    backlog = project.backlog(NS_1, MM_1, ("PR-1", None))

    result = project.loop("--tag", TAG, "--backlog", backlog, *FAST)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("NS-1", "keep"), ("MM-1", "discard")]
    b42, b43, ns, mm = (float(r["val_bpb"]) for r in rows)
    assert b42 < b43 < b42 + 0.01 and ns < b42 - 0.03 and mm == ns
    assert [r["seed"] for r in rows] == ["42", "43", "42", "42"]
    base = before[1]
    assert rows[0]["commit"] == rows[1]["commit"] == base[:7]
    kept, discarded = project.sha(rows[2]["commit"]), project.sha(rows[3]["commit"])
    assert project.branch() == kept
    assert project.git("log", "-1", "--format=%s", kept).startswith("NS-1: ")
    assert project.git("log", "-1", "--format=%P", kept) == base
    assert project.git("show", f"{kept}:train.py").count("MUON_NS_STEPS = 3  #") == 1
    assert project.git("log", "-1", "--format=%s", discarded).startswith("MM-1: ")
    assert subprocess.run(["git", "merge-base", "--is-ancestor", discarded, kept], cwd=project.root).returncode == 1
    refs = project.git("for-each-ref", "--format=%(refname) %(objectname)", "refs/autoresearch/t").splitlines()
    assert f"refs/autoresearch/t/004-MM-1 {discarded}" in refs
    assert f"refs/autoresearch/t/003-NS-1 {kept}" in refs
    for row in rows:
        assert project.git("show", "--stat", row["commit"])
    for row in rows[2:]:
        assert "sigma" in row["reason"] and re.search(r"[-+]\d\.\d{4}", row["reason"]), row["reason"]
        assert row["parent"] == (base if row["experiment"] == "NS-1" else kept)[:7]
        assert float(row["sigma"]) == pytest.approx(statistics.stdev([b42, b43]), abs=2e-6)
    assert float(rows[2]["delta"]) == pytest.approx(ns - b42, abs=2e-6)
    assert project.user_state() == before
    assert project.git("-C", str(project.worktree), "status", "--porcelain") == ""
    assert (project.worktree / "train.py").read_text() == project.git("show", f"{kept}:train.py") + "\n"
    said = messages(result.stdout)
    assert "PR-1 has no machine-readable edit; left for an LLM proposer" in said
    assert said[-1].startswith("loop stopped: the backlog is exhausted")
    assert "1 prose items need --proposer claude" in said[-1]
    assert_report_names_every_keep(project, TAG, rows)


def assert_report_names_every_keep(project: Project, tag: str, rows: list[dict[str, str]]) -> None:
    """The morning report on the loop's own ledger: a real PNG at the repository root, and every kept
    experiment in the summary's table with its commit, value and delta."""
    result = project.report()
    assert result.returncode == 0, result.stderr
    png = project.root / "progress.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 600)
    assert result.stdout.startswith("# autoresearch report: experiments.tsv") and f"## {tag} (cpu preset" in result.stdout
    assert (project.root / "report.md").read_text() in result.stdout
    kept = [r for r in rows if r["status"] == "keep" and r["experiment"] != "baseline"]
    for row in kept:
        assert (f"| {row['commit']} | {row['experiment']} | {float(row['val_bpb']):.6f} | {float(row['delta']):+.6f} |"
                in result.stdout), result.stdout
    counts = [f"{sum(r['status'] == s for r in rows if r['experiment'] not in ('baseline', 'twin'))} {s}" for s in ("keep", "discard")]
    assert f"- outcomes: {counts[0]}, {counts[1]}," in result.stdout
    assert project.git("status", "--porcelain") == ""  # progress.png and report.md are ignored outputs


def test_crashes_are_recorded_and_enough_in_a_row_stop_the_loop(project: Project):
    backlog = project.backlog(ABL_1, ABL_2, NS_1)

    result = project.loop("--tag", TAG, "--backlog", backlog, "--max-crashes", "2", *FAST)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows[2:]] == [("ABL-1", "crash"), ("ABL-2", "crash")]
    assert rows[2]["reason"] == ("exit code 1: RuntimeError: the fake cannot train the hidden matrices "
                                 "with adamw at lr 0.04")
    assert rows[3]["reason"].endswith("adamw at lr 0.001")
    assert all(r["val_bpb"] == "0.000000" for r in rows[2:])
    base = project.sha("main")
    assert project.branch() == base
    for row, ref in zip(rows[2:], ("003-ABL-1", "004-ABL-2")):
        assert project.sha(f"refs/autoresearch/t/{ref}") == project.sha(row["commit"])
    last = messages(result.stdout)[-1]
    assert "2 experiments crashed in a row" in last and "resume: python agent/loop.py --tag t " in last
    assert "Traceback" in (project.runs / "003-ABL-1" / "train.log").read_text()


def test_after_a_crash_stop_the_same_tag_goes_on(project: Project, prepared_builtin: dict):
    # The ledger as test_crashes_are_recorded_and_enough_in_a_row_stop_the_loop leaves it.
    ledger, head = Ledger(project.ledger), project.sha("main")[:7]
    common = dict(tag=TAG, preset="cpu", data_fingerprint=prepared_builtin["fingerprint"], parent=head)
    for seed, value, status in ((42, 3.577675, "keep"), (43, 3.580539, "baseline")):
        ledger.append(dict(common, commit=head, val_bpb=value, status=status, experiment="baseline", seed=seed,
                           description="baseline", reason=f"baseline run (seed {seed})"))
    for item in ("ABL-1", "ABL-2"):
        ledger.append(dict(common, commit="", status="crash", experiment=item, seed=42, description=item,
                           reason="exit code 1: RuntimeError: adamw"))
    backlog = project.backlog(ABL_1, ABL_2, NS_1)

    again = project.loop("--tag", TAG, "--backlog", backlog, "--max-crashes", "2", *FAST)

    assert again.returncode == 0, again.stdout + again.stderr
    assert [r["experiment"] for r in project.rows()[4:]] == ["NS-1"], again.stdout


def test_an_item_that_cannot_apply_is_invalid_and_the_loop_goes_on(project: Project):
    backlog = project.backlog(("BAD-1", "NOT_IN_TRAIN = 1"), NS_1)

    result = project.loop("--tag", TAG, "--backlog", backlog, *FAST)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows[2:]] == [("BAD-1", "invalid"), ("NS-1", "keep")]
    assert rows[2]["commit"] == "" and rows[2]["val_bpb"] == ""
    assert rows[2]["reason"].startswith("NOT_IN_TRAIN matches no module-level assignment in train.py")
    assert rows[2]["reason"].endswith(".")
    base = project.sha("main")
    assert project.git("rev-list", "--count", f"{base}..autoresearch/t") == "1"
    assert project.git("for-each-ref", "--format=%(refname)", "refs/autoresearch/t") == "refs/autoresearch/t/004-NS-1"


# ---------------------------------------------------------------------------
# Stopping and resuming
# ---------------------------------------------------------------------------

def test_the_same_tag_resumes_without_a_second_baseline(project: Project):
    args = ("--tag", TAG, "--backlog", project.backlog(NS_1, MM_1), "--max-experiments", "1", *FAST)
    first = project.loop(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    rows_before = project.rows()
    assert [r["experiment"] for r in rows_before] == ["baseline", "baseline", "NS-1"]  # baselines not counted
    assert "ran the 1 experiments asked for (--max-experiments)" in messages(first.stdout)[-1]

    second = project.loop(*args)

    assert second.returncode == 0, second.stdout + second.stderr
    rows = project.rows()
    assert rows[:3] == rows_before
    assert [r["experiment"] for r in rows] == ["baseline", "baseline", "NS-1", "MM-1"]
    assert not any("baseline started" in line for line in messages(second.stdout))
    assert rows[3]["parent"] == rows[2]["commit"]  # NS-1 was kept: MM-1 starts from it
    assert project.branch() == project.sha(rows[2]["commit"])


def test_a_killed_loop_takes_its_run_along_and_resumes_it(project: Project):
    hold = project.root.parent / "hold"
    hold.touch()
    backlog = project.backlog(SLOW_1, NS_1)
    args = ("--tag", TAG, "--backlog", backlog, *FAST)
    loop = project.start(*args, env={"FAKE_TRAIN_HOLD": str(hold)})
    try:
        train = project.running_pid("003-SLOW-1")
        assert len(project.rows()) == 2
        os.kill(loop.pid, signal.SIGKILL)
        assert loop.wait(30) == -signal.SIGKILL
    finally:
        loop.kill()
        loop.wait()

    assert wait_for(lambda: not is_running(train), 5), f"train.py {train} outlived the SIGKILLed loop"
    assert processes_under(project.root.parent), "the fake's worker, left for the next loop to kill"
    assert [r["experiment"] for r in project.rows()] == ["baseline", "baseline"]
    hold.unlink()

    result = project.loop(*args, env={"FAKE_TRAIN_HOLD": str(hold)})

    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed a training run that a previous, killed loop left behind" in messages(result.stdout)
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("SLOW-1", "discard"), ("NS-1", "keep")]
    assert project.branch() == project.sha(rows[3]["commit"])
    assert rows[3]["parent"] == project.sha("main")[:7]  # the killed SLOW-1 commit left no trace
    assert not (project.runs / "train.pid").exists()
    assert processes_under(project.root.parent) == []
    assert project.git("status", "--porcelain") == ""


@pytest.mark.parametrize("signum, before", [(signal.SIGINT, [NS_1]), (signal.SIGTERM, [])], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_ends_the_run_and_puts_the_branch_back(project: Project, signum: int, before: list):
    backlog = project.backlog(*before, SLOW_1, MM_1)
    loop = project.start("--tag", TAG, "--backlog", backlog, *FAST)
    try:
        train = project.running_pid(f"{3 + len(before):03d}-SLOW-1")
        os.kill(loop.pid, signum)
        returncode = loop.wait(30)
    finally:
        loop.kill()
        loop.wait()

    assert returncode == 130, project.output()
    assert not is_running(train)
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [("baseline", "keep"), ("baseline", "baseline")] + [("NS-1", "keep")] * len(before)
    assert project.branch() == project.sha(rows[-1]["commit"] if before else "main")
    assert project.git("-C", str(project.worktree), "status", "--porcelain") == ""
    assert not (project.runs / "train.pid").exists()
    last = messages(project.output())[-1]
    assert last.startswith("loop interrupted:") and "(--tag t) to resume" in last
    assert "Traceback" not in project.output()
    assert processes_under(project.root.parent) == []


# ---------------------------------------------------------------------------
# Refusals: one sentence, exit 2, nothing written
# ---------------------------------------------------------------------------

def _dirty_train_py(project: Project) -> tuple[list[str], dict[str, str], str]:
    with open(project.root / "train.py", "a") as f:
        f.write("# an idea in progress\n")
    return [], {}, "train.py has uncommitted changes"


def _no_prepared_data(project: Project) -> tuple[list[str], dict[str, str], str]:
    empty = project.root.parent / "empty-cache"
    empty.mkdir()
    return [], {"AUTORESEARCH_CACHE": str(empty)}, "no prepared data for the cpu preset"


def _one_baseline_without_min_delta(project: Project) -> tuple[list[str], dict[str, str], str]:
    return ["--baseline-repeats", "1"], {}, "give --min-delta"


def _malformed_backlog(project: Project) -> tuple[list[str], dict[str, str], str]:
    path = project.root.parent / "bad.md"
    path.write_text("| ID | Change | Priority |\n|---|---|---|\n| NS-1 | three steps | URGENT |\n")
    return ["--backlog", str(path)], {}, "bad.md line 3: the priority 'URGENT' of NS-1 is unknown"


def _tag_of_other_data(project: Project) -> tuple[list[str], dict[str, str], str]:
    ledger = Ledger(project.ledger)
    for seed, status in ((42, "keep"), (43, "baseline")):
        ledger.append(dict(commit=project.sha("main")[:7], val_bpb=1.5, status=status, description="baseline",
                           tag=TAG, experiment="baseline", preset="cpu", data_fingerprint="builtin:000000000000",
                           seed=seed))
    return [], {}, "start a new --tag so runs are never compared across presets, data or budgets"


@pytest.mark.parametrize("setup", [_dirty_train_py, _no_prepared_data, _one_baseline_without_min_delta,
                                   _malformed_backlog, _tag_of_other_data],
                         ids=["dirty-train-py", "no-data", "one-baseline", "bad-backlog", "other-data"])
def test_refuses_with_one_sentence_and_writes_nothing(project: Project, setup):
    args, env, phrase = setup(project)
    ledger = project.ledger.read_bytes() if project.ledger.exists() else None
    train_py = (project.root / "train.py").read_text()
    before = project.user_state()

    result = project.loop("--tag", TAG, *FAST, *args, env=env)

    assert result.returncode == 2, result.stdout + result.stderr
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(said) == 1 and "Traceback" not in said[0], said
    assert phrase in said[0] and said[0].endswith("."), said[0]
    assert "loop: " in said[0]
    assert (project.ledger.read_bytes() if project.ledger.exists() else None) == ledger
    assert (project.root / "train.py").read_text() == train_py
    assert project.user_state() == before
    assert not (project.root / "runs").exists()
    assert project.git("for-each-ref", "refs/autoresearch") == ""
    branch = project.git("for-each-ref", "--format=%(objectname)", "refs/heads/autoresearch")
    assert branch in ("", before[1])  # the worktree of a known tag may be opened, never advanced


# ---------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------

def test_greedy_keeps_what_the_noise_judge_discards(project: Project):
    backlog = project.backlog(MB_2)

    result = project.loop("--tag", TAG, "--backlog", backlog, "--judge", "greedy", *FAST)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    best, value, sigma = float(rows[0]["val_bpb"]), float(rows[2]["val_bpb"]), float(rows[2]["sigma"])
    assert best - 0.001 < value < best
    assert rows[2]["status"] == "keep" and rows[2]["reason"] == f"greedy: {value:.4f} < best {best:.4f}"
    assert project.branch() == project.sha(rows[2]["commit"])
    # The default judge, on the same runs: a gain within 2 sigma is noise.
    assert judge_noise([value], [best], NoiseFloor(sigma, 2), k=2.0).status == "discard"


# ---------------------------------------------------------------------------
# The real demo and the views
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_the_real_train_py_and_resumes(make_project):
    project = make_project(REPO_ROOT / "train.py")
    first_items = [item.id for item in load_backlog(project.root / "agent" / "demo_backlog.md") if item.edits][:2]
    # The run's own timeout is generous: on a loaded 2-core machine a 3 s run spends a minute in eval.
    args = ("--demo", "--time-budget", "3", "--max-experiments", "1", "--confirm-margin", "0", "--timeout", "900",
            "--baseline-repeats", "2", "--null-twins", "2")

    first = project.loop(*args, timeout=1800)

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with open(project.ledger, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    tag = rows[0]["tag"]
    assert tag == "demo"  # undated: the same command resumes it on any day
    assert [(r["experiment"], r["status"]) for r in rows[:4]] == [("baseline", "keep"), ("baseline", "baseline")] + [("twin", "discard")] * 2
    assert len(rows) == 5 and rows[4]["experiment"] == first_items[0] and rows[4]["status"] in ("keep", "discard")
    assert all(math.isfinite(float(r["val_bpb"])) and float(r["val_bpb"]) > 0 for r in rows)
    assert {r["preset"] for r in rows} == {"cpu"}
    item_dir = next(d for d in sorted((project.root / "runs" / tag).glob(f"005-{first_items[0]}*")) if (d / "train.log").exists())
    assert (item_dir / "train.log").read_text().count("val_bpb:") == 1
    lines = first.stdout.splitlines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), lines
    said = messages(first.stdout)
    assert "001-baseline started: baseline 1/2 (seed 42)" in said
    assert any(line.startswith(f"{first_items[0]}: ") for line in said)

    again = project.loop(*args, "--tag", tag, timeout=1800)

    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows_again = project.rows(tag)
    assert rows_again[:5] == rows and len(rows_again) == 6
    assert rows_again[5]["experiment"] == first_items[1] and math.isfinite(float(rows_again[5]["val_bpb"]))
    assert not any("baseline started" in line for line in messages(again.stdout))
    assert_report_names_every_keep(project, tag, rows_again)


def test_live_view_shows_the_run_its_progress_and_the_best():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    view = LiveView("nov28", console=console)
    row = dict(experiment="NS-1", status="keep", val_bpb="1.030000", description="MUON_NS_STEPS = 3",
               reason="-0.0200 < -2 sigma = -0.0014")
    with view:
        view.best(1.05, "sigma 0.0007 from 2 baseline runs")
        view.started("003-NS-1", "MUON_NS_STEPS = 3 (three iterations)")
        view.progress(Progress(step=42, percent=42.0, loss=3.25, tokens_per_second=12345.0, remaining_seconds=10.0))
        shown_running = ANSI.sub("", console.file.getvalue())
        view.finished(row, [row])
        view.best(1.03, "sigma 0.0007 from 2 baseline runs")
        view.note("loop stopped: the backlog is exhausted.")
    shown = ANSI.sub("", console.file.getvalue())

    assert "autoresearch/nov28" in shown_running
    assert "003-NS-1" in shown_running and "MUON_NS_STEPS = 3 (three iterations)" in shown_running
    assert "42.0%" in shown_running and "step 42" in shown_running and "12,345 tok/s" in shown_running
    assert "best val_bpb 1.050000 | sigma 0.0007" in shown_running
    final = shown.split("autoresearch loop")[-1]
    assert "best val_bpb 1.030000" in final
    assert re.search(r"NS-1\s+keep\s+1\.030000", final)
    assert "loop stopped: the backlog is exhausted." in final
