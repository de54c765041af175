"""The machine-speed probe and the contention rule: did a run have its machine to itself?

A fixed wall-clock budget means a run that shared its machine got fewer steps, so its val_bpb
measures the load, not the change. Before and after every run the loop asks a `Probe` to time a
fixed matmul workload on the run's device (`agent/probe_worker.py`, one process started once and
asked over a pipe, so train.py can never touch it and torch is imported once). `contention` then
compares the probes, the run's own CPU time and the other processes seen on its GPU with the
reference run (the tag's first baseline), and says in one sentence why a run was not alone.

    with Probe("cpu", env).open() as probe:
        before = probe.measure()
        outcome = run_training(..., gpu_watch=probe.gpu_watch)
        after = probe.measure()
        reference = reference or Reference.from_run(before, after, outcome)
        why = contention(before, after, reference, outcome, tolerance=0.10)
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # the runner imports this module for GpuWatch
    from agent.runner import RunOutcome

WORKER = Path(__file__).with_name("probe_worker.py")
STARTUP_SECONDS = 120.0  # the worker's start: importing torch, a CUDA context, one warm-up
MEASURE_SECONDS = 60.0  # one probe; a worker silent this long is broken, not slow
NVIDIA_SMI_SECONDS = 10.0  # one nvidia-smi query
CPU_BUSY = 0.5  # CPU-seconds per second above which the reference run counts as CPU-bound
# A candidate's own change moves its CPU use by less than this; a hog on the same cores takes a third or more.
CPU_TOLERANCE = 0.25


class ProbeError(RuntimeError):
    """The probe's worker could not start or stopped answering; the message says what it printed."""


@dataclass(frozen=True)
class GpuProcess:
    """A process that nvidia-smi lists on a GPU."""

    pid: int
    name: str
    used_mib: float | None

    def describe(self) -> str:
        memory = f", {self.used_mib:.0f} MiB" if self.used_mib is not None else ""
        return f"pid {self.pid}, {self.name}{memory}"


def _same_gpu(uuid: str, other: str) -> bool:
    """torch prints a GPU's UUID without nvidia-smi's `GPU-` prefix."""
    return uuid.lower().removeprefix("gpu-") == other.lower().removeprefix("gpu-")


def gpu_processes(gpu_uuid: str) -> tuple[GpuProcess, ...] | None:
    """The processes with a context on the GPU `gpu_uuid`, or None when nvidia-smi cannot say."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory,gpu_uuid", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    processes = []
    for line in listed.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4 or not fields[0].isdigit():
            continue
        pid, name, memory, uuid = fields
        if _same_gpu(gpu_uuid, uuid):
            used = float(memory) if memory.replace(".", "", 1).isdigit() else None
            processes.append(GpuProcess(int(pid), name, used))
    return tuple(processes)


@dataclass(frozen=True)
class GpuWatch:
    """Which GPU a run uses and which processes on it are the harness's own (the probe's worker)."""

    gpu_uuid: str
    own_pids: frozenset[int]

    def others(self) -> tuple[GpuProcess, ...] | None:
        """Processes on the GPU other than the harness's own; None when nvidia-smi cannot say."""
        listed = gpu_processes(self.gpu_uuid)
        if listed is None:
            return None
        return tuple(p for p in listed if p.pid not in self.own_pids)


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the workload's repeats on the run's device, and who else was on its GPU."""

    repeats: tuple[float, ...]  # seconds of each repeat of the fixed workload
    gpu_others: tuple[GpuProcess, ...] | None  # other processes on the GPU; None on CPU or when unknown

    @property
    def seconds(self) -> float:
        """The fastest repeat: one hiccup does not count, a steady hog slows them all."""
        return min(self.repeats)


@dataclass(frozen=True)
class Reference:
    """The machine as the tag's first baseline found it; two plain numbers, so the ledger can hold them."""

    probe_seconds: float  # the reference run's probe (from_run: the faster, the clean moment to wait for)
    cpu_per_second: float | None  # CPU-seconds per wall second of the reference run's process group

    @classmethod
    def from_run(cls, before: ProbeResult, after: ProbeResult, outcome: RunOutcome | None = None) -> Reference:
        return cls(min(before.seconds, after.seconds), outcome.cpu_per_second if outcome is not None else None)


def probe_ratio(before: ProbeResult, after: ProbeResult, reference: Reference) -> float:
    """The slower probe around a run over the reference probe (1.00 = as fast): the ledger's probe_ratio."""
    return max(before.seconds, after.seconds) / reference.probe_seconds


def _gpu_sentence(processes: Sequence[GpuProcess], when: str) -> str:
    listed = "; ".join(p.describe() for p in processes)
    many = "other processes" if len(processes) > 1 else "another process"
    return f"{many} ({listed}) used the GPU {when}"


def contention(before: ProbeResult, after: ProbeResult, reference: Reference | None, outcome: RunOutcome,
               tolerance: float, cpu_check: bool = True) -> str | None:
    """Why the run shared its machine, in one sentence with the numbers; None when it had it to itself.

    Without a reference (the run that would become it) the two probes must agree with each other. Without
    `cpu_check` the run's CPU share is not compared: GPU slots share the host's CPUs by design, and each slot's
    own GPU is what its probe and nvidia-smi watch.
    """
    reasons = []
    if reference is None:
        slow, fast = max(before.seconds, after.seconds), min(before.seconds, after.seconds)
        if slow > fast * (1 + tolerance):
            reasons.append(f"the probes before ({before.seconds:.3f} s) and after ({after.seconds:.3f} s) the run "
                           f"differ by {slow / fast - 1:.0%} (tolerance {tolerance:.0%})")
    else:
        for when, probe in (("before", before), ("after", after)):
            ratio = probe.seconds / reference.probe_seconds
            if ratio > 1 + tolerance:
                reasons.append(f"the probe {when} the run took {ratio:.2f}x the reference "
                               f"{reference.probe_seconds:.3f} s (tolerance {tolerance:.0%})")
                break
    if outcome.gpu_sharers:
        reasons.append(_gpu_sentence(outcome.gpu_sharers, "during the run"))
    for when, probe in (("before", before), ("after", after)):
        if probe.gpu_others:
            reasons.append(_gpu_sentence(probe.gpu_others, f"{when} the run"))
    cpu = outcome.cpu_per_second
    if (cpu_check and reference is not None and reference.cpu_per_second is not None and reference.cpu_per_second > CPU_BUSY
            and cpu is not None and cpu < reference.cpu_per_second * (1 - CPU_TOLERANCE)):
        reasons.append(f"the run's process group used {cpu:.2f} CPU-seconds per second against "
                       f"{reference.cpu_per_second:.2f} on the reference run (tolerance {CPU_TOLERANCE:.0%})")
    return "; ".join(reasons) or None


def _probe_problem(probe: ProbeResult, reference: Reference, tolerance: float) -> str | None:
    ratio = probe.seconds / reference.probe_seconds
    if ratio > 1 + tolerance:
        return f"the probe took {ratio:.2f}x the reference {reference.probe_seconds:.3f} s (tolerance {tolerance:.0%})"
    if probe.gpu_others:
        return _gpu_sentence(probe.gpu_others, "at the probe")
    return None


@dataclass(frozen=True)
class Quiet:
    """What waiting for a quiet machine saw."""

    quiet: bool  # the last probe was clean
    probes: tuple[ProbeResult, ...]
    waited_seconds: float  # time spent sleeping between probes
    reason: str  # one line for the user: how long it waited and what the last probe found


def wait_until_quiet(probe: Probe, reference: Reference, tolerance: float, attempts: int = 4,
                     first_wait: float = 10.0) -> Quiet:
    """Probe after first_wait, 2 * first_wait, 4 * first_wait ... seconds until a probe is clean.

    Returns at the first clean probe, or after `attempts` probes that were not.
    """
    probes: list[ProbeResult] = []
    waited = 0.0
    problem = None
    for attempt in range(attempts):
        wait = first_wait * 2 ** attempt
        time.sleep(wait)
        waited += wait
        probes.append(probe.measure())
        problem = _probe_problem(probes[-1], reference, tolerance)
        if problem is None:
            return Quiet(True, tuple(probes), waited, f"quiet again after {waited:.0f} s: the probe took "
                         f"{probes[-1].seconds / reference.probe_seconds:.2f}x the reference")
    return Quiet(False, tuple(probes), waited, f"still busy after {waited:.0f} s and {attempts} probes: {problem}")


def _tail(stream: IO[bytes]) -> str:
    stream.seek(0)
    lines = stream.read().decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1] if lines else "nothing"


class Probe:
    """The probe's worker process, started by `open()` with the run's environment, asked by `measure()`."""

    def __init__(self, device: str, env: Mapping[str, str] | None = None, python: str = sys.executable) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"the probe runs on cpu or cuda, not {device!r}")
        self.device = device
        self.env = dict(env) if env is not None else None
        self.python = python
        self.process: subprocess.Popen | None = None
        self.errors: IO[bytes] | None = None
        self.threads: int | None = None  # torch threads in the worker: the ones train.py gets
        self.startup_seconds: float | None = None
        self.gpu_watch: GpuWatch | None = None  # pass to run_training; None on CPU or when nvidia-smi cannot tell
        self.gpu_note: str | None = None  # why other GPU processes cannot be seen, for the user; None when they can

    def open(self) -> Probe:
        started = time.perf_counter()
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen([self.python, str(WORKER), self.device], env=self.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                        # its own session, as train.py has: the same share of the CPU where the
                                        # kernel groups by session (autogroup); Ctrl-C is the loop's, EOF ends it
                                        start_new_session=True)
        ready = self._reply(STARTUP_SECONDS)
        self.startup_seconds = time.perf_counter() - started
        self.threads = ready["threads"]
        if self.device == "cuda":
            self._watch_gpu(ready["gpu_uuid"])
        return self

    def _watch_gpu(self, gpu_uuid: str) -> None:
        listed = gpu_processes(gpu_uuid)
        if listed is None:
            self.gpu_note = "nvidia-smi is missing or failed: other processes on the GPU cannot be seen"
        elif self.process.pid not in {p.pid for p in listed}:
            self.gpu_note = ("nvidia-smi does not list the probe's own process (its pids are another pid "
                             "namespace's, as in a container): other processes on the GPU cannot be told apart")
        else:
            self.gpu_watch = GpuWatch(gpu_uuid, frozenset({self.process.pid}))

    def _reply(self, timeout: float) -> dict:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if not line:
            printed = _tail(self.errors)
            self.close()
            what = "did not answer" if not readable else "exited"
            raise ProbeError(f"the machine-speed probe ({WORKER.name} {self.device}) {what}; it printed: {printed}")
        return json.loads(line)

    def measure(self) -> ProbeResult:
        if self.process is None:
            raise ProbeError("the probe is not open; call open() first")
        try:
            self.process.stdin.write(b"probe\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone: _reply says so with what it printed
        repeats = tuple(self._reply(MEASURE_SECONDS)["repeats"])
        others = self.gpu_watch.others() if self.gpu_watch is not None else None
        return ProbeResult(repeats, others)

    def close(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()
            self.process = None
        if self.errors is not None:
            self.errors.close()
            self.errors = None

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
