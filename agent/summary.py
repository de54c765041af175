"""What train.py prints: progress lines while it trains, then `---` and the summary block.

This module is the one parser for both; the runner, the loop, the guard and the tests use it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Keys every summary block carries (DESIGN.md, "Summary block").
SUMMARY_KEYS = (
    "val_bpb", "val_loss", "val_accuracy", "val_perplexity",
    "training_seconds", "total_seconds", "peak_memory_mb", "mfu_percent",
    "tokens_per_second", "total_tokens_M", "num_steps", "num_params_M",
    "depth", "optimizer", "preset", "data_fingerprint",
)

_KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*?)\s*$")
_PROGRESS = re.compile(
    r"step\s+(?P<step>\d+)\s+\((?P<percent>[\d.]+)%\)\s*\|\s*loss:\s*(?P<loss>[-+\w.]+)"
    r"(?:.*?tok/sec:\s*(?P<tok>[\d,]+))?"
    r"(?:.*?remaining:\s*(?P<remaining>[\d.]+)s)?"
)


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Summary:
    """The `key: value` block after the last `---` line of a run's output."""

    values: dict[str, float | str]

    def __getitem__(self, key: str) -> float | str:
        return self.values[key]

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def number(self, key: str) -> float:
        """A numeric value, or nan when the key is missing or not a number."""
        value = self.values.get(key)
        return value if isinstance(value, float) else math.nan

    @property
    def val_bpb(self) -> float:
        return self.number("val_bpb")

    @property
    def missing_keys(self) -> list[str]:
        return [key for key in SUMMARY_KEYS if key not in self.values]


def parse_summary(text: str) -> Summary | None:
    """The summary block of a run's output, or None when there is none with a val_bpb."""
    lines = text.replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return None
    values: dict[str, float | str] = {}
    for line in lines[starts[-1] + 1:]:
        match = _KEY_VALUE.match(line.strip())
        if not match:
            break
        values[match.group(1)] = _value(match.group(2))
    if "val_bpb" not in values:
        return None
    return Summary(values)


@dataclass(frozen=True)
class Progress:
    """One progress line: `step 00042 (35.2%) | loss: 4.12 | ... | tok/sec: 19,876 | ...`."""

    step: int
    percent: float
    loss: float
    tokens_per_second: float | None
    remaining_seconds: float | None


def parse_progress(line: str) -> Progress | None:
    match = _PROGRESS.search(line)
    if not match:
        return None
    tok = match.group("tok")
    remaining = match.group("remaining")
    loss = _value(match.group("loss"))
    return Progress(
        step=int(match.group("step")),
        percent=float(match.group("percent")),
        loss=loss if isinstance(loss, float) else math.nan,
        tokens_per_second=float(tok.replace(",", "")) if tok else None,
        remaining_seconds=float(remaining) if remaining else None,
    )
