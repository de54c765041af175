"""The machine-speed probe, the runner's CPU-time and GPU sampling, and the contention rule, with real
processes: CPU hogs the tests start, stand-ins for train.py, and a fake nvidia-smi on PATH."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from agent.probe_worker import REPEATS
from agent.probe import (
    CPU_BUSY, CPU_TOLERANCE, GpuProcess, GpuWatch, Probe, ProbeError, ProbeResult, Reference, contention, gpu_processes,
    probe_ratio, wait_until_quiet,
)
from agent.runner import RunOutcome, run_training, training_env

TOLERANCE = 0.10  # the loop's default --contention-tolerance
HOGS = 2  # busy processes: as many as the CI machine's cores
SUMMARY = 'print("---\\nval_bpb: 1.5\\nnum_steps: 3\\npreset: cpu")'
# Two threads that keep two cores busy for SECONDS (hashlib releases the GIL on large buffers), as
# torch's threads keep train.py's cores busy.
BUSY = """
import hashlib, threading, time
SECONDS = 2.0
def spin():
    data = bytes(1 << 20)
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        hashlib.sha256(data).digest()
threads = [threading.Thread(target=spin) for _ in range(2)]
for thread in threads: thread.start()
for thread in threads: thread.join()
"""
SLEEPING = "import time\ntime.sleep(1.0)\n"


@contextlib.contextmanager
def cpu_hogs(count: int = HOGS):
    """`count` processes that burn a core each until the block ends, each in its own session as another
    user's job would be (where the kernel groups CPU time by session, a hog in ours would count less)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.fixture(scope="module")
def probe():
    with Probe("cpu").open() as opened:
        yield opened


def quiet_reference(probe: Probe) -> Reference:
    """As the loop keeps it: the slower of a clean first baseline's two probes."""
    first, second = probe.measure(), probe.measure()
    return Reference(max(first.seconds, second.seconds), None)


def run_cost(cpu_per_second: float | None = None) -> RunOutcome:
    """A 10 s run that used `cpu_per_second` CPU-seconds per second, for the rules that only read that."""
    return RunOutcome(status="ok", summary=None, reason="", returncode=0, wall_seconds=10.0, progress_times=(),
                      log_path=Path("train.log"), tail="",
                      cpu_seconds=None if cpu_per_second is None else 10.0 * cpu_per_second)


def stand_in(workdir: Path, body: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.py").write_text(textwrap.dedent(body) + SUMMARY + "\n")
    return workdir


def run(workdir: Path, **kwargs):
    env = training_env(preset="cpu", time_budget=2, seed=1, run_dir=workdir / "run", cache=None)
    outcome = run_training(workdir, env, workdir / "train.log", 60, **kwargs)
    assert outcome.status == "ok", outcome.reason
    return outcome


def test_probe_runs_the_workload_with_the_training_threads(probe: Probe) -> None:
    result = probe.measure()
    assert probe.threads == torch.get_num_threads()  # same environment, same threads as train.py
    assert len(result.repeats) == REPEATS and result.seconds == min(result.repeats) > 0
    assert result.gpu_others is None and probe.gpu_watch is None


def test_two_cpu_hogs_make_the_probe_slower_than_the_tolerance(probe: Probe) -> None:
    clean = min(probe.measure(), probe.measure(), key=lambda result: result.seconds)
    reference = Reference.from_run(clean, clean)
    with cpu_hogs():
        busy = probe.measure()
    assert probe_ratio(clean, busy, reference) > 1 + TOLERANCE
    why = contention(clean, busy, reference, run_cost(), TOLERANCE)
    assert why is not None and "the probe after the run took" in why and "the reference" in why
    assert f"{reference.probe_seconds:.3f} s (tolerance 10%)" in why


def test_an_idle_machine_stays_within_the_tolerance(probe: Probe) -> None:
    reference = quiet_reference(probe)
    before, after = probe.measure(), probe.measure()
    if contention(before, after, reference, run_cost(), TOLERANCE) is not None:
        before, after = probe.measure(), probe.measure()  # one re-probe, as the loop waits and probes again
    assert contention(before, after, reference, run_cost(), TOLERANCE) is None
    assert probe_ratio(before, after, reference) <= 1 + TOLERANCE


def test_the_runner_sees_a_busy_run_get_less_cpu_beside_hogs(tmp_path: Path) -> None:
    workdir = stand_in(tmp_path / "busy", BUSY)
    alone = run(workdir)
    with cpu_hogs():
        shared = run(workdir)
    # two busy threads: about 2 on two idle cores; far less means other sessions are busy, and this test needs them quiet
    assert alone.cpu_per_second > CPU_BUSY, f"the machine is busy: the stand-in got {alone.cpu_per_second:.2f} CPU-s/s alone"
    assert shared.cpu_per_second < alone.cpu_per_second * (1 - CPU_TOLERANCE)
    same = ProbeResult((0.4,), None)
    reference = Reference.from_run(same, same, alone)
    assert contention(same, same, reference, alone, TOLERANCE) is None
    why = contention(same, same, reference, shared, TOLERANCE)
    assert why == (f"the run's process group used {shared.cpu_per_second:.2f} CPU-seconds per second against "
                   f"{alone.cpu_per_second:.2f} on the reference run (tolerance 25%)")


def test_the_runner_counts_the_cpu_time_the_kernel_accounts(tmp_path: Path) -> None:
    """Whatever the load: the sampled CPU time of a busy run matches getrusage of the reaped run."""
    workdir = stand_in(tmp_path / "busy", BUSY)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    outcome = run(workdir)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    kernel = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    assert outcome.cpu_seconds == pytest.approx(kernel, rel=0.1, abs=0.1)
    assert outcome.cpu_per_second == outcome.cpu_seconds / outcome.wall_seconds


def test_a_sleeping_run_never_triggers_the_cpu_rule(tmp_path: Path) -> None:
    workdir = stand_in(tmp_path / "sleepy", SLEEPING)
    alone = run(workdir)
    with cpu_hogs():
        shared = run(workdir)
    assert alone.cpu_per_second < 0.5 and shared.cpu_per_second < 0.5
    same = ProbeResult((0.4,), None)
    reference = Reference.from_run(same, same, alone)
    assert contention(same, same, reference, shared, TOLERANCE) is None
    assert contention(same, same, Reference(0.4, 0.0), shared, TOLERANCE) is None


def test_without_a_reference_the_two_probes_must_agree() -> None:
    before, after = ProbeResult((0.40, 0.41), None), ProbeResult((0.52, 0.60), None)
    assert contention(before, after, None, run_cost(), TOLERANCE) == (
        "the probes before (0.400 s) and after (0.520 s) the run differ by 30% (tolerance 10%)")
    assert contention(before, ProbeResult((0.43,), None), None, run_cost(), TOLERANCE) is None
    assert Reference.from_run(before, after) == Reference(0.40, None)


def test_the_reference_rebuilds_from_plain_numbers() -> None:
    reference = Reference(probe_seconds=0.412, cpu_per_second=1.8)
    before, after = ProbeResult((0.40,), None), ProbeResult((0.5522,), None)
    assert probe_ratio(before, after, reference) == pytest.approx(1.34, abs=0.005)
    assert contention(before, after, reference, run_cost(1.8), TOLERANCE) == (
        "the probe after the run took 1.34x the reference 0.412 s (tolerance 10%)")


def fake_nvidia_smi(bin_dir: Path, table: Path) -> None:
    """An nvidia-smi that prints `table` (what the real one prints for --query-compute-apps)."""
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat {table}\n")
    script.chmod(0o755)


def test_the_runner_reports_other_processes_on_its_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "apps.csv"
    fake_nvidia_smi(tmp_path / "bin", table)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        table.write_text(f"{stranger.pid}, /usr/bin/python3, 2100, GPU-abc\n"
                         f"4242, /opt/other-gpu-job, 900, GPU-def\n"
                         f"{os.getpid()}, probe worker, 300, GPU-abc\n")
        # the stand-in lists itself, as train.py would appear once it holds a CUDA context
        workdir = stand_in(tmp_path / "gpu", f"""
            import os, time
            with open({str(table)!r}, "a") as table:
                table.write(f"{{os.getpid()}}, train.py, 30000, GPU-abc\\n")
            time.sleep(0.5)
            """)
        watch = GpuWatch("abc", frozenset({os.getpid()}))
        outcome = run(workdir, gpu_watch=watch)
    finally:
        stranger.kill()
        stranger.wait()
    assert outcome.gpu_sharers == (GpuProcess(stranger.pid, "/usr/bin/python3", 2100.0),)
    quiet = ProbeResult((0.4,), ())
    assert contention(quiet, quiet, Reference(0.4, None), outcome, TOLERANCE) == (
        f"another process (pid {stranger.pid}, /usr/bin/python3, 2100 MiB) used the GPU during the run")


def test_no_nvidia_smi_means_no_information(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_processes("abc") is None
    outcome = run(stand_in(tmp_path / "w", SLEEPING.replace("1.0", "0.1")), gpu_watch=GpuWatch("abc", frozenset()))
    assert outcome.gpu_sharers is None
    quiet = ProbeResult((0.4,), None)
    assert contention(quiet, quiet, Reference(0.4, None), outcome, TOLERANCE) is None


def test_wait_until_quiet_returns_at_the_first_clean_probe(probe: Probe) -> None:
    reference = quiet_reference(probe)
    quiet = wait_until_quiet(probe, reference, TOLERANCE, attempts=3, first_wait=0.1)
    if not quiet.quiet:  # a hiccup on a shared machine; the loop would simply wait longer
        quiet = wait_until_quiet(probe, reference, TOLERANCE, attempts=3, first_wait=0.1)
    assert quiet.quiet and quiet.reason.startswith("quiet again after")


def test_wait_until_quiet_gives_up_on_a_steady_hog(probe: Probe) -> None:
    reference = quiet_reference(probe)
    with cpu_hogs():
        quiet = wait_until_quiet(probe, reference, TOLERANCE, attempts=2, first_wait=0.05)
    assert not quiet.quiet and len(quiet.probes) == 2
    assert quiet.waited_seconds == pytest.approx(0.15)
    assert quiet.reason.startswith("still busy after 0 s and 2 probes: the probe took")


def test_a_worker_that_cannot_start_is_one_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(ProbeError, match="exited; it printed: no torch here"):
        Probe("cpu", python=str(broken)).open()
    with pytest.raises(ValueError, match="cpu or cuda"):
        Probe("tpu")
