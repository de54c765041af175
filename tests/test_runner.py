"""run_training, training_env and kill_stale with fake train scripts run as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.runner import default_timeout, kill_stale, run_training, training_env
from agent.summary import Progress

REPO_ROOT = Path(__file__).resolve().parents[1]
PROGRESS = (
    "step {step:05d} ({percent:.1f}%) | loss: 4.123456 | lrm: 1.00 | dt: 412ms | tok/sec: 19,876 "
    "| mfu: 0.0% | epoch: 1 | remaining: 38s"
)
SUMMARY = "---\\nval_bpb: 1.5\\nval_loss: 3.2\\nnum_steps: 3\\npreset: cpu\\n"


def write_script(workdir: Path, body: str) -> None:
    (workdir / "train.py").write_text(textwrap.dedent(body))


def is_running(pid: int) -> bool:
    """True for a live process; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path):
    """Whatever a failing test leaves running is killed, so a failure cannot leak sleepers."""
    yield
    for name in ("child.pid", "train.pid"):
        pid_path = tmp_path / name
        if pid_path.exists() and is_running(pid := int(pid_path.read_text())):
            os.kill(pid, signal.SIGKILL)


def env(tmp_path: Path) -> dict[str, str]:
    return training_env(preset="cpu", time_budget=2, seed=1, run_dir=tmp_path / "run", cache=None)


# A script that starts a sleeping child in its own process group, writes the child's pid, and
# prints `started`; the child ignores SIGTERM, so only the runner's SIGKILL can end it.
SPAWN_CHILD = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open("child.pid", "w").write(str(child.pid))
print("started", flush=True)
"""


def test_ok_run_parses_progress_and_summary(tmp_path: Path) -> None:
    lines = [PROGRESS.format(step=step, percent=percent) for step, percent in [(1, 10.0), (2, 50.0), (3, 95.5)]]
    write_script(tmp_path, f"""
        import sys, time
        sys.stdout.write("warming up\\n" + {lines[0]!r} + "\\r")
        sys.stdout.flush()
        time.sleep(0.3)
        sys.stdout.write({lines[1]!r} + "\\r" + {lines[2]!r} + "\\n")
        sys.stdout.write("{SUMMARY}")
    """)
    seen_lines: list[str] = []
    seen_progress: list[Progress] = []

    outcome = run_training(
        tmp_path, env(tmp_path), tmp_path / "logs" / "run.log", 20,
        on_line=seen_lines.append, on_progress=seen_progress.append,
    )

    assert outcome.status == "ok", outcome.reason
    assert outcome.returncode == 0
    assert outcome.summary is not None and outcome.summary.val_bpb == 1.5
    assert outcome.summary.number("num_steps") == 3
    assert [p.step for p in seen_progress] == [1, 2, 3]
    assert seen_progress[2].percent == 95.5 and seen_progress[2].tokens_per_second == 19876
    assert seen_lines[:4] == ["warming up", *lines]
    assert outcome.progress_seconds is not None and 0.2 < outcome.progress_seconds < 5
    assert outcome.wall_seconds >= outcome.progress_seconds
    assert b"\r" in outcome.log_path.read_bytes()
    assert outcome.tail.splitlines()[-1] == "preset: cpu"


def test_exit_code_1_is_a_crash_with_the_last_line(tmp_path: Path) -> None:
    write_script(tmp_path, """
        print("step 00001 (1.0%) | loss: nan")
        raise ValueError("loss is nan at step 1")
    """)
    outcome = run_training(tmp_path, env(tmp_path), tmp_path / "run.log", 20)
    assert outcome.status == "crash"
    assert outcome.returncode == 1
    assert outcome.reason == "exit code 1: ValueError: loss is nan at step 1"
    assert outcome.summary is None
    assert "Traceback" in outcome.tail


def test_exit_0_without_summary_is_a_crash(tmp_path: Path) -> None:
    write_script(tmp_path, 'print("done, but no summary")\n')
    outcome = run_training(tmp_path, env(tmp_path), tmp_path / "run.log", 20)
    assert outcome.status == "crash"
    assert outcome.reason == "exited 0 without a summary block"
    assert outcome.progress_seconds is None


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    write_script(tmp_path, SPAWN_CHILD + "time.sleep(600)\n")
    started = time.monotonic()

    outcome = run_training(tmp_path, env(tmp_path), tmp_path / "run.log", 2)

    assert outcome.status == "timeout"
    assert outcome.reason == "ran past its 2 s timeout; killed its process group"
    assert outcome.returncode is None
    assert 2 <= time.monotonic() - started < 6
    child = int((tmp_path / "child.pid").read_text())
    assert not is_running(child)


def test_normal_exit_kills_what_the_script_left_behind(tmp_path: Path) -> None:
    # The child keeps the output pipe open: the run must still end when the script exits.
    write_script(tmp_path, SPAWN_CHILD + f'sys.stdout.write("{SUMMARY}")\n')
    outcome = run_training(tmp_path, env(tmp_path), tmp_path / "run.log", 20)
    assert outcome.status == "ok"
    assert outcome.wall_seconds < 10
    assert not is_running(int((tmp_path / "child.pid").read_text()))


def test_an_exception_in_a_callback_kills_the_group_and_propagates(tmp_path: Path) -> None:
    write_script(tmp_path, SPAWN_CHILD + "time.sleep(600)\n")
    pid_file = tmp_path / "train.pid"
    recorded: list[dict] = []

    def interrupt(line: str) -> None:
        recorded.append(json.loads(pid_file.read_text()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tmp_path, env(tmp_path), tmp_path / "run.log", 20, on_line=interrupt, pid_file=pid_file)

    assert recorded[0]["pid"] == recorded[0]["pgid"]
    assert not is_running(recorded[0]["pid"])
    assert not is_running(int((tmp_path / "child.pid").read_text()))
    assert not pid_file.exists()


def test_training_env_drops_secrets_and_sets_the_run(tmp_path: Path) -> None:
    base = {
        "PATH": os.environ["PATH"],
        "HOME": "/home/researcher",
        "ANTHROPIC_API_KEY": "sk-ant-1",
        "ANTHROPIC_BASE_URL": "http://localhost",
        "OPENAI_API_KEY_2": "sk-2",
        "GITHUB_TOKEN": "ghp",
        "FOO_SECRET": "s",
        "DB_PASSWORD": "p",
        "AWS_ACCESS_KEY": "a",
        "AUTORESEARCH_PRESET": "gpu",
        "AUTORESEARCH_CACHE": "/stale/cache",
    }
    run_env = training_env(
        preset="cpu", time_budget=60, seed=7, run_dir=tmp_path / "run", cache=tmp_path / "cache", base=base
    )
    write_script(tmp_path, "import json, os; print(json.dumps(dict(os.environ)))\n")

    outcome = run_training(tmp_path, run_env, tmp_path / "run.log", 20)
    seen = json.loads(outcome.log_path.read_text())

    assert seen["PATH"] == base["PATH"] and seen["HOME"] == base["HOME"]
    for secret in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY_2", "GITHUB_TOKEN",
                   "FOO_SECRET", "DB_PASSWORD", "AWS_ACCESS_KEY"):
        assert secret not in seen
    assert seen["AUTORESEARCH_PRESET"] == "cpu"
    assert seen["AUTORESEARCH_TIME_BUDGET"] == "60"
    assert seen["AUTORESEARCH_SEED"] == "7"
    assert seen["AUTORESEARCH_RUN_DIR"] == str(tmp_path / "run")
    assert seen["AUTORESEARCH_CACHE"] == str(tmp_path / "cache")
    assert seen["PYTHONUNBUFFERED"] == "1"
    assert "AUTORESEARCH_CACHE" not in training_env(
        preset="cpu", time_budget=2.5, seed=1, run_dir=tmp_path, cache=None, base=base
    )
    assert default_timeout(300) == 870.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_killed_loop_takes_its_run_along_and_kill_stale_cleans_up(tmp_path: Path) -> None:
    write_script(tmp_path, SPAWN_CHILD + """
open("train.pid", "w").write(str(__import__("os").getpid()))
time.sleep(600)
""")
    pid_file = tmp_path / "state" / "run.pid"
    loop = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from agent.runner import run_training
        workdir = Path({str(tmp_path)!r})
        run_training(workdir, {{"PATH": ""}}, workdir / "run.log", 60, pid_file=Path({str(pid_file)!r}))
    """)])
    try:
        assert wait_for(lambda: (tmp_path / "train.pid").exists() and pid_file.exists(), 10)
        train = int((tmp_path / "train.pid").read_text())
        child = int((tmp_path / "child.pid").read_text())
    finally:
        loop.kill()
        loop.wait()

    assert wait_for(lambda: not is_running(train)), "train.py outlived the loop"
    assert is_running(child)
    assert json.loads(pid_file.read_text())["pgid"] == train

    assert kill_stale(pid_file)
    assert not is_running(child)
    assert not pid_file.exists()
    assert not kill_stale(pid_file)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_stale_spares_a_group_that_is_not_the_recorded_run(tmp_path: Path) -> None:
    pid_file = tmp_path / "run.pid"
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    finished = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    finished.wait()
    pid_file.write_text(json.dumps({"pid": finished.pid, "pgid": finished.pid, "start": None, "boot": boot}))
    assert not kill_stale(pid_file)
    assert not pid_file.exists()

    # A live group whose leader started at another time: its id was reused by someone else.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        pid_file.write_text(json.dumps({"pid": other.pid, "pgid": other.pid, "start": "1", "boot": boot}))
        assert not kill_stale(pid_file)
        assert is_running(other.pid)
        assert not pid_file.exists()
    finally:
        other.kill()
        other.wait()
