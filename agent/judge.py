"""Keep or discard: the rules that turn a candidate's val_bpb into a Verdict.

A fixed-time run is noisy, so baseline repeats with different seeds give the noise floor sigma.
Runs are paired on seeds: a candidate's run i uses the seed of baseline i, and it is compared with the
best's run on that same seed, so `values[i]` and `best[i]` always share a seed (common random numbers):
the seed's own luck (initialisation, data order) cancels in the difference. The noise judge is a
sequential test on those paired differences: the bar for the mean of n of them is k * sigma / sqrt(n);
a clear result is decided on one run, a near one asks for a confirming run on the next seed, up to
max_runs. The noise of one paired difference is measured on null twins when the loop runs them (the
baseline with a null edit on the baselines' seeds); otherwise the baselines' cross-seed sigma stands in,
which one badly trained seed can inflate far past it. Sigma from a few runs is itself noisy (by luck it
can be tiny), so once the candidate has two runs, the spread of its own paired differences raises the bar
when it is larger.
`bench/judge_power.py` measures what this buys: false keeps on null changes, detection of planted
improvements, and runs per decision, on the same runs. The greedy autoresearch rule sits beside it so
both can be compared. Every rule is a pure function; the loop picks one by name from JUDGES.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class NoiseFloor:
    """The run-to-run spread of val_bpb, measured on baseline repeats and, when the loop runs them, on their
    null twins: the baseline with an edit that alters the training trajectory without helping (a learning
    rate x 1.0001), on the same seeds."""

    sigma: float | None  # sample standard deviation across seeds; None with fewer than 2 runs
    runs: int
    paired: float | None = None  # root mean square of twin minus baseline, seed by seed; None below 2 pairs
    twins: int = 0

    @property
    def unit(self) -> float | None:
        """The noise of one seed-paired difference: measured on the twins when they ran, else the cross-seed
        sigma (which one badly trained seed can inflate far above the paired noise)."""
        return self.paired if self.paired else self.sigma  # twins that repeat the baselines exactly measure nothing

    def describe(self) -> str:
        if self.paired:  # twins that repeated the baselines exactly measured nothing: the cross-seed sigma stands in
            return f"paired sigma {self.paired:.4f} from {self.twins} null twin{'' if self.twins == 1 else 's'}"
        runs = f"{self.runs} baseline run{'' if self.runs == 1 else 's'}"
        if self.sigma is None:
            return f"sigma unknown ({runs})"
        return f"sigma {self.sigma:.4f} from {runs}"


def noise_floor(values: Sequence[float], twins: Sequence[float] = ()) -> NoiseFloor:
    """Sigma (ddof=1) of the baseline val_bpb values, and the paired sigma of the null twins: `twins[i]` ran on
    the seed of `values[i]`. A null edit's expected difference is zero, so the paired sigma is the root mean
    square of the differences (one degree of freedom each). Non-finite values are failed runs, not measurements."""
    finite = [value for value in values if math.isfinite(value)]
    sigma = statistics.stdev(finite) if len(finite) >= 2 else None
    differences = [twin - value for twin, value in zip(twins, values) if math.isfinite(twin) and math.isfinite(value)]
    paired = math.sqrt(statistics.fmean(d * d for d in differences)) if len(differences) >= 2 else None
    return NoiseFloor(sigma=sigma, runs=len(finite), paired=paired, twins=len(differences) if paired is not None else 0)


@dataclass(frozen=True)
class Verdict:
    """What to do with a candidate, and why in numbers; 'confirm' asks for one more run first, on the next
    seed. `delta` is the (paired) mean difference to the best, `threshold` the bar: a keep needs
    delta < -threshold (None when the rule has no bar, or the values were not finite); `sigma` is the
    noise of one paired difference the bar was built from (None when unknown or unused)."""

    status: Literal["keep", "discard", "confirm"]
    reason: str
    delta: float | None = None
    threshold: float | None = None
    sigma: float | None = None


def paired_delta(values: Sequence[float], best: Sequence[float]) -> float:
    """Mean of the candidate's runs minus the mean of the best's runs on the same seeds; when the best has
    fewer runs than the candidate, its mean over all of them."""
    if not best:
        raise ValueError("a judge needs at least one val_bpb value of the best")
    paired = best[:len(values)]
    return statistics.fmean(values) - statistics.fmean(paired)


def _measured(values: Sequence[float]) -> tuple[float, str] | Verdict:
    """The mean of the candidate's runs and how to show it, or a discard when a value is not finite."""
    if not values:
        raise ValueError("a judge needs at least one val_bpb value")
    if not all(math.isfinite(value) for value in values):
        shown = ", ".join(f"{value:.4f}" for value in values)
        return Verdict("discard", f"val_bpb {shown} is not finite" if len(values) == 1
                       else f"val_bpb {shown}: not all finite")
    mean = statistics.fmean(values)
    return mean, "" if len(values) == 1 else f" (mean of {len(values)} runs)"


LOOP_K = 2.5               # the loop's --k: sigmas a candidate must beat the best by
LOOP_CONFIRM_MARGIN = 0.5  # the loop's --confirm-margin: the band around the bar that asks for a confirming run


def judge_noise(
    values: Sequence[float],
    best: Sequence[float],
    floor: NoiseFloor,
    *,
    k: float = 2.0,
    min_delta: float = 0.0,
    lines_added: int = 0,
    lines_removed: int = 0,
    confirm_margin: float = 0.0,
    max_runs: int = 2,
) -> Verdict:
    """A sequential paired test. After n runs the bar for the mean paired delta is
    threshold = max(k * sigma / sqrt(n), min_delta): averaging n seed-paired differences shrinks their noise
    by sqrt(n). While fewer than max_runs runs are in, a delta past (1 + confirm_margin) x the bar is kept at
    once, one short of (1 - confirm_margin) x the bar is discarded at once, and one in between asks for a
    confirming run on the next seed; at max_runs, or with confirm_margin 0, the bar alone decides.
    A simplification (more lines removed than added) within the bar is kept on one run. With two or more
    runs, sigma is the larger of the floor's (the twins' paired sigma when measured, else the baselines'
    cross-seed sigma) and the spread of the candidate's own paired differences."""
    measured = _measured(values)
    if isinstance(measured, Verdict):
        return measured
    delta = paired_delta(values, best)
    runs = len(values)
    paired = min(runs, len(best))
    shown = f"{delta:+.4f}" + ("" if runs == 1 else f" (mean of {runs} runs")
    if runs > 1:
        shown += ")" if paired == runs else f", {paired} paired with the best's, the rest with its mean)"

    sigma, described = floor.unit, floor.describe()
    if runs >= 2:
        reference = statistics.fmean(best)
        differences = [value - (best[i] if i < len(best) else reference) for i, value in enumerate(values)]
        spread = statistics.stdev(differences)
        if sigma is None or spread > sigma:
            sigma, described = spread, (f"sigma {spread:.4f} from the candidate's {runs} paired differences, "
                                        f"{described}")
    scaled = "" if runs == 1 else f"/sqrt({runs})"
    if sigma is None:
        threshold, label = min_delta, "min_delta"
        prefix, suffix = f"{described}: ", ""
    else:
        k_sigma = k * sigma / math.sqrt(runs)
        threshold, label = ((k_sigma, f"{k:g} sigma{scaled}") if k_sigma >= min_delta else (min_delta, "min_delta"))
        above = "" if label != "min_delta" else f"min_delta above {k:g} sigma{scaled} = {k_sigma:.4f}; "
        prefix, suffix = "", f" ({above}{described})"

    simplification = lines_removed > lines_added
    if runs < max_runs and confirm_margin > 0 and not simplification:
        clear, near = -(1 + confirm_margin) * threshold, -(1 - confirm_margin) * threshold
        if delta < clear:
            return Verdict("keep", f"{prefix}{shown} < {clear:+.4f} ({1 + confirm_margin:g} x -{label}): "
                                   f"clear on {runs} run{'' if runs == 1 else 's'}{suffix}", delta, threshold, sigma)
        if delta < near:
            return Verdict("confirm", f"{prefix}{shown} < {near:+.4f} ({1 - confirm_margin:g} x -{label}), "
                                      f"run it once more to confirm{suffix}", delta, threshold, sigma)
    if delta < -threshold:
        return Verdict("keep", f"{prefix}{shown} < -{label} = -{threshold:.4f}{suffix}", delta, threshold, sigma)
    lines = f"simplification: {lines_removed} lines removed, {lines_added} added"
    if simplification and delta <= threshold:
        return Verdict("keep", f"{prefix}{lines}, {shown} within {label} = {threshold:.4f}{suffix}", delta, threshold, sigma)
    if simplification:
        return Verdict("discard", f"{prefix}{lines}, but {shown} > {label} = {threshold:.4f}{suffix}", delta, threshold, sigma)
    return Verdict("discard", f"{prefix}{shown} >= -{label} = -{threshold:.4f}{suffix}", delta, threshold, sigma)


def judge_greedy(values: Sequence[float], best: Sequence[float], floor: NoiseFloor | None = None,
                 **ignored: object) -> Verdict:
    """The karpathy/autoresearch rule: keep iff the (mean) val_bpb is strictly lower than the best's on the same seeds."""
    measured = _measured(values)
    if isinstance(measured, Verdict):
        return measured
    mean, runs = measured
    delta = paired_delta(values, best)
    reference = mean - delta
    if delta < 0:
        return Verdict("keep", f"greedy: {mean:.4f}{runs} < best {reference:.4f}", delta, 0.0)
    return Verdict("discard", f"greedy: {mean:.4f}{runs} >= best {reference:.4f}", delta, 0.0)


# Both take (values, best, floor, **options): the candidate's runs and the best's runs, paired by seed, so
# `--judge {noise,greedy}` swaps one for the other.
JUDGES: dict[str, Callable[..., Verdict]] = {"noise": judge_noise, "greedy": judge_greedy}
