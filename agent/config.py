"""The loop's settings: one pydantic model whose fields document themselves, built from the CLI."""

from __future__ import annotations

import datetime
import shlex
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from agent.branch import check_tag
from agent.stops import UserError

DEMO_BUDGET = 20.0        # seconds of training per demo run
DEMO_EXPERIMENTS = 3      # experiments a demo runs after its baselines
DEMO_TAG = "demo"         # undated, so the same --demo command resumes the same tag on any day
DEMO_BACKLOG = "agent/demo_backlog.md"  # the demo's own short backlog, one item of it measured to help
STARTUP_ALLOWANCE = {"cpu": 120.0, "gpu": 300.0}  # seconds for imports, compilation and the final eval


def default_tag(today: datetime.date | None = None) -> str:
    """The date as autoresearch writes it, e.g. 'nov28'."""
    today = today or datetime.date.today()
    return today.strftime("%b%d").lower()


class LoopConfig(BaseModel):
    """Everything one invocation of the loop needs to know."""

    repo_root: Path = Field(description="the user's repository (holds train.py, prepare.py, experiments.tsv)")
    tag: str = Field(description="names the branch autoresearch/<tag>, the worktree and runs/<tag>")
    proposer: Literal["backlog", "claude", "auto"] = Field("auto", description="who edits train.py; auto = claude when ANTHROPIC_API_KEY is set")
    backlog: Path = Field(description="the experiment backlog (markdown tables, see agent/backlog.md)")
    max_experiments: int | None = Field(None, ge=0, description="experiments run in this invocation, baselines not counted")
    max_hours: float | None = Field(None, gt=0, description="no new experiment starts after this many hours")
    preset: Literal["cpu", "gpu"] = Field(description="prepare.py's preset: model size, data, budget")
    time_budget: float | None = Field(None, gt=0, description="training seconds per run; None = the preset's")
    baseline_repeats: int = Field(3, ge=1, description="baseline runs with different seeds; their spread is the noise floor")
    null_twins: int = Field(3, ge=0, description="null twins: the baseline with MATRIX_LR x 1.0001 on the first baselines' seeds; their paired differences are the judge's sigma")
    judge: Literal["noise", "greedy"] = Field("noise", description="noise: beat the best by k sigma; greedy: any improvement")
    k: float = Field(2.5, gt=0, description="how many sigmas a candidate must beat the best by")
    min_delta: float | None = Field(None, ge=0, description="the smallest improvement worth keeping; stands in for k sigma when sigma is unknown")
    confirm_margin: float = Field(0.5, ge=0, le=1, description="re-run every would-be keep, and near misses within this fraction of the threshold; 0: decide on one run")
    max_runs: int = Field(2, ge=1, description="training runs one experiment may take while the judge asks to confirm; run i uses baseline i's seed")
    contention_tolerance: float = Field(0.10, ge=0, description="a run whose probe is this fraction slower than the reference shared its machine")
    contention_retries: int = Field(3, ge=0, description="re-runs of a run that shared its machine before it is recorded contended")
    contention_wait: float = Field(10.0, gt=0, description="seconds before the first re-probe of a busy machine; doubles each time")
    max_crashes: int = Field(3, ge=1, description="stop after this many consecutive crashes")
    repair_attempts: int = Field(2, ge=0, description="conversations in which an LLM proposer may repair its crashed edit")
    seed: int = Field(42, description="seed of the first baseline; candidates reuse it (common random numbers)")
    cache: Path | None = Field(None, description="AUTORESEARCH_CACHE for prepare.py and train.py")
    timeout: float | None = Field(None, gt=0, description="seconds before a run is killed; None = 2.5 x budget + startup allowance")
    demo: bool = Field(False, description="offline demo: cpu preset, builtin data prepared if missing, short budget")
    model: str | None = Field(None, description="Claude model for --proposer claude (or AUTORESEARCH_MODEL)")
    max_cost: float | None = Field(None, gt=0, description="USD the Claude proposer may spend on this tag, counting earlier invocations of the same tag (their cost_usd in the ledger); None = no cap")
    prices: Path | None = Field(None, description="JSON file of per-model prices (USD per million tokens)")
    python: str = Field(description="the interpreter that runs prepare.py and train.py")
    resume: str | None = Field(None, description="the shell command that resumes this tag, printed when the loop "
                                                 "stops; None: python agent/loop.py --tag <tag>")

    @field_validator("tag")
    @classmethod
    def _tag_names_a_branch(cls, tag: str) -> str:
        check_tag(tag)
        return tag

    @model_validator(mode="after")
    def _sigma_or_min_delta(self) -> LoopConfig:
        if self.judge == "noise" and self.baseline_repeats == 1 and self.min_delta is None:
            raise UserError("--baseline-repeats 1 leaves the noise floor unknown: give --min-delta, "
                            "the smallest val_bpb improvement worth keeping (e.g. --min-delta 0.005).")
        return self

    @property
    def startup_allowance(self) -> float:
        return STARTUP_ALLOWANCE[self.preset]

    @property
    def resume_command(self) -> str:
        return self.resume or shlex.join(["python", "agent/loop.py", "--tag", self.tag])

    @property
    def ledger_path(self) -> Path:
        return self.repo_root / "experiments.tsv"

    @property
    def runs_dir(self) -> Path:
        return self.repo_root / "runs" / self.tag
