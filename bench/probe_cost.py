"""
What the machine-speed probe costs next to a run, and whether it sees a busy machine: starts the
probe's worker once, probes N times on a quiet machine, then probes while HOGS busy processes that
the bench starts run beside it. A run costs two probes (before and after). The worker's CPU time per
probe does not depend on the load: on an idle machine a probe's wall time is about that over its threads.

Usage: python -m bench.probe_cost [--probes 20] [--hog-probes 5] [--hogs 2] [--device cpu|cuda]
Prints `key: value` lines; exits non-zero when the probe fails.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from agent.probe import Probe, ProbeError

RUN_SECONDS = 300.0  # the gpu preset's budget, against which the cost is a percentage
TOLERANCE = 0.10  # the loop's default --contention-tolerance


def worker_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the probe's worker so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_probes(probe: Probe, count: int) -> tuple[list[float], list[float]]:
    """(probe seconds, wall seconds of each request as the loop sees it) for `count` probes."""
    seconds, walls = [], []
    for _ in range(count):
        start = time.perf_counter()
        seconds.append(probe.measure().seconds)
        walls.append(time.perf_counter() - start)
    return seconds, walls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=20, help="probes on the quiet machine")
    parser.add_argument("--hog-probes", type=int, default=5, help="probes beside the busy processes")
    parser.add_argument("--hogs", type=int, default=2, help="busy processes the bench starts")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    try:
        with Probe(args.device).open() as probe:
            cpu_before = worker_cpu_seconds(probe.process.pid)
            quiet, walls = timed_probes(probe, args.probes)
            cpu_per_probe = (worker_cpu_seconds(probe.process.pid) - cpu_before) / args.probes
            # each in its own session, as another user's job: where the kernel groups CPU time by session
            # (autogroup), hogs in the bench's own session would count as one
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                    for _ in range(args.hogs)]
            try:
                time.sleep(0.2)  # the hogs are running, not starting
                busy, _ = timed_probes(probe, args.hog_probes)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    except ProbeError as error:
        sys.exit(f"probe_cost: {error}")
    cost = 2 * statistics.median(walls)
    ratio_under_hog = statistics.median(busy) / statistics.median(quiet)
    print(f"device: {args.device}")
    print(f"threads: {probe.threads}")
    print(f"gpu_watch: {'nvidia-smi' if probe.gpu_watch else probe.gpu_note or 'none (cpu)'}")
    print(f"probe_startup_seconds_once: {probe.startup_seconds:.2f}")
    print(f"probe_seconds_median: {statistics.median(quiet):.4f}")
    print(f"probe_seconds_min: {min(quiet):.4f}")
    print(f"probe_ratio_quiet_max: {max(quiet) / statistics.median(quiet):.3f}")
    print(f"probe_wall_seconds_median: {statistics.median(walls):.4f}")
    print(f"probe_worker_cpu_seconds_per_probe: {cpu_per_probe:.3f}")
    print(f"probe_cost_per_run_seconds: {cost:.3f}")
    print(f"probe_cost_percent_of_300s_run: {100 * cost / RUN_SECONDS:.3f}")
    print(f"probe_ratio_under_hog: {ratio_under_hog:.3f}")
    print(f"hog_detected: {'yes' if ratio_under_hog > 1 + TOLERANCE else 'no'} (tolerance {TOLERANCE:.0%}, {args.hogs} hogs)")


if __name__ == "__main__":
    main()
