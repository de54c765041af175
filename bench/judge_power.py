"""
Power of the judges: how often each keeps a null change, and how often it finds a real improvement, on the
same measured runs, cast every way the loop would cast them.

Measured at the cpu preset, on seeds 42, 43, ...: the unchanged train.py (`base`), each null variant (a
change that alters the training trajectory without helping, e.g. a learning rate scaled by 1.0001), and
optionally --better, a real improvement that checks the shift model; plus --same-seed runs of base on seed 42,
whose spread is timing alone. A case is an ordering of the seeds as the loop would use them: baselines on the
first --baseline-repeats seeds, the candidate on the first seed, each confirmation on the next one, every
candidate run compared with the baseline on its seed. A null case's candidate is a null variant; a planted
improvement of d sigma is a null variant's values minus d times the cross-seed sigma (`_sigma_paired`: d
times the null variants' paired sigma, the scale a paired comparison sees, which one badly trained seed
cannot inflate). Beside the measured rates, `model_` lines give the same rates on a Gaussian model with the
measured sigmas (many more cases than a few seeds allow).

Usage: python -m bench.judge_power [--runs runs.json] [--seeds 4] [--budget 60] [--minutes 9]
       python -m bench.judge_power --runs runs.json --no-train     # recompute from recorded runs only
Needs prepared data for the cpu preset (unless --no-train). Saves each run to --runs as it finishes; with
--minutes it stops starting runs after that long and exits 3, so the next call with the same --runs resumes.
Prints `key: value` lines for each judge: `noise` (its floor from the baselines' cross-seed sigma), `greedy`,
`noise_twins` (the noise judge with null twins in its floor: a second null variant run on the baselines'
seeds, whose paired sigma sets the bar) and, with --before, the noise judge as it was at that commit.
Goal for the default judge: false_keep_rate <= 0.05, detection_rate at 3 sigma >= 0.80, runs_per_decision
<= 1.5 (the candidate's runs, baselines and twins not counted: the mean over the five classes null, 1, 2, 3,
5 sigma, weighted equally).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import math
import random
import statistics
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.judge import JUDGES, noise_floor
from bench.judge_runs import BASE, FIRST_SEED, REPO, MeasureError, Run, measure

NULL_VARIANTS = ("MATRIX_LR*1.0001", "EMBEDDING_LR*1.0001")  # alter the trajectory, not the expected result
SHIFTS = (1, 2, 3, 5)  # planted improvements, in cross-seed sigmas
MODEL_CASES = 20000  # simulated cases per class on the Gaussian model
MODEL_SEED = 0  # the model's random numbers, fixed so the printed rates repeat


@dataclass(frozen=True)
class Sigmas:
    """The spreads of val_bpb the runs show; None where too few runs measure one."""

    same_seed: float | None  # base rerun on seed 42: timing only
    cross_seed: float  # base across seeds: what the baselines measure
    null_paired: float | None  # null variant minus base on the same seed: the noise of a paired comparison
    null_paired_mean: float | None


@dataclass(frozen=True)
class Rate:
    """How one judge fared on one class of cases."""

    keeps: float  # fraction of cases kept
    runs: float  # mean training runs per decision (the candidate's, baselines not counted)
    cases: int


def first_values(runs: Sequence[Run]) -> dict[tuple[str, int], float]:
    """val_bpb of each (variant, seed): its first run."""
    table = {}
    for run in runs:
        table.setdefault((run.variant, run.seed), run.val_bpb)
    return table


def measure_sigmas(runs: Sequence[Run], seeds: Sequence[int], nulls: Sequence[str]) -> Sigmas:
    table = first_values(runs)
    same = [run.val_bpb for run in runs if (run.variant, run.seed) == (BASE, FIRST_SEED)]
    differences = [table[null, seed] - table[BASE, seed] for null in nulls for seed in seeds]
    return Sigmas(
        same_seed=statistics.stdev(same) if len(same) >= 2 else None,
        cross_seed=statistics.stdev(table[BASE, seed] for seed in seeds),
        null_paired=statistics.stdev(differences) if len(differences) >= 2 else None,
        null_paired_mean=statistics.fmean(differences) if differences else None,
    )


def decide(judge: Callable, candidate: Sequence[float], best: Sequence[float], options: dict,
           max_runs: int) -> tuple[str, int]:
    """The loop's sequence: judge after each run, run once more on the next seed while the judge asks to
    confirm, up to max_runs (a confirm at the cap is a discard). The final status and the runs it took."""
    runs = 1
    while True:
        verdict = judge(candidate[:runs], best, options["floor"], **options["judge"])
        if verdict.status != "confirm":
            return verdict.status, runs
        if runs >= max_runs:
            return "discard", runs
        runs += 1


def cast(table: dict[tuple[str, int], float], seeds: Sequence[int], candidates: Sequence[str], shift: float,
         judge: Callable, judge_options: dict, repeats: int, max_runs: int, twin: Callable[[str], str] | None = None
         ) -> Rate:
    """Every ordering of the seeds the loop could have met, for every candidate variant: baselines (base) on
    the first `repeats` seeds, the candidate's runs (minus `shift`) on the first `max_runs`. With `twin`, the
    floor also has null twins: the variant twin(candidate) on the baselines' seeds."""
    length = max(repeats, max_runs)
    keeps = runs = cases = 0
    for variant in candidates:
        for order in itertools.permutations(seeds, length):
            baselines = [table[BASE, seed] for seed in order[:repeats]]
            twins = [table[twin(variant), seed] for seed in order[:repeats]] if twin else []
            candidate = [table[variant, seed] - shift for seed in order[:max_runs]]
            options = dict(floor=noise_floor(baselines, twins), judge=judge_options)
            status, used = decide(judge, candidate, baselines, options, max_runs)
            keeps += status == "keep"
            runs += used
            cases += 1
    return Rate(keeps / cases, runs / cases, cases)


def model_rate(sigmas: Sigmas, shift: float, judge: Callable, judge_options: dict, repeats: int,
               max_runs: int, cases: int = MODEL_CASES, twins: bool = False) -> Rate:
    """The same cast on a Gaussian model: a seed's base value has the cross-seed sigma; a candidate (or a
    null twin) on that seed correlates with it so that their difference has the measured paired sigma."""
    sigma = sigmas.cross_seed
    rho = min(1.0, max(0.0, 1 - sigmas.null_paired ** 2 / (2 * sigma ** 2)))
    rng = random.Random(MODEL_SEED)
    length = max(repeats, max_runs)
    keeps = runs = 0

    def paired(z):
        return sigma * (rho * z + math.sqrt(1 - rho ** 2) * rng.gauss(0, 1))
    for _ in range(cases):
        seed_effects = [rng.gauss(0, 1) for _ in range(length)]
        baselines = [sigma * z for z in seed_effects[:repeats]]
        twin_values = [paired(z) for z in seed_effects[:repeats]] if twins else []
        candidate = [paired(z) - shift for z in seed_effects[:max_runs]]
        options = dict(floor=noise_floor(baselines, twin_values), judge=judge_options)
        status, used = decide(judge, candidate, baselines, options, max_runs)
        keeps += status == "keep"
        runs += used
    return Rate(keeps / cases, runs / cases, cases)


def twin_of(nulls: Sequence[str]) -> Callable[[str], str]:
    """The null twin the floor uses for a candidate: another null variant than the candidate itself, so the
    twins' noise and the candidate's are measured on different runs."""
    def twin(variant: str) -> str:
        return nulls[(nulls.index(variant) + 1) % len(nulls)] if variant in nulls else nulls[0]
    return twin


def judge_at(commit: str) -> Callable:
    """judge_noise as agent/judge.py defined it at `commit`, for a before/after table; options it did
    not know are dropped."""
    source = subprocess.run(["git", "show", f"{commit}:agent/judge.py"], cwd=REPO, capture_output=True, text=True)
    if source.returncode != 0:
        raise MeasureError(f"--before {commit}: git cannot show agent/judge.py there ({source.stderr.strip()}).")
    module = types.ModuleType("judge_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is built
    exec(compile(source.stdout, f"{commit}:agent/judge.py", "exec"), module.__dict__)
    known = set(inspect.signature(module.judge_noise).parameters)

    def before(values, best, floor, **options):
        return module.judge_noise(values, best, floor, **{k: v for k, v in options.items() if k in known})
    return before


def model_lines(name: str, judge: Callable, twins: bool, sigmas: Sigmas, judge_options: dict, repeats: int,
                max_runs: int) -> list[str]:
    """The `model_` lines of one judge: its rates on the Gaussian model with these sigmas."""
    def modelled(shift):
        return model_rate(sigmas, shift, judge, judge_options, repeats, max_runs, twins=twins)
    null = modelled(0.0)
    planted = {d: modelled(d * sigmas.cross_seed) for d in SHIFTS}
    paired = {d: modelled(d * sigmas.null_paired) for d in SHIFTS}
    return [f"model_false_keep_rate_{name}: {null.keeps:.3f}",
            *[f"model_detection_rate_{name}_{d}sigma: {planted[d].keeps:.3f}" for d in SHIFTS],
            f"model_runs_per_decision_{name}: {statistics.fmean(rate.runs for rate in [null, *planted.values()]):.2f}",
            *[f"model_detection_rate_{name}_{d}sigma_paired: {paired[d].keeps:.3f}" for d in SHIFTS],
            f"model_runs_per_decision_{name}_paired: "
            f"{statistics.fmean(rate.runs for rate in [null, *paired.values()]):.2f}"]


def report(runs: Sequence[Run], seeds: Sequence[int], nulls: Sequence[str], better: str | None,
           judges: dict[str, tuple[Callable, Callable | None]], judge_options: dict, repeats: int, max_runs: int,
           model: bool) -> list[str]:
    """The `key: value` lines of the bench."""
    table = first_values(runs)
    sigmas = measure_sigmas(runs, seeds, nulls)
    sigma = sigmas.cross_seed
    lines = [f"runs: {len(runs)}", f"seeds: {len(seeds)}", f"budget_seconds: {runs[0].budget_seconds:g}",
             f"mean_steps_base: {statistics.fmean(run.num_steps for run in runs if run.variant == BASE):.0f}",
             f"same_seed_sigma: {'n/a' if sigmas.same_seed is None else f'{sigmas.same_seed:.6f}'}",
             f"cross_seed_sigma: {sigma:.6f}",
             f"null_paired_sigma: {'n/a' if sigmas.null_paired is None else f'{sigmas.null_paired:.6f}'}",
             f"null_paired_mean: {'n/a' if sigmas.null_paired_mean is None else f'{sigmas.null_paired_mean:+.6f}'}",
             f"baseline_repeats: {repeats}", f"max_runs: {max_runs}",
             f"k: {judge_options['k']:g}", f"confirm_margin: {judge_options['confirm_margin']:g}"]
    real = None
    if better is not None:
        gains = [table[BASE, seed] - table[better, seed] for seed in seeds]
        real = statistics.fmean(gains)
        lines += [f"better_variant: {better}", f"better_paired_gain: {real:+.6f}",
                  f"better_paired_gain_sigma: {real / sigma:+.2f}",
                  f"better_paired_gain_stdev: {statistics.stdev(gains):.6f}"]
    for name, (judge, twin) in judges.items():
        def cast_rate(candidates, shift):
            return cast(table, seeds, candidates, shift, judge, judge_options, repeats, max_runs, twin)
        null = cast_rate(nulls, 0.0)
        planted = {d: cast_rate(nulls, d * sigma) for d in SHIFTS}
        classes = [null, *planted.values()]
        lines.append(f"cases_null_{name}: {null.cases}")
        lines.append(f"false_keep_rate_{name}: {null.keeps:.3f}")
        lines += [f"detection_rate_{name}_{d}sigma: {planted[d].keeps:.3f}" for d in SHIFTS]
        lines.append(f"runs_per_decision_{name}: {statistics.fmean(rate.runs for rate in classes):.2f}")
        if sigmas.null_paired is not None:
            paired = {d: cast_rate(nulls, d * sigmas.null_paired) for d in SHIFTS}
            lines += [f"detection_rate_{name}_{d}sigma_paired: {paired[d].keeps:.3f}" for d in SHIFTS]
            lines.append(f"runs_per_decision_{name}_paired: "
                         f"{statistics.fmean(rate.runs for rate in [null, *paired.values()]):.2f}")
        lines.append(f"runs_per_decision_{name}_null: {null.runs:.2f}")
        lines.append(f"runs_per_decision_{name}_3sigma: {planted[3].runs:.2f}")
        if real is not None:
            lines.append(f"real_detection_rate_{name}: {cast_rate([better], 0.0).keeps:.3f}")
            lines.append(f"shift_model_detection_rate_{name}: {cast_rate(nulls, real).keeps:.3f}")
        if model and sigmas.null_paired is not None:
            lines += model_lines(name, judge, twin is not None, sigmas, judge_options, repeats, max_runs)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=Path, help="JSON file of recorded runs: read, completed, saved after each run")
    parser.add_argument("--seeds", type=int, default=4, help=f"seeds {FIRST_SEED}, {FIRST_SEED + 1}, ...")
    parser.add_argument("--same-seed", type=int, default=2, help=f"base runs on seed {FIRST_SEED} (timing noise)")
    parser.add_argument("--null", action="append",
                        help=f"null variant (repeatable; default {', '.join(NULL_VARIANTS)})")
    parser.add_argument("--better", help="a real improvement, NAME=VALUE or NAME*FACTOR, to check the shift model")
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per run")
    parser.add_argument("--minutes", type=float, help="start no run after this many minutes; exit 3 if runs are left")
    parser.add_argument("--no-train", action="store_true", help="use only the runs recorded in --runs")
    parser.add_argument("--baseline-repeats", type=int, default=3, help="baseline runs the loop makes")
    parser.add_argument("--max-runs", type=int, default=2, help="the candidate's runs at most (first + confirmations)")
    parser.add_argument("--k", type=float, default=2.5)
    parser.add_argument("--confirm-margin", type=float, default=0.5)
    parser.add_argument("--before", metavar="COMMIT", help="also judge with agent/judge.py's judge_noise at COMMIT")
    parser.add_argument("--no-model", action="store_true", help="skip the Gaussian model's rates")
    parser.add_argument("--model-sigmas", nargs=2, type=float, metavar=("CROSS", "PAIRED"),
                        help="only the model's rates, for these cross-seed and paired sigmas (no runs needed)")
    args = parser.parse_args()
    nulls = args.null or list(NULL_VARIANTS)
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    if args.seeds < max(2, args.baseline_repeats, args.max_runs):
        print(f"judge_power: --seeds {args.seeds} is too few: give at least 2 and at least --baseline-repeats "
              f"and --max-runs.", file=sys.stderr)
        return 1
    judges = {name: (judge, None) for name, judge in JUDGES.items()}
    if len(nulls) >= 2:
        judges["noise_twins"] = (JUDGES["noise"], twin_of(nulls))
    options = dict(k=args.k, min_delta=0.0, confirm_margin=args.confirm_margin, max_runs=args.max_runs)
    try:
        if args.before:
            judges["before"] = (judge_at(args.before), None)
    except MeasureError as error:
        print(f"judge_power: {error}", file=sys.stderr)
        return 1
    if args.model_sigmas:
        sigmas = Sigmas(same_seed=None, cross_seed=args.model_sigmas[0], null_paired=args.model_sigmas[1],
                        null_paired_mean=None)
        for name, (judge, twin) in judges.items():
            for line in model_lines(name, judge, twin is not None, sigmas, options, args.baseline_repeats,
                                    args.max_runs):
                print(line)
        return 0
    plan = [(variant, seed) for seed in seeds for variant in [BASE, *nulls, *([args.better] if args.better else [])]]
    plan += [(BASE, FIRST_SEED)] * max(0, args.same_seed - 1)
    try:
        if args.no_train:
            if args.runs is None or not args.runs.exists():
                print("judge_power: --no-train needs --runs FILE with recorded runs.", file=sys.stderr)
                return 1
            runs, missing = measure(plan, args.budget, args.runs, 0, recorded_only=True)
        else:
            runs, missing = measure(plan, args.budget, args.runs, args.minutes,
                                    log=lambda line: print(line, flush=True))
        if missing:
            print(f"judge_power: {missing} of {len(plan)} runs are still to measure at --budget {args.budget:g}; "
                  f"run again with the same --runs to continue.", file=sys.stderr)
            return 3
        for line in report(runs, seeds, nulls, args.better, judges, options, args.baseline_repeats, args.max_runs,
                           not args.no_model):
            print(line)
    except MeasureError as error:
        print(f"judge_power: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
