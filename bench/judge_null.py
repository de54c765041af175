"""
False-keep rate of the judges on null changes: the unchanged train.py run several times, and every
way of casting those same runs as the loop would (two baselines, a candidate with the first
baseline's seed, a confirming re-run when the noise judge asks for one) judged by both rules.

Usage: python -m bench.judge_null [--same-seed 6] [--other-seeds 4] [--budget 20]
Needs prepared data for the cpu preset. Prints `key: value` lines; goal false_keep_rate_noise <= 0.05
(greedy keeps about half of null changes by construction). Cast with the loop's defaults (k, confirm margin).
"""

import argparse
import itertools
import statistics
import sys

from agent.judge import LOOP_CONFIRM_MARGIN, LOOP_K, judge_greedy, judge_noise, noise_floor
from bench.judge_runs import BASE, FIRST_SEED, MeasureError, train

SEED = FIRST_SEED


def run(seed, budget, index):
    try:
        measured = train(BASE, seed, budget)
    except MeasureError as error:
        sys.exit(f"judge_null: run {index}: {error}")
    print(f"run_{index}: seed {seed} val_bpb {measured.val_bpb:.6f} steps {measured.num_steps}", flush=True)
    return measured.val_bpb


def false_keep_rates(same, other, k=LOOP_K, confirm_margin=LOOP_CONFIRM_MARGIN):
    """Every (baseline A, baseline B, candidate C, confirmation D) the runs allow: A, C, D share a seed."""
    noise_keeps = greedy_keeps = cases = 0
    for a, c in itertools.permutations(range(len(same)), 2):
        for b in other:
            floor = noise_floor([same[a], b])
            verdict = judge_noise([same[c]], [same[a]], floor, k=k, confirm_margin=confirm_margin)
            if verdict.status == "confirm":
                confirmations = [d for d in range(len(same)) if d not in (a, c)]
                kept = statistics.fmean(
                    judge_noise([same[c], same[d]], [same[a]], floor, k=k).status == "keep" for d in confirmations)
            else:
                kept = float(verdict.status == "keep")
            noise_keeps += kept
            greedy_keeps += judge_greedy([same[c]], [same[a]]).status == "keep"
            cases += 1
    return noise_keeps / cases, greedy_keeps / cases, cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--same-seed", type=int, default=6, help=f"runs with seed {SEED} (baseline A, candidates)")
    parser.add_argument("--other-seeds", type=int, default=4, help="runs with other seeds (baseline B)")
    parser.add_argument("--budget", type=float, default=20.0, help="training seconds per run")
    args = parser.parse_args()
    if args.same_seed < 3 or args.other_seeds < 1:  # a cast needs baseline A, candidate C and confirmation D
        parser.error("give --same-seed 3 or more and --other-seeds 1 or more: each case needs three runs of one seed")
    same = [run(SEED, args.budget, i) for i in range(args.same_seed)]
    other = [run(SEED + 1 + i, args.budget, args.same_seed + i) for i in range(args.other_seeds)]
    noise, greedy, cases = false_keep_rates(same, other)
    print(f"runs: {len(same) + len(other)}")
    print(f"budget_seconds: {args.budget:g}")
    print(f"same_seed_stdev: {statistics.stdev(same):.6f}")
    print(f"cross_seed_stdev: {statistics.stdev(same[:1] + other):.6f}")
    print(f"judged_cases: {cases}")
    print(f"false_keep_rate_greedy: {greedy:.3f}")
    print(f"false_keep_rate_noise: {noise:.3f}")


if __name__ == "__main__":
    main()
