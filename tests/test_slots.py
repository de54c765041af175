"""Slots end to end: agent/loop.py --gpus 0,1 as a real subprocess, with the stand-in train.py of
tests/test_loop.py on two fake GPUs (the slots' CUDA_VISIBLE_DEVICES; nothing here needs one).

Each stand-in run prints where and when it ran; the ledger, git and /proc say the rest. Two runs at once
on two cores would contend over the CPU, so these runs sleep rather than train, and the contention
tolerance is set out of the way (tests/test_fair_runs.py tests contention).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from agent.slots import merge_onto, parse_gpus
from agent.stops import UserError
from test_loop import (FAST, NS_1, TAG, Project, cache, is_running, make_project, messages, no_stray_processes,  # noqa: F401
                       processes_under, project, run_git, wait_for)

SLOTS = ("--gpus", "0,1", "--contention-tolerance", "20")
RAN = re.compile(r"fake ran: CUDA_VISIBLE_DEVICES=(\S*) from ([\d.]+) to ([\d.]+)")


def runs_by_slot(project: Project) -> dict[str, list[tuple[float, float, str]]]:
    """Every stand-in run under runs/<tag>: (start, end, run directory) per CUDA_VISIBLE_DEVICES."""
    slots: dict[str, list[tuple[float, float, str]]] = {}
    for log in sorted(project.runs.glob("*/train.log")):
        ran = RAN.search(log.read_text())
        if ran:
            slots.setdefault(ran.group(1), []).append((float(ran.group(2)), float(ran.group(3)), log.parent.name))
    return slots


def overlap(a: tuple[float, float, str], b: tuple[float, float, str]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def test_parse_gpus_names_one_slot_per_gpu():
    assert parse_gpus("0,1,3", lambda: 8) == ("0", "1", "3")
    assert parse_gpus(None, lambda: 2) == ("0", "1")
    assert parse_gpus(None, lambda: 0) == ("cpu",)
    with pytest.raises(UserError, match="names a GPU twice"):
        parse_gpus("0,0", lambda: 2)
    with pytest.raises(UserError, match="GPU indices separated by commas"):
        parse_gpus("0;1", lambda: 2)


def test_a_stale_win_merges_onto_the_new_best(tmp_path: Path):
    run_git(tmp_path, "init", "-q")
    lines = [f"X{i} = {i}" for i in range(20)]

    def commit(text: list[str], message: str) -> str:
        (tmp_path / "train.py").write_text("\n".join(text) + "\n")
        run_git(tmp_path, "add", "train.py")
        run_git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
        return run_git(tmp_path, "rev-parse", "HEAD")

    base = commit(lines, "base")
    near = commit(lines[:2] + ["X2 = 'near'"] + lines[3:], "near the top")
    run_git(tmp_path, "checkout", "-q", base)
    far = commit(lines[:17] + ["X17 = 'far'"] + lines[18:], "near the end")
    merged = merge_onto(tmp_path, base, far, near)
    assert merged == "\n".join(lines[:2] + ["X2 = 'near'"] + lines[3:17] + ["X17 = 'far'"] + lines[18:]) + "\n"
    run_git(tmp_path, "checkout", "-q", base)
    next_line = commit(lines[:3] + ["X3 = 'next'", "ADDED = 1"] + lines[4:], "the line after near's, and one more")
    assert merge_onto(tmp_path, base, next_line, near) == "\n".join(
        lines[:2] + ["X2 = 'near'", "X3 = 'next'", "ADDED = 1"] + lines[4:]) + "\n"  # neighbours do not conflict
    run_git(tmp_path, "checkout", "-q", base)
    same_line = commit(lines[:2] + ["X2 = 'other'"] + lines[3:], "the same line")
    assert merge_onto(tmp_path, base, same_line, near) is None


def test_two_slots_run_at_once_never_two_on_one_gpu_and_record_one_row_per_run(project: Project):
    items = [(f"MM-{i}", f"MUON_MOMENTUM_START = 0.{80 + i}; SLEEP = 3") for i in range(1, 4)]
    backlog = project.backlog(NS_1, *items)

    result = project.loop("--tag", TAG, "--backlog", backlog, *FAST, *SLOTS)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert sorted(r["experiment"] for r in rows) == ["MM-1", "MM-2", "MM-3", "NS-1", "baseline", "baseline"]
    ns = next(r for r in rows if r["experiment"] == "NS-1")  # a keep on one run is confirmed on the other slot
    assert ns["runs"] == "2" and "confirmed on a second slot" in ns["reason"], ns
    where = {run: cvd for cvd, runs in runs_by_slot(project).items() for _, _, run in runs}
    assert where["003-NS-1"] != where["003-NS-1-run2"], where
    assert [(r["experiment"], r["status"]) for r in rows[:2]] == [("baseline", "keep"), ("baseline", "baseline")]
    assert {r["experiment"]: r["status"] for r in rows}["NS-1"] == "keep"
    assert len({(r["experiment"], r["commit"], r["seed"]) for r in rows}) == len(rows)
    slots = runs_by_slot(project)
    assert set(slots) == {"0", "1"}, slots
    for runs in slots.values():  # one GPU, one run at a time
        runs.sort()
        assert all(overlap(a, b) < 0 for a, b in zip(runs, runs[1:])), runs
    assert max(overlap(a, b) for a in slots["0"] for b in slots["1"]) > 1.0, slots  # the 3 s runs ran side by side
    assert len(sum(slots.values(), [])) == len(rows) + 1  # every run is a row's (NS-1 has two); nothing ran twice
    kept = [r for r in rows if r["status"] == "keep" and r["experiment"] != "baseline"]
    assert project.branch() == project.sha(kept[-1]["commit"])
    assert project.git("status", "--porcelain") == ""
    assert processes_under(project.root.parent) == []

    removed = project.loop("--remove-tag", TAG, "--yes")  # the slots' worktrees go with the tag
    assert removed.returncode == 0 and "3 slot worktrees beside it" in removed.stdout, removed.stdout + removed.stderr
    assert project.git("worktree", "list", "--porcelain").count("worktree ") == 1


def test_a_stale_win_is_merged_onto_the_new_best_and_runs_again(project: Project):
    # NS-1 (kept) ends while BETA-1 still runs; BETA-1 beats the baseline it started from by ~0.015 but not
    # NS-1's ~0.06: a stale win, merged onto NS-1 and run again, where it beats NS-1 as well.
    backlog = project.backlog(NS_1, ("BETA-1", "MUON_BETA2 = 3.0; SLEEP = 5"))

    result = project.loop("--tag", TAG, "--backlog", backlog, *FAST, *SLOTS, "--max-runs", "1")

    assert result.returncode == 0, result.stdout + result.stderr
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("NS-1", "keep"), ("BETA-1", "stale"), ("BETA-1", "keep")]
    base, ns, stale, again = rows[1], rows[2], rows[3], rows[4]
    assert stale["parent"] == base["commit"] and again["parent"] == ns["commit"]
    assert "stale win: it beat the commit it started from" in stale["reason"]
    assert f"re-applied onto the new best {ns['commit']} and queued to run again" in stale["reason"]
    assert float(stale["val_bpb"]) < float(base["val_bpb"]) - 0.01
    tip = project.branch()
    assert tip == project.sha(again["commit"])
    source = project.git("show", f"{tip}:train.py")
    assert "MUON_NS_STEPS = 3" in source and "MUON_BETA2 = 3.0" in source
    assert project.sha(f"refs/autoresearch/{TAG}/004-BETA-1") == project.sha(stale["commit"])  # still reachable
    report = project.report("--tag", TAG)
    assert report.returncode == 0 and "1 stale" in report.stdout, report.stdout + report.stderr


def test_a_run_killed_from_outside_runs_once_more_and_is_not_a_crash(project: Project):
    backlog = project.backlog(("MM-1", "MUON_MOMENTUM_START = 0.9; SLEEP = 6"))
    loop = project.start("--tag", TAG, "--backlog", backlog, *FAST, *SLOTS)
    try:
        log = project.runs / "003-MM-1" / "train.log"
        assert wait_for(lambda: log.exists() and "step 00002" in log.read_text(), 240), project.output()
        pid_files = list(project.runs.glob("train-slot-*.pid"))
        assert len(pid_files) == 1, pid_files
        os.kill(json.loads(pid_files[0].read_text())["pid"], signal.SIGKILL)
        assert loop.wait(240) == 0, project.output()
    finally:
        loop.kill()
    rows = project.rows()
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("baseline", "keep"), ("baseline", "baseline"), ("MM-1", "discard")], project.output()
    assert any(m.startswith("003-MM-1 was killed by SIGKILL, not by an error of its own: running it once more")
               for m in messages(project.output())), project.output()
    assert (project.runs / "003-MM-1-rerun" / "train.log").exists()
    assert processes_under(project.root.parent) == []


def test_a_killed_driver_resumes_with_nothing_lost_doubled_or_left_running(project: Project):
    hold = project.root.parent / "hold"  # the stand-in trains until it is gone; its worker lives 60 s regardless
    hold.touch()
    items = [("MM-1", "MUON_MOMENTUM_START = 0.9; SLEEP = 30"), ("MM-2", "MUON_MOMENTUM_START = 0.8; SLEEP = 30"), NS_1]
    backlog = project.backlog(*items)
    args = ("--tag", TAG, "--backlog", backlog, *FAST, *SLOTS, "--max-runs", "1")
    loop = project.start(*args, env={"FAKE_TRAIN_HOLD": str(hold)})
    try:
        logs = [project.runs / name / "train.log" for name in ("003-MM-1", "004-MM-2")]
        assert wait_for(lambda: all(log.exists() and "step 00002" in log.read_text() for log in logs), 240), project.output()
        assert [r["experiment"] for r in project.rows()] == ["baseline", "baseline"]
        os.kill(loop.pid, signal.SIGKILL)
        assert loop.wait(30) == -signal.SIGKILL
    finally:
        loop.kill()
        loop.wait()
    assert len(list(project.runs.glob("train-slot-*.pid"))) == 2  # what the next loop finds
    hold.unlink()

    result = project.loop(*args, env={"FAKE_TRAIN_HOLD": str(hold)})

    assert result.returncode == 0, result.stdout + result.stderr
    said = messages(result.stdout)
    assert sum("that a previous, killed loop left behind" in m for m in said) == 2, said
    rows = project.rows()
    assert sorted((r["experiment"], r["status"]) for r in rows[2:]) == [
        ("MM-1", "discard"), ("MM-2", "discard"), ("NS-1", "keep")], said
    assert project.branch() == project.sha(next(r["commit"] for r in rows if r["experiment"] == "NS-1"))
    assert not list(project.runs.glob("train-slot-*.pid"))
    assert processes_under(project.root.parent) == []
    assert project.git("status", "--porcelain") == ""
