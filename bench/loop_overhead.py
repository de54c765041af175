"""
Per-experiment wall time the loop spends outside train.py's own process, broken down by job
(git, proposer, judge, ledger, guard, view). The real Loop runs in this process, under cProfile,
on a temporary copy of the project whose train.py is a stand-in that prints a summary at once, so
nearly everything measured is the loop's own work. The guard's re-evaluation of a would-be keep
needs a real model and is measured by bench/guard_cost.py instead.

Usage: python bench/loop_overhead.py [--experiments 12]
Needs prepared data for the cpu preset. Prints `key: value` lines; goal overhead_seconds_per_experiment <= 1.
"""

import argparse
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent import loop as loop_module  # noqa: E402
from agent.view import PlainView  # noqa: E402

STAND_IN = '''"""A stand-in for train.py: the constants the backlog edits, and a summary printed at once."""
MUON_MOMENTUM_START = 0.85
MUON_MOMENTUM_END = 0.95
MUON_MOMENTUM_RAMP_STEPS = 300
MUON_NS_STEPS = 5
MUON_BETA2 = 0.95
MATRIX_OPTIMIZER = "muon"
MATRIX_LR = 0.04
OPTIMIZER = "muon"
SEED = int(os.environ.get("AUTORESEARCH_SEED", "42"))
for step in range(3):
    print(f"step {step:05d} ({50.0 * step:.1f}%) | loss: 4.0 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | mfu: n/a | epoch: 1 | remaining: 0s")
print("---")
keys = dict(val_bpb=1.5 + 0.001 * (SEED - 42), val_loss=3.0, val_accuracy=0.3, val_perplexity=20.0, training_seconds=0.002,
            total_seconds=0.01, peak_memory_mb=100.0, mfu_percent=0.0, tokens_per_second=1000, total_tokens_M=0.0,
            num_steps=3, num_params_M=1.0, depth=4, optimizer=OPTIMIZER, preset="cpu", data_fingerprint="x")
for key, value in keys.items():
    print(f"{key}: {value}")
'''

# Entry points whose cumulative time is each job's share (files and function names as cProfile sees them).
JOBS = {
    "git": [("agent/branch.py", name) for name in ("commit", "amend", "reset", "keep_ref", "line_changes", "changed_paths", "read", "head")],
    "proposer": [("agent/proposer.py", "propose")],
    "judge": [("agent/loop.py", "judge")],
    "ledger": [("agent/ledger.py", name) for name in ("append", "read")],
    "guard": [("agent/guard.py", name) for name in ("check_scope", "check_source", "check_files", "check_time")],
    "view": [("agent/view.py", name) for name in ("started", "progress", "finished", "note", "best")],
}


def backlog(n):
    rows = "\n".join(f"| OV-{i} | beta2 {0.90 + i / 1000:.3f} | MEDIUM |" for i in range(1, n + 1))
    edits = "\n".join(f"OV-{i}: MUON_BETA2 = {0.90 + i / 1000:.3f}" for i in range(1, n + 1))
    return f"# Overhead backlog\n\n## Items\n\n| ID | Change | Priority |\n|---|---|---|\n{rows}\n\n## Edits\n\n{edits}\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "project"
        repo.mkdir()
        shutil.copytree(REPO / "agent", repo / "agent", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("prepare.py", "program.md"):
            shutil.copy(REPO / name, repo / name)
        (repo / "train.py").write_text(STAND_IN)
        (repo / "backlog.md").write_text(backlog(args.experiments))
        for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@localhost",
                                                        "commit", "-qm", "bench"]):
            subprocess.run(["git", *command], cwd=repo, check=True)
        loop_module.REPO_ROOT = repo
        config = loop_module.build_config(loop_module.parse_args(
            ["--tag", "overhead", "--proposer", "backlog", "--backlog", str(repo / "backlog.md"), "--preset", "cpu",
             "--time-budget", "1", "--confirm-margin", "0", "--baseline-repeats", "2"]))
        config = config.model_copy(update={"repo_root": repo})
        view = PlainView("overhead", stream=io.StringIO())
        profiler = cProfile.Profile()
        loop = loop_module.Loop(config, view)
        runs = []
        original_train = loop.train

        def timed_train(*a, **kw):
            outcome, problem = original_train(*a, **kw)
            runs.append(outcome.wall_seconds)
            return outcome, problem

        loop.train = timed_train
        # The stand-in has no model to re-evaluate; bench/guard_cost.py measures verify on a real run.
        loop.guard.verify = lambda run_dir, reported: (None, {})
        t0 = time.perf_counter()
        profiler.enable()
        try:
            loop.run()
        except loop_module.LoopStop:
            pass
        profiler.disable()
        total = time.perf_counter() - t0
        experiments = len(runs) - config.baseline_repeats
    stats = pstats.Stats(profiler)
    shares = {job: 0.0 for job in JOBS}
    for (file, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for job, points in JOBS.items():
            if any(file.endswith(suffix) and function == name for suffix, name in points):
                shares[job] += cumulative
    outside = total - sum(runs)
    per_experiment = outside / (experiments + config.baseline_repeats)
    print(f"experiments: {experiments}")
    print(f"train_process_seconds_per_run: {sum(runs) / len(runs):.3f}")
    for job, seconds in shares.items():
        print(f"{job}_seconds_per_experiment: {seconds / len(runs):.3f}")
    print(f"other_seconds_per_experiment: {max(0.0, outside - sum(shares.values())) / len(runs):.3f}")
    print(f"overhead_seconds_per_experiment: {per_experiment:.3f}")


if __name__ == "__main__":
    main()
