"""The proposer protocol (state in, an edit of train.py out) and the offline backlog proposer.

The backlog proposer is deterministic and needs no network: it applies the machine-readable edits
a backlog item carries (`MUON_NS_STEPS = 3`) and leaves items without them to an LLM proposer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Protocol

from agent.backlog import Assignment, BacklogItem
from agent.train_constants import ConstantEditError, read_constant, set_constants

DESCRIPTION_MAX_CHARS = 119


@dataclass(frozen=True)
class ProposerState:
    """What a proposer sees before one experiment."""

    tag: str
    best_commit: str
    best_val_bpb: float
    sigma: float | None  # noise floor, None when unknown
    ledger_rows: list[dict[str, str]]  # this tag's ledger rows, oldest first
    item: BacklogItem | None  # the backlog item to try; None when the backlog is exhausted
    train_py: str  # train.py at the best commit
    crash_log: str | None = None  # the tail of the last run's log when it crashed, else None


@dataclass(frozen=True)
class Proposal:
    """A complete new train.py and the one line that says what changed."""

    experiment: str  # backlog ID ('MM-1') or one the proposer made up
    description: str  # one line; goes after '<ID>: ' in the commit message and into the ledger
    train_py: str
    usage: dict[str, float] = field(default_factory=dict)  # tokens and cost, filled by LLM proposers


@dataclass(frozen=True)
class Skip:
    """An item the proposer will not try, with the one-sentence reason for the ledger."""

    experiment: str
    reason: str


class Proposer(Protocol):
    name: str

    def propose(self, state: ProposerState) -> Proposal | Skip | None:
        """A proposal, a reasoned skip of the item, or None when there is nothing to propose."""
        ...


class BacklogProposer:
    """Applies a backlog item's constant edits to train.py; items without edits get None."""

    name = "backlog"

    def propose(self, state: ProposerState) -> Proposal | Skip | None:
        item = state.item
        if item is None or not item.edits:
            return None
        try:
            train_py = set_constants(state.train_py, item.edits)
            unchanged = train_py == state.train_py or all(
                _same_literal(read_constant(state.train_py, edit.name), edit.value) for edit in item.edits
            )
        except ConstantEditError as exc:
            return Skip(item.id, str(exc))
        if unchanged:
            names = " and ".join(edit.name for edit in item.edits)
            return Skip(
                item.id,
                f"{names} already {'has' if len(item.edits) == 1 else 'have'} the item's value in train.py "
                "at the best commit; there is nothing to try.",
            )
        return Proposal(experiment=item.id, description=_description(item), train_py=train_py)


def _same_literal(current: str, new: str) -> bool:
    """Whether two value texts are the same literal (0.90 and 0.9 are; 5 and 5.0 are not)."""
    try:
        return repr(ast.literal_eval(current)) == repr(ast.literal_eval(new))
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False


def _description(item: BacklogItem) -> str:
    edits = "; ".join(_assignment_text(edit) for edit in item.edits)
    change = " ".join(item.change.replace(" (", ", ").replace("(", "").replace(")", "").split())
    text = f"{edits} ({change})" if change else edits
    if len(text) > DESCRIPTION_MAX_CHARS:
        text = text[: DESCRIPTION_MAX_CHARS - 1].rstrip() + "…"
    return text


def _assignment_text(edit: Assignment) -> str:
    return " ".join(f"{edit.name} = {edit.value}".split())
