"""The proposer protocol (state in, an edit of train.py out) and the offline backlog proposer.

Every proposer offers `propose` and `repair`, and every result carries what it cost (`usage`), so the
loop never asks a proposer what it can do. The backlog proposer is deterministic and needs no network:
it applies the machine-readable edits a backlog item carries (`MUON_NS_STEPS = 3`), leaves items
without them to an LLM proposer, and cannot repair a crash.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Protocol

from agent.backlog import Assignment, BacklogItem
from agent.train_constants import ConstantEditError, read_constant, set_constants

DESCRIPTION_MAX_CHARS = 119
USAGE_COLUMNS = ("input_tokens", "cached_tokens", "output_tokens", "cost_usd")  # the ledger's, in order


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


@dataclass(frozen=True)
class Proposal:
    """A complete new train.py and the one line that says what changed."""

    experiment: str  # backlog ID ('MM-1') or one the proposer made up
    description: str  # one line; goes after '<ID>: ' in the commit message and into the ledger
    train_py: str
    usage: dict[str, float] = field(default_factory=dict)  # USAGE_COLUMNS of the conversation; {} offline


@dataclass(frozen=True)
class Skip:
    """An item the proposer will not try, with the one-sentence reason for the ledger."""

    experiment: str
    reason: str
    usage: dict[str, float] = field(default_factory=dict)  # USAGE_COLUMNS of the conversation; {} offline


class Proposer(Protocol):
    """What the loop calls; every implementation offers all of it."""

    name: str

    def propose(self, state: ProposerState) -> Proposal | Skip | None:
        """A proposal, a reasoned skip of the item, or None when there is nothing to propose."""
        ...

    def repair(self, state: ProposerState, proposal: Proposal, crash_log: str, attempt: int) -> Proposal | Skip | None:
        """A fix of a proposal whose run crashed (same experiment ID), a skip, or None: this proposer cannot repair."""
        ...


def usage_columns(result: Proposal | Skip) -> dict[str, float | None]:
    """The ledger's usage cells of one result; empty cells for an offline proposer."""
    return {column: result.usage.get(column) for column in USAGE_COLUMNS}


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

    def repair(self, state: ProposerState, proposal: Proposal, crash_log: str, attempt: int) -> None:
        """A constant edit that crashes is the finding; there is nothing to repair."""
        return None


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
