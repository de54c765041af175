"""
Per-experiment wall time the loop spends outside train.py's own process, broken down by module
(git, proposer, judge, ledger, guard, probe, view). The loop runs exactly as a user starts it
(`python agent/loop.py --demo ...`), under cProfile, on a temporary copy of the project whose
train.py is a stand-in: an untrained bigram model that prepare.py evaluates and that saves its
checkpoint, so the guard's re-evaluation of the first baseline runs for real and the time outside
train.py's process is the loop's own work. Each run's own wall time is the ledger's wall_seconds,
which the loop measures around the training process. bench/guard_cost.py prices the guard on a
real run.

Usage: python -m bench.loop_overhead [--experiments 12]
Prepares the builtin data in a temporary cache first (seconds). Prints `key: value` lines and exits
non-zero, saying why, when the loop does not run every baseline and judge every experiment.
Goal: overhead_seconds_per_experiment <= 1.
"""

import argparse
import csv
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.ledger import is_baseline_run

REPO = Path(__file__).resolve().parent.parent
BASELINES = 2  # the loop's default --baseline-repeats
STAND_IN = '''"""A stand-in for train.py: an untrained bigram model, evaluated by prepare.py and saved for re-evaluation."""
import os
import time

import torch
import torch.nn as nn

from prepare import PRESET, Tokenizer, data_fingerprint, evaluate

EVAL_BATCH_SIZE = 4  # rows per evaluation forward
MUON_BETA2 = 0.95  # the constant the backlog edits; the stand-in ignores it


class BigramConfig:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size


class Bigram(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.logits = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx):
        return self.logits(idx)


def load_checkpoint(path, device="cpu"):
    checkpoint = torch.load(path, map_location=device)
    model = Bigram(BigramConfig(checkpoint["vocab_size"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device)


if __name__ == "__main__":
    t0 = time.time()
    torch.manual_seed(int(os.environ.get("AUTORESEARCH_SEED", "42")))
    tokenizer = Tokenizer.from_directory()
    model = Bigram(BigramConfig(tokenizer.get_vocab_size()))
    for step in range(3):
        print(f"step {step:05d} ({50.0 * step:.1f}%) | loss: 4.0 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | mfu: n/a | epoch: 1 | remaining: 0s")
    metrics = evaluate(model, tokenizer, EVAL_BATCH_SIZE)
    torch.save({"vocab_size": model.config.vocab_size, "state_dict": model.state_dict()},
               os.path.join(os.environ["AUTORESEARCH_RUN_DIR"], "checkpoint.pt"))
    print("---")
    keys = dict(metrics, training_seconds=0.002, total_seconds=time.time() - t0, peak_memory_mb=100.0, mfu_percent=0.0,
                tokens_per_second=1000, total_tokens_M=0.0, num_steps=3, num_params_M=1.0, depth=1, optimizer="none",
                preset=PRESET, data_fingerprint=data_fingerprint())
    for key, value in keys.items():
        print(f"{key}: {value}")
'''

# Each job is the time spent inside these modules when called from outside them (cProfile's view).
JOBS = {
    "git": ("agent/branch.py",),
    "proposer": ("agent/proposer.py", "agent/claude.py"),
    "judge": ("agent/judge.py",),
    "ledger": ("agent/ledger.py",),
    "guard": ("agent/guard.py", "agent/verify.py"),
    "probe": ("agent/probe.py",),
    "view": ("agent/view.py",),
}


class BenchFailed(Exception):
    """The loop did not do what the bench measures; the message says what happened."""


def backlog(n: int) -> str:
    """n items, each a different value of one constant of train.py."""
    rows = "\n".join(f"| OV-{i} | beta2 {0.90 + i / 1000:.3f} | MEDIUM |" for i in range(1, n + 1))
    edits = "\n".join(f"OV-{i}: MUON_BETA2 = {0.90 + i / 1000:.3f}" for i in range(1, n + 1))
    return f"# Overhead backlog\n\n## Items\n\n| ID | Change | Priority |\n|---|---|---|\n{rows}\n\n## Edits\n\n{edits}\n"


def project(root: Path, experiments: int) -> Path:
    """A git repository holding the harness, the stand-in train.py and a backlog of constant edits."""
    repo = root / "project"
    repo.mkdir()
    shutil.copytree(REPO / "agent", repo / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prepare.py", "program.md"):
        shutil.copy(REPO / name, repo / name)
    (repo / "train.py").write_text(STAND_IN)
    (repo / "backlog.md").write_text(backlog(experiments))
    (repo / ".gitignore").write_text("experiments.tsv\nruns/\nworktrees/\nloop.prof\nloop.log\n")
    for command in (["init", "-q"], ["add", "-A"],
                    ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
        subprocess.run(["git", *command], cwd=repo, check=True)
    return repo


def job_seconds(profile: Path) -> dict[str, float]:
    """Each job's time: calls into its modules from code outside them, so a module's own calls count once."""
    stats = pstats.Stats(str(profile)).stats
    shares = dict.fromkeys(JOBS, 0.0)
    for (file, _, _), (_, _, _, _, callers) in stats.items():
        for job, files in JOBS.items():
            if file.endswith(files):
                shares[job] += sum(c[3] for (caller, _, _), c in callers.items() if not caller.endswith(files))
    return shares


def measure(experiments: int, time_budget: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = project(Path(tmp), experiments)
        env = {**os.environ, "AUTORESEARCH_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(repo)}
        env.pop("ANTHROPIC_API_KEY", None)
        prepare = subprocess.run([sys.executable, "prepare.py", "--source", "builtin"], cwd=repo, env=env,
                                 capture_output=True, text=True)
        if prepare.returncode != 0:
            raise BenchFailed(f"prepare.py --source builtin failed: {prepare.stderr.strip()[-500:]}")
        command = [sys.executable, "-m", "cProfile", "-o", str(repo / "loop.prof"), "agent/loop.py", "--demo",
                   "--tag", "overhead", "--backlog", str(repo / "backlog.md"), "--time-budget", str(time_budget),
                   "--max-experiments", str(experiments), "--confirm-margin", "0",
                   "--baseline-repeats", str(BASELINES)]
        t0 = time.perf_counter()
        with open(repo / "loop.log", "w") as log:
            subprocess.run(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        total = time.perf_counter() - t0
        output = (repo / "loop.log").read_text()
        ledger = repo / "experiments.tsv"
        rows = list(csv.DictReader(ledger.open(), delimiter="\t")) if ledger.exists() else []
        baselines = [r for r in rows if is_baseline_run(r)]
        ran = [r for r in rows if r["experiment"] != "baseline" and r["status"] in ("keep", "discard")]
        if len(baselines) != BASELINES or len(ran) != experiments:  # cProfile exits 0 whatever the loop returns
            statuses = ", ".join(f"{r['experiment']} {r['status']} ({r['reason']})" for r in rows) or "no rows"
            raise BenchFailed(f"the loop ended with {len(baselines)} of {BASELINES} baselines "
                              f"and {len(ran)} of {experiments} experiments judged; ledger: {statuses}; "
                              f"the end of its output:\n{output[-2000:]}")
        shares = job_seconds(repo / "loop.prof")
    train = sum(float(r["wall_seconds"]) for r in rows)  # what the loop measured around each train.py process
    runs = sum(int(r["runs"] or 1) for r in rows)
    outside = total - train
    results = {"experiments": experiments, "runs": runs, "loop_seconds": total,
               "train_process_seconds_per_run": train / runs}
    results |= {f"{job}_seconds_per_experiment": seconds / len(rows) for job, seconds in shares.items()}
    results["other_seconds_per_experiment"] = max(0.0, outside - sum(shares.values())) / len(rows)
    results["overhead_seconds_per_experiment"] = outside / len(rows)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=12, help="backlog items the loop runs after its baselines")
    parser.add_argument("--time-budget", type=float, default=1.0, help="training seconds per run")
    args = parser.parse_args(argv)
    if args.experiments < 1:
        parser.error("--experiments must be at least 1.")
    try:
        results = measure(args.experiments, args.time_budget)
    except BenchFailed as failure:
        print(f"loop_overhead: {failure}", file=sys.stderr)
        return 1
    for key, value in results.items():
        print(f"{key}: {value}" if isinstance(value, int) else f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
