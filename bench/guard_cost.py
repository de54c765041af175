"""
What each check of the integrity guard costs, next to the run it guards: one real run of train.py,
then the static check, the pinned-file check, the time check and the fresh-process re-evaluation
with the causality probe (the last only runs for would-be keeps), each timed.

Usage: python -m bench.guard_cost [--budget 60] [--preset cpu]
Needs prepared data for the preset. Prints `key: value` lines; exits non-zero, saying why, when the
run fails or any check refuses the repository's own train.py (an honest run must pass them all).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from agent.guard import Guard
from agent.loop import prepared_data
from agent.runner import default_timeout, run_training, training_env

REPO = Path(__file__).resolve().parent.parent


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds of the guarded run")
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args(argv)
    cache = os.environ.get("AUTORESEARCH_CACHE")
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        env = training_env(preset=args.preset, time_budget=args.budget, seed=42, run_dir=run_dir,
                           cache=Path(cache) if cache else None)
        files = prepared_data(sys.executable, REPO, env).files
        guard, pin_seconds = timed(lambda: Guard(REPO, REPO, files, python=sys.executable, env=env, preset=args.preset))
        outcome = run_training(REPO, env, run_dir / "train.log", default_timeout(args.budget, 300))
        if outcome.status != "ok":
            return f"guard_cost: the run failed ({outcome.reason}); read the log above it or run train.py alone."
        static, static_seconds = timed(guard.check_source, (REPO / "train.py").read_text())
        files, files_seconds = timed(guard.check_files)
        clock, time_seconds = timed(guard.check_time, outcome, args.budget)
        (problem, details), verify_seconds = timed(guard.verify, run_dir, outcome.summary.val_bpb)
    per_run = 2 * files_seconds + static_seconds + time_seconds
    print(f"preset: {args.preset}")
    print(f"run_wall_seconds: {outcome.wall_seconds:.1f}")
    print(f"pin_seconds_once: {pin_seconds:.3f}")
    print(f"static_check_seconds: {static_seconds:.4f}")
    print(f"files_check_seconds: {files_seconds:.4f}")
    print(f"time_check_seconds: {time_seconds:.6f}")
    print(f"verify_seconds: {verify_seconds:.1f}")
    print(f"verify_problem: {problem or 'none'}")
    print(f"reported_val_bpb: {outcome.summary.val_bpb:.6f}")
    print(f"reevaluated_val_bpb: {details.get('val_bpb', float('nan')):.6f}")
    print(f"probe_max_deviation: {details.get('probe_max_deviation', float('nan')):.3g}")
    print(f"checks_found: {', '.join(p for p in (static, files, clock) if p) or 'nothing'}")
    print(f"every_run_overhead_fraction: {per_run / outcome.wall_seconds:.4f}")
    print(f"keep_candidate_overhead_fraction: {(per_run + verify_seconds) / outcome.wall_seconds:.4f}")
    found = [p for p in (static, files, clock, problem) if p]
    if found:
        return f"guard_cost: the guard refused the repository's own train.py: {'; '.join(found)}."
    return 0


if __name__ == "__main__":
    sys.exit(main())
