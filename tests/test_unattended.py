"""Unattended nights: one loop per tag, a pasteable command in every stop message, the right advice
when a baseline fails, --remove-tag, and the small refusals. The loop runs as a real subprocess in a
temp git repository with tests/fakes/train.py, as in tests/test_loop.py (whose fixtures these reuse).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.branch import ExperimentBranch
from agent.ledger import Ledger
from agent.lock import TagBusy, TagLock
from agent.loop import build_config, main, parse_args
from agent.runner import _write_pid_file, kill_stale
from test_loop import (  # noqa: F401  (fixtures: cache, make_project, project, no_stray_processes)
    ABL_1, ABL_2, FAKE_TRAIN, FAST, MM_1, NS_1, REPO_ROOT, SLOW_1, TAG, Project, cache, is_running, make_project,
    messages, no_stray_processes, processes_under, project, wait_for,
)

STARTED = re.compile(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def pasted(project: Project, command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command exactly as a message printed it, from the repository root, with this interpreter as python."""
    words = shlex.split(command)
    assert words[:2] == ["python", "agent/loop.py"], command
    return project.loop(*words[2:], env=env)


def same_config(first: list[str], second: list[str]) -> None:
    """Two command lines configure the same loop (build_config fills in the defaults of both)."""
    one, two = (build_config(parse_args(argv), argv).model_dump() for argv in (first, second))
    assert one == two


def train_with(tmp_path: Path, **constants: object) -> Path:
    """tests/fakes/train.py with some of its constants changed."""
    source = FAKE_TRAIN.read_text()
    for name, value in constants.items():
        source, count = re.subn(rf"^{name} = .*?(  #)", rf"{name} = {value!r}\1", source, flags=re.M)
        assert count == 1, name
    path = tmp_path / "train_variant.py"
    path.write_text(source)
    return path


# ---------------------------------------------------------------------------
# One loop per tag
# ---------------------------------------------------------------------------

def test_a_second_loop_on_the_same_tag_is_refused_and_leaves_the_first_alone(project: Project):
    hold = project.root.parent / "hold"
    hold.touch()
    env = {"FAKE_TRAIN_HOLD": str(hold)}
    args = ("--tag", TAG, "--backlog", project.backlog(SLOW_1, NS_1), *FAST)
    first = project.start(*args, env=env)
    try:
        train = project.running_pid("003-SLOW-1")
        pid_file = (project.runs / "train.pid").read_text()

        second = project.loop(*args, env=env)

        assert second.returncode == 2, second.stdout + second.stderr
        lines = said(second)
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert f"tag t is in use by another loop (PID {first.pid}, " in lines[0] and STARTED.search(lines[0])
        assert "agent/loop.py --tag t" in lines[0] and lines[0].endswith("then run this command again.")
        assert is_running(train) and (project.runs / "train.pid").read_text() == pid_file
        assert [r["experiment"] for r in project.rows()] == ["baseline", "baseline"]
        hold.unlink()
        assert first.wait(120) == 0, project.output()
    finally:
        first.kill()
        first.wait()

    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("SLOW-1", "discard"), ("NS-1", "keep")]
    assert "killed by" not in rows[2]["reason"]
    assert "killed a training run" not in project.output()
    assert processes_under(project.root.parent) == []


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from agent.lock import TagLock
        lock = TagLock({str(tmp_path)!r}, "t").acquire(["python", "agent/loop.py", "--tag", "t"])
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(TagBusy) as refused:
            TagLock(tmp_path, "t").acquire()
        assert f"(PID {holder.pid}, " in str(refused.value) and STARTED.search(str(refused.value))
        assert ": python agent/loop.py --tag t)" in str(refused.value)
        assert TagLock(tmp_path, "t").is_held_elsewhere()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, the OS releases the lock
        holder.wait()

    lock = TagLock(tmp_path, "t")
    assert not lock.is_held_elsewhere()
    with lock.acquire():
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_stale_spares_a_live_run_whose_command_line_differs(tmp_path: Path):
    pid_file = tmp_path / "train.pid"
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        _write_pid_file(pid_file, run.pid)
        record = json.loads(pid_file.read_text())
        assert record["command"] == [sys.executable, "-c", "import time; time.sleep(600)"]
        pid_file.write_text(json.dumps(dict(record, command=[sys.executable, "train.py"])))
        assert not kill_stale(pid_file)
        assert is_running(run.pid) and not pid_file.exists()

        pid_file.write_text(json.dumps(record))
        assert kill_stale(pid_file)
        assert wait_for(lambda: not is_running(run.pid), 5)
    finally:
        run.kill()
        run.wait()


# ---------------------------------------------------------------------------
# Every stop message ends with a command that works when pasted
# ---------------------------------------------------------------------------

# Each stop: the backlog, the flags, what the message says, and whether the test runs the pasted command
# (the others check that it configures the same loop: the paste itself is the same code path).
STOPS = {
    "max-experiments": ((NS_1, MM_1), ("--max-experiments", "1"), "ran the 1 experiments asked for", True),
    "max-hours": ((NS_1, MM_1), ("--max-hours", "0.0001"), "hours have passed (--max-hours 0.0001)", False),
    "exhausted-backlog": ((NS_1,), (), "the backlog is exhausted", True),
    "crashes": ((ABL_1, ABL_2, NS_1), ("--max-crashes", "2"), "2 experiments crashed in a row", False),
}


@pytest.mark.parametrize("stop", STOPS, ids=list(STOPS))
def test_each_stop_prints_the_command_that_resumes_it(project: Project, stop: str):
    items, extra, reason, paste = STOPS[stop]
    argv = ["--backlog", project.backlog(*items), *extra, *FAST, "--tag", TAG]

    result = project.loop(*argv)

    assert result.returncode == 0, result.stdout + result.stderr
    last = messages(result.stdout)[-1]
    assert last.startswith("loop stopped: ") and reason in last, last
    assert "the report: python agent/report.py --tag t; " in last
    command = last.split("; resume: ")[1]
    assert command == shlex.join(["python", "agent/loop.py", *argv])
    same_config(argv, shlex.split(command)[2:])
    rows = project.rows()
    if not paste:
        return

    again = pasted(project, command)

    assert again.returncode == 0, again.stdout + again.stderr
    assert project.rows()[:len(rows)] == rows
    assert not any("baseline started" in line for line in messages(again.stdout))
    assert messages(again.stdout)[-1].startswith("loop stopped: ")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_loop_prints_the_command_that_resumes_it(project: Project, signum: int):
    hold = project.root.parent / "hold"
    hold.touch()
    env = {"FAKE_TRAIN_HOLD": str(hold)}
    argv = ["--tag", TAG, "--backlog", project.backlog(SLOW_1, NS_1), *FAST]
    loop = project.start(*argv, env=env)
    try:
        project.running_pid("003-SLOW-1")
        os.kill(loop.pid, signum)
        assert loop.wait(30) == 130, project.output()
    finally:
        loop.kill()
        loop.wait()
    last = messages(project.output())[-1]
    assert last.startswith("loop interrupted: ") and "(--tag t) to resume: " in last
    command = last.split("to resume: ")[1]
    assert command == shlex.join(["python", "agent/loop.py", *argv])
    if signum == signal.SIGINT:
        return  # the same message as SIGTERM's, whose pasted command runs below
    hold.unlink()

    again = pasted(project, command, env=env)

    assert again.returncode == 0, again.stdout + again.stderr
    assert [(r["experiment"], r["status"]) for r in project.rows()] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("SLOW-1", "discard"), ("NS-1", "keep")]


def test_the_demo_resumes_its_undated_tag_with_the_command_it_prints(project: Project):
    argv = ["--demo", "--max-experiments", "1", "--confirm-margin", "0"]

    first = project.loop(*argv)

    assert first.returncode == 0, first.stdout + first.stderr
    rows = project.rows("demo")
    assert [r["experiment"] for r in rows[:2]] == ["baseline", "baseline"] and {r["time_budget"] for r in rows} == {"20"}
    last = messages(first.stdout)[-1]
    command = last.split("; resume: ")[1]
    assert command == "python agent/loop.py --demo --max-experiments 1 --confirm-margin 0 --tag demo"

    again = pasted(project, command)  # as on the next day: the tag has no date in it

    assert again.returncode == 0, again.stdout + again.stderr
    assert project.rows("demo")[:len(rows)] == rows and len(project.rows("demo")) > len(rows)
    assert not any("baseline started" in line for line in messages(again.stdout))
    same_config(argv, ["--demo"] + argv[1:] + ["--tag", "demo"])

    # Without --demo the budget differs: the refusal says which flags resume the tag.
    plain = project.loop("--tag", "demo")
    assert plain.returncode == 2
    assert "resume it with --preset cpu --time-budget 20 (a demo tag: --demo)" in said(plain)[0]


# ---------------------------------------------------------------------------
# A failed baseline: the advice fits the cause
# ---------------------------------------------------------------------------

def test_a_baseline_timeout_on_an_unchanged_train_py_points_at_the_load_and_the_timeout(make_project, tmp_path):
    project = make_project(train_with(tmp_path, SLEEP=30))

    result = project.loop("--tag", TAG, "--backlog", project.backlog(NS_1), *FAST, "--timeout", "2")

    assert result.returncode == 2, result.stdout + result.stderr
    last = messages(result.stdout)[-1]
    assert last.startswith("loop: the baseline of your unchanged train.py timed out (ran past its 2 s timeout")
    assert "load average" in last and "--timeout 2," in last and "fix train.py" not in last
    command = last.split("e.g. resume: ")[1]
    assert command.endswith(" --timeout 4")
    assert build_config(parse_args(shlex.split(command)[2:])).timeout == 4
    assert [(r["experiment"], r["status"]) for r in project.rows()] == [("baseline", "timeout")]


def test_a_baseline_crash_says_whether_train_py_is_the_users_or_the_branchs(make_project, tmp_path):
    project = make_project(train_with(tmp_path, MATRIX_OPTIMIZER="adamw"))
    args = ("--tag", TAG, "--backlog", project.backlog(NS_1), *FAST)

    unchanged = project.loop(*args)

    assert unchanged.returncode == 2, unchanged.stdout + unchanged.stderr
    last = messages(unchanged.stdout)[-1]
    assert last.startswith("loop: the baseline of your unchanged train.py crashed (exit code 1: RuntimeError")
    assert "python prepare.py --force" in last and "fix train.py" not in last
    assert last.endswith("then resume: " + shlex.join(["python", "agent/loop.py", *args]))

    # The user fixes train.py in their checkout; the tag's branch still has the crashing one.
    (project.root / "train.py").write_text(FAKE_TRAIN.read_text())
    project.git("commit", "-qam", "train with muon again")

    differs = project.loop(*args)

    assert differs.returncode == 2, differs.stdout + differs.stderr
    last = messages(differs.stdout)[-1]
    assert "on a train.py that differs from your checkout's" in last
    assert "fix train.py on autoresearch/t (in " in last


# ---------------------------------------------------------------------------
# --remove-tag
# ---------------------------------------------------------------------------

def make_tag(project: Project, tag: str) -> list[dict[str, str]]:
    """A tag as a loop leaves it: worktree, branch, a kept ref, runs/<tag>, ledger rows."""
    branch = ExperimentBranch.open(project.root, tag)
    sha = branch.commit(f"X-1: {tag}", {"train.py": (project.root / "train.py").read_text() + f"# {tag}\n"})
    branch.keep_ref(sha, "003-X-1")
    (project.root / "runs" / tag / "003-X-1").mkdir(parents=True)
    (project.root / "runs" / tag / "003-X-1" / "train.log").write_text("step 00001\n")
    ledger = Ledger(project.ledger)
    for experiment in ("baseline", "X-1"):
        ledger.append(dict(commit=sha[:7], val_bpb=1.5, status="keep", description=experiment, tag=tag,
                           experiment=experiment))
    return ledger.rows(tag)


def test_remove_tag_asks_then_removes_only_that_tag(project: Project):
    t_rows, u_rows = make_tag(project, "t"), make_tag(project, "u")
    user = project.user_state()
    u_refs = project.git("for-each-ref", "refs/autoresearch/u/", "refs/heads/autoresearch/u")

    declined = subprocess.run([sys.executable, "agent/loop.py", "--remove-tag", "t"], cwd=project.root,
                              env=project.env, input="n\n", capture_output=True, text=True, timeout=60)

    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "the worktree " in declined.stdout and "the branch autoresearch/t" in declined.stdout
    assert "1 ref under refs/autoresearch/t/" in declined.stdout and "its 2 rows in " in declined.stdout
    assert "remove tag t? [y/N]" in declined.stdout
    assert declined.stderr.strip() == "loop: nothing removed; answer y to remove tag t, or pass --yes."
    assert project.branch("t") and (project.root / "runs" / "t").exists() and project.rows("t") == t_rows

    removed = subprocess.run([sys.executable, "agent/loop.py", "--remove-tag", "t"], cwd=project.root,
                             env=project.env, input="y\n", capture_output=True, text=True, timeout=60)

    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert removed.stdout.strip().endswith(f"removed tag t; its 2 ledger rows are in {project.ledger}.removed.")
    assert project.git("for-each-ref", "refs/autoresearch/t/", "refs/heads/autoresearch/t") == ""
    assert not (project.root / "worktrees" / "t").exists() and not (project.root / "runs" / "t").exists()
    assert str(project.root / "worktrees" / "t") not in project.git("worktree", "list")
    assert project.rows("t") == []
    assert Ledger(project.root / "experiments.tsv.removed").rows() == t_rows
    # Another tag and the user's checkout are as they were.
    assert project.rows("u") == u_rows
    assert project.git("for-each-ref", "refs/autoresearch/u/", "refs/heads/autoresearch/u") == u_refs
    assert (project.root / "worktrees" / "u" / "train.py").exists() and (project.root / "runs" / "u").exists()
    assert project.user_state() == user

    again = project.loop("--remove-tag", "t", "--yes")
    assert again.returncode == 2 and said(again) == [
        "loop: there is nothing of tag t to remove: no branch autoresearch/t, worktree, refs, runs directory "
        "or ledger rows."]


def test_remove_tag_is_refused_while_a_loop_holds_the_tag(project: Project):
    rows = make_tag(project, "t")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from agent.lock import TagLock
        lock = TagLock({str(project.root / "runs" / "t")!r}, "t").acquire(["python", "agent/loop.py", "--tag", "t"])
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = project.loop("--remove-tag", "t", "--yes")
    finally:
        holder.kill()
        holder.wait()

    assert result.returncode == 2
    assert len(said(result)) == 1 and f"tag t is in use by a running loop (PID {holder.pid}, " in said(result)[0]
    assert said(result)[0].endswith("stop it first (Ctrl-C in its terminal), then remove the tag.")
    assert project.branch("t") and (project.root / "runs" / "t" / "003-X-1").exists() and project.rows("t") == rows


# ---------------------------------------------------------------------------
# Small refusals: one sentence, nothing written
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("tag, phrase", [
    ("", "--tag is empty, and an empty tag cannot name a git branch: give the run a name"),
    ("a..b", "the tag 'a..b' cannot name a git branch"),
    ("night run", "the tag 'night run' cannot name a git branch"),
    ("x.lock", "the tag 'x.lock' cannot name a git branch"),
])
def test_a_tag_git_would_refuse_gets_one_sentence(capsys, tag: str, phrase: str):
    assert main(["--tag", tag]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"loop: {phrase}") and len(err.strip().splitlines()) == 1
    assert main(["--remove-tag", tag, "--yes"]) == 2
    assert phrase in capsys.readouterr().err


def test_a_backlog_without_edits_is_refused_before_any_baseline(project: Project):
    backlog = project.backlog(("PR-1", None), ("PR-2", None))

    result = project.loop("--tag", TAG, "--backlog", backlog, "--proposer", "backlog", *FAST)

    assert result.returncode == 2 and len(said(result)) == 1
    assert messages(result.stdout) == [f"loop: {backlog} has no item with a machine-readable edit, so the backlog proposer has "
                            "nothing to run: add edits to it (see agent/backlog.md's Edits section) or use "
                            "--proposer claude."]
    assert not project.ledger.exists() and not (project.root / "runs").exists()


def test_program_md_states_the_judge_and_the_package_rule():
    text = (REPO_ROOT / "program.md").read_text()
    assert "twice the spread" not in text
    assert "k x sigma" in text and "the loop's judge, see README" in text
    assert "may not install packages" in text and "torch, numpy" in text


def test_remove_tag_never_touches_a_checkout_on_the_tags_branch(project: Project):
    make_tag(project, "t")
    project.git("worktree", "remove", "--force", str(project.root / "worktrees" / "t"))
    project.git("checkout", "-q", "autoresearch/t")
    user = project.user_state()

    result = project.loop("--remove-tag", "t", "--yes")

    assert result.returncode == 2 and said(result) == [
        f"loop: autoresearch/t is checked out in {project.root.resolve()}: switch that checkout to another branch "
        "first; the tag's removal never touches your checkouts."]
    assert project.user_state() == user and (project.root / "runs" / "t").exists() and project.rows("t")
