"""
Experiments per hour with 1, 2 and 4 slots (`agent/loop.py --gpus`), against the single-slot rate.

The loop runs as a user starts it, on a temporary copy of the project whose train.py is
bench/loop_overhead.py's stand-in (an untrained bigram model that prepare.py evaluates) plus a sleep
that stands for a GPU's training time: on a machine without GPUs the slots are fake ones, and the
sleep is what runs side by side. The rate is the experiments judged after the baselines, over the
time from the last baseline's row to the last experiment's (the ledger's timestamps), per hour.
Goal: rate(N slots) >= 0.9 x N x rate(1 slot). On a 2-core machine the stand-ins' own CPU work
(importing torch, the evaluation, the probes: about 5 s a run) contends beyond 2 slots: give a sleep
long against that.

Usage: python -m bench.parallel_scaling [--slots 1,2,4] [--sleep 30] [--rounds 2]
Prints `key: value` lines and exits non-zero, saying why, when a loop does not judge every experiment.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.loop_overhead import STAND_IN, BenchFailed, project
from agent.ledger import is_baseline_run

ANCHOR = "    for step in range(3):\n"  # the stand-in's first progress line: the "training" sleeps just before it
SLEEPING = STAND_IN.replace(ANCHOR, '    time.sleep(float(os.environ.get("BENCH_SLEEP", "0")))\n' + ANCHOR)


def rate(slots: int, experiments: int, sleep: float) -> dict[str, float]:
    """One loop with `slots` slots over `experiments` backlog items; its experiments per hour."""
    if SLEEPING == STAND_IN:
        raise BenchFailed("bench/loop_overhead.py's stand-in no longer has the line the sleep goes before")
    with tempfile.TemporaryDirectory() as tmp:
        repo = project(Path(tmp), experiments)
        (repo / "train.py").write_text(SLEEPING)
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam", "sleep"],
                       cwd=repo, check=True)
        env = {**os.environ, "AUTORESEARCH_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(repo),
               "BENCH_SLEEP": str(sleep)}
        env.pop("ANTHROPIC_API_KEY", None)
        prepare = subprocess.run([sys.executable, "prepare.py", "--source", "builtin"], cwd=repo, env=env,
                                 capture_output=True, text=True)
        if prepare.returncode != 0:
            raise BenchFailed(f"prepare.py --source builtin failed: {prepare.stderr.strip()[-500:]}")
        command = [sys.executable, "agent/loop.py", "--tag", "scaling", "--preset", "cpu", "--backlog",
                   str(repo / "backlog.md"), "--time-budget", "1", "--baseline-repeats", "2", "--null-twins", "0",
                   "--confirm-margin", "0", "--max-runs", "1", "--contention-tolerance", "20",
                   "--gpus", ",".join(str(i) for i in range(slots))]
        t0 = time.perf_counter()
        loop = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
        ledger = repo / "experiments.tsv"
        rows = list(csv.DictReader(ledger.open(), delimiter="\t")) if ledger.exists() else []
    judged = [r for r in rows if not is_baseline_run(r) and r["status"] in ("keep", "discard")]
    if len(judged) != experiments or loop.returncode != 0:
        statuses = ", ".join(f"{r['experiment']} {r['status']} ({r['reason']})" for r in rows) or "no rows"
        raise BenchFailed(f"{slots} slots: the loop (exit {loop.returncode}) judged {len(judged)} of {experiments} "
                          f"experiments; ledger: {statuses}; the end of its output:\n{(loop.stdout + loop.stderr)[-2000:]}")
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in rows]
    last_baseline = max(stamp for stamp, r in zip(stamps, rows) if is_baseline_run(r))
    seconds = max((max(stamps) - last_baseline).total_seconds(), 1.0)  # the timestamps are whole seconds
    runs = [float(r["wall_seconds"]) for r in judged]
    return {"experiments_per_hour": experiments / seconds * 3600, "experiment_phase_seconds": seconds,
            "loop_seconds": total, "run_seconds_median": sorted(runs)[len(runs) // 2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--slots", default="1,2,4", help="slot counts to compare; the first is the reference")
    parser.add_argument("--sleep", type=float, default=30.0, help="seconds each stand-in run sleeps (its GPU time)")
    parser.add_argument("--rounds", type=int, default=2, help="experiments per slot in each loop")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.slots.split(",") if n.strip()]
    if not counts or min(counts) < 1 or args.rounds < 1 or args.sleep < 0:
        parser.error("--slots needs counts of at least 1, --rounds at least 1 and --sleep at least 0.")
    results = {}
    try:
        for n in counts:
            results[n] = rate(n, n * args.rounds, args.sleep)
    except BenchFailed as failure:
        print(f"parallel_scaling: {failure}", file=sys.stderr)
        return 1
    reference = counts[0]
    for n, measured in results.items():
        for key, value in measured.items():
            print(f"slots_{n}_{key}: {value:.1f}")
        speedup = measured["experiments_per_hour"] / results[reference]["experiments_per_hour"] * reference
        print(f"slots_{n}_scaling_per_slot: {speedup / n:.3f}")  # goal >= 0.9
    return 0


if __name__ == "__main__":
    sys.exit(main())
