"""Run train.py as a subprocess in its own process group, log its output, and kill it on timeout.

Nothing it starts may outlive it: a timeout, an exception or a normal exit all end with the whole
process group killed, and on Linux the child dies with the loop (PR_SET_PDEATHSIG) even when the
loop is SIGKILLed. A pid file lets the next loop kill what such a death left behind (`kill_stale`).
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from agent.probe import GpuProcess, GpuWatch
from agent.summary import Progress, Summary, parse_progress, parse_summary

_SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.1
_TAIL_LINES = 40
_CPU_SCAN_SECONDS = 1.0  # between scans of /proc for the group's processes; the leader is read every poll
_GPU_POLL_SECONDS = 5.0  # between nvidia-smi queries for other processes on the run's GPU
_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1
# Loaded here, not in the forked child, where loading a library could deadlock on a lock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if _LINUX else None


def _is_secret(name: str) -> bool:
    upper = name.upper()
    return upper.endswith(_SECRET_SUFFIXES) or "API_KEY" in upper or upper.startswith("ANTHROPIC_")


def training_env(
    *,
    preset: str,
    time_budget: float,
    seed: int,
    run_dir: Path,
    cache: Path | None,
    base: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """`base` without secrets or inherited AUTORESEARCH_* settings, plus this run's settings."""
    env = {
        name: value
        for name, value in base.items()
        if not _is_secret(name) and not name.upper().startswith("AUTORESEARCH_")
    }
    env["AUTORESEARCH_PRESET"] = preset
    budget = float(time_budget)
    env["AUTORESEARCH_TIME_BUDGET"] = str(int(budget)) if budget.is_integer() else str(budget)
    env["AUTORESEARCH_SEED"] = str(seed)
    env["AUTORESEARCH_RUN_DIR"] = str(run_dir)
    if cache is not None:
        env["AUTORESEARCH_CACHE"] = str(cache)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def default_timeout(time_budget: float, startup: float = 120.0) -> float:
    """Seconds after which a run counts as hung: room for compile, eval and a slow first step."""
    return 2.5 * time_budget + startup


@dataclass(frozen=True)
class RunOutcome:
    """How one run of train.py ended."""

    status: Literal["ok", "crash", "timeout"]
    summary: Summary | None
    reason: str
    returncode: int | None
    wall_seconds: float
    progress_times: tuple[float, ...]  # when each progress line arrived, seconds after the start
    log_path: Path
    tail: str
    cpu_seconds: float | None = None  # user + system CPU time of the process group; None off Linux
    gpu_sharers: tuple[GpuProcess, ...] | None = None  # others on the run's GPU; None when not watched

    @property
    def cpu_per_second(self) -> float | None:
        """CPU-seconds the run's process group got per wall second: less than usual means it shared the CPUs."""
        if self.cpu_seconds is None or self.wall_seconds <= 0:
            return None
        return self.cpu_seconds / self.wall_seconds

    @property
    def progress_seconds(self) -> float | None:
        """Training time by the runner's own clock: first to last progress line."""
        return self.progress_times[-1] - self.progress_times[0] if self.progress_times else None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    stat = _proc_stat(pid) if _LINUX else None
    return stat[19] if stat else None


def _command_line(pid: int) -> list[str] | None:
    """The process's argv from /proc, or None when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode("utf-8", errors="replace").split("\0")[:-1] if raw else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _group_alive(pgid: int) -> bool:
    """Whether a process that is not a zombie is still in the group."""
    if not _LINUX:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[2] == str(pgid) and stat[0] not in ("Z", "X"):
                return True
    return False


class _GroupCpu:
    """The CPU time of a process group from /proc: each member's last seen utime + stime, summed.

    The leader is read at every poll, the rest of the group once per scan, so a member that lives
    shorter than a scan, and the leader's last poll interval, go uncounted.
    """

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.ticks: dict[int, int] = {}
        self.pids = frozenset({pgid})  # replaced whole, so the GPU thread reads a consistent set
        self.next_scan = 0.0

    def _record(self, pid: int) -> None:
        stat = _proc_stat(pid)
        if stat and stat[2] == str(self.pgid):
            self.ticks[pid] = max(self.ticks.get(pid, 0), int(stat[11]) + int(stat[12]))

    def sample(self) -> None:
        if not _LINUX:
            return
        self._record(self.pgid)
        if time.monotonic() >= self.next_scan:
            self.next_scan = time.monotonic() + _CPU_SCAN_SECONDS
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    self._record(int(entry.name))
            self.pids = frozenset(self.ticks)

    @property
    def seconds(self) -> float | None:
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK") if _LINUX else None


class _GpuSharers(threading.Thread):
    """Polls nvidia-smi while the run lasts for processes on its GPU that are neither its own nor the harness's."""

    def __init__(self, watch: GpuWatch, cpu: _GroupCpu) -> None:
        super().__init__(daemon=True)
        self.watch = watch
        self.cpu = cpu
        self.found: dict[int, GpuProcess] = {}
        self.known = False
        self.stopped = threading.Event()

    def _in_group(self, pid: int) -> bool:
        """A member now, or one seen before (nvidia-smi may still list a member that just exited)."""
        stat = _proc_stat(pid)
        return pid in self.cpu.pids or (stat is not None and stat[2] == str(self.cpu.pgid))

    def _poll(self) -> None:
        others = self.watch.others()
        if others is not None:
            self.known = True
            for process in others:
                if not self._in_group(process.pid):
                    self.found.setdefault(process.pid, process)

    def run(self) -> None:
        self._poll()
        while not self.stopped.wait(_GPU_POLL_SECONDS):
            self._poll()
        self._poll()  # what ran beside the run's last seconds

    def sharers(self) -> tuple[GpuProcess, ...] | None:
        self.stopped.set()
        self.join()
        return tuple(self.found.values()) if self.known else None


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    """SIGKILL the group and wait (briefly) until none of it is left running."""
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _GRACE_SECONDS
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _end_group(pgid: int, process: subprocess.Popen) -> None:
    """SIGTERM the group, give the leader a grace period to exit, then SIGKILL the group."""
    _signal_group(pgid, signal.SIGTERM)
    try:
        process.wait(_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(pgid)
    process.wait()


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the loop died before the request took effect
            os._exit(1)

    return preexec


def _read_output(stream: io.BufferedReader, log: BinaryIO, lines: queue.Queue) -> None:
    """Copy the raw output to the log as it comes; queue (arrival time, line) for each line."""
    pending = b""
    with log:
        while chunk := stream.read1(65536):
            log.write(chunk)
            log.flush()
            now = time.monotonic()
            *complete, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for raw in complete:
                if raw.strip():
                    lines.put((now, raw.decode("utf-8", errors="replace")))
        if pending.strip():
            lines.put((time.monotonic(), pending.decode("utf-8", errors="replace")))
    lines.put(None)


def _write_pid_file(pid_file: Path, pid: int) -> None:
    record = {"pid": pid, "pgid": pid, "start": _start_time(pid), "boot": _boot_id(), "command": _command_line(pid)}
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    partial = pid_file.with_name(pid_file.name + ".partial")
    partial.write_text(json.dumps(record))
    partial.replace(pid_file)


def kill_stale(pid_file: Path) -> bool:
    """SIGKILL the process group a killed loop left running, if any; remove the pid file.

    The group is only killed when it is still the recorded one: same boot, and its leader either
    gone (Linux keeps a group's id from being reused while members remain) or started at the
    recorded time with the recorded command line. Only the loop that holds the tag's lock may call
    this (agent/lock.py): any other would kill a live loop's run.
    """
    if not pid_file.exists():
        return False
    try:
        record = json.loads(pid_file.read_text())
        pgid = int(record["pgid"])
    except (ValueError, KeyError, TypeError):
        pid_file.unlink(missing_ok=True)
        return False
    leader = _proc_stat(pgid) if _LINUX else None
    if leader is None or leader[0] in ("Z", "X"):  # gone, or a zombie: its id is not free for reuse yet
        same_leader = True
    else:
        same_leader = leader[19] == record.get("start") and _command_line(pgid) == record.get("command")
    same_run = record.get("boot") == _boot_id() and same_leader
    killed = same_run and _group_alive(pgid)
    if killed:
        _kill_group(pgid)
    pid_file.unlink(missing_ok=True)
    return killed


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _crash_reason(returncode: int, last_line: str) -> str:
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    return f"{how}: {last_line}" if last_line else f"{how} with no output"


def run_training(
    workdir: Path,
    env: Mapping[str, str],
    log_path: Path,
    timeout: float,
    *,
    on_line: Callable[[str], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    command: Sequence[str] = (sys.executable, "train.py"),
    pid_file: Path | None = None,
    gpu_watch: GpuWatch | None = None,
) -> RunOutcome:
    """Run `command` in `workdir` until it exits or `timeout` seconds pass; how it ended.

    The outcome carries the CPU time the run's process group got and, given a `gpu_watch`
    (`Probe.gpu_watch`), the other processes seen on the run's GPU while it ran.

    Callbacks run in the calling thread; an exception from them (or a KeyboardInterrupt) kills the
    run's process group and propagates. On Linux the run dies when the calling thread does.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + timeout
    log = open(log_path, "wb")
    try:
        process = subprocess.Popen(
            list(command),
            cwd=workdir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if _LINUX else None,
        )
    except BaseException:
        log.close()
        raise
    pgid = process.pid
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_output, args=(process.stdout, log, lines), daemon=True)
    reader.start()
    progress_times: list[float] = []
    cpu = _GroupCpu(pgid)
    gpu = _GpuSharers(gpu_watch, cpu) if gpu_watch is not None else None
    if gpu is not None:
        gpu.start()

    def handle(item: tuple[float, str]) -> None:
        arrived, line = item
        if on_line is not None:
            on_line(line)
        progress = parse_progress(line)
        if progress is not None:
            progress_times.append(arrived - started)
            if on_progress is not None:
                on_progress(progress)

    timed_out = False
    try:
        if pid_file is not None:
            _write_pid_file(pid_file, process.pid)
        while process.poll() is None:
            cpu.sample()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                _end_group(pgid, process)
                break
            try:
                item = lines.get(timeout=min(_POLL_SECONDS, remaining))
            except queue.Empty:
                continue
            if item is not None:
                handle(item)
        _kill_group(pgid)
    except BaseException:
        _end_group(pgid, process)
        raise
    finally:
        reader.join(_GRACE_SECONDS)
        # Closing the pipe under a reader still blocked on it (a process that left the group
        # holds it open) would block on the reader's lock; the daemon thread ends with that process.
        if not reader.is_alive():
            process.stdout.close()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        gpu_sharers = gpu.sharers() if gpu is not None else None
    while not lines.empty():
        item = lines.get_nowait()
        if item is not None:
            handle(item)

    text = log_path.read_bytes().decode("utf-8", errors="replace")
    summary = parse_summary(text)
    returncode = process.returncode
    if timed_out:
        status, returncode = "timeout", None
        reason = f"ran past its {timeout:g} s timeout; killed its process group"
    elif returncode != 0:
        status, reason = "crash", _crash_reason(returncode, _last_line(text))
    elif summary is None:
        status, reason = "crash", "exited 0 without a summary block"
    elif not math.isfinite(summary.val_bpb):
        status, reason = "crash", f"exited 0 with val_bpb {summary.get('val_bpb')}"
    else:
        status, reason = "ok", "exited 0 with a summary block"
    tail_lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return RunOutcome(
        status=status,
        summary=summary,
        reason=reason,
        returncode=returncode,
        wall_seconds=time.monotonic() - started,
        progress_times=tuple(progress_times),
        log_path=log_path,
        tail="\n".join(tail_lines[-_TAIL_LINES:]),
        cpu_seconds=cpu.seconds,
        gpu_sharers=gpu_sharers,
    )
