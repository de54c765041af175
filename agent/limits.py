"""The loop's limits, checked in one place; each ends the loop with its own sentence."""

from __future__ import annotations

import time

from agent.stops import LoopStop


class ExperimentLimit(LoopStop):
    pass


class TimeLimit(LoopStop):
    pass


class CrashLimit(LoopStop):
    pass


class BacklogExhausted(LoopStop):
    pass


class Limits:
    """Experiments, hours and consecutive crashes allowed to one invocation of the loop."""

    def __init__(self, max_experiments: int | None, max_hours: float | None, max_crashes: int) -> None:
        self.max_experiments = max_experiments
        self.max_hours = max_hours
        self.max_crashes = max_crashes
        self.started = time.monotonic()

    def check(self, experiments: int, consecutive_crashes: int, consecutive_refusals: int = 0,
              consecutive_contended: int = 0) -> None:
        """Raise the LoopStop that applies, if any, before a new experiment starts."""
        if consecutive_contended >= self.max_crashes:
            raise CrashLimit(f"the last {consecutive_contended} experiments never had the machine to themselves "
                             f"(status contended); stop what else is running, then run again with the same tag.")
        if consecutive_crashes >= self.max_crashes:
            raise CrashLimit(f"{consecutive_crashes} experiments crashed in a row; read the last logs under runs/, "
                             f"fix the cause, then run again with the same tag.")
        if consecutive_refusals >= self.max_crashes:
            raise CrashLimit(f"the LLM proposer's last {consecutive_refusals} proposals could not be run; read their "
                             f"reasons in experiments.tsv, then run again with the same tag.")
        if self.max_experiments is not None and experiments >= self.max_experiments:
            raise ExperimentLimit(f"ran the {self.max_experiments} experiments asked for (--max-experiments).")
        hours = (time.monotonic() - self.started) / 3600
        if self.max_hours is not None and hours >= self.max_hours:
            raise TimeLimit(f"{hours:.2f} hours have passed (--max-hours {self.max_hours:g}).")
