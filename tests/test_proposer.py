"""The backlog proposer: applies an item's constant edits, skips what cannot apply, passes on the rest."""

from __future__ import annotations

from pathlib import Path

from agent.backlog import Assignment, BacklogItem, load_backlog
from agent.ledger import COLUMNS
from agent.proposer import USAGE_COLUMNS, BacklogProposer, Proposal, Proposer, ProposerState, Skip, usage_columns

DEFAULT_BACKLOG = Path(__file__).resolve().parents[1] / "agent" / "backlog.md"

TRAIN_PY = """\
# Optimizer
MUON_MOMENTUM_START = 0.85  # momentum at step 0
MUON_MOMENTUM_END = 0.95  # momentum after the ramp
MUON_MOMENTUM_RAMP_STEPS = 300
MUON_NS_STEPS = 5  # Newton-Schulz iterations
"""


def _state(item: BacklogItem | None, train_py: str = TRAIN_PY) -> ProposerState:
    return ProposerState(
        tag="t", best_commit="0" * 40, best_val_bpb=1.5, sigma=None, ledger_rows=[], item=item, train_py=train_py
    )


def _item(item_id: str, change: str, *edits: Assignment) -> BacklogItem:
    return BacklogItem(id=item_id, section="S", change=change, priority="LOW", order=0, edits=edits)


def test_mm5_from_the_default_backlog_sets_both_constants():
    mm5 = next(item for item in load_backlog(DEFAULT_BACKLOG) if item.id == "MM-5")
    proposer: Proposer = BacklogProposer()
    proposal = proposer.propose(_state(mm5))
    assert isinstance(proposal, Proposal)
    assert proposal.experiment == "MM-5"
    assert proposal.train_py == """\
# Optimizer
MUON_MOMENTUM_START = 0.95  # momentum at step 0
MUON_MOMENTUM_END = 0.95  # momentum after the ramp
MUON_MOMENTUM_RAMP_STEPS = 300
MUON_NS_STEPS = 5  # Newton-Schulz iterations
"""
    assert proposal.description.startswith("MUON_MOMENTUM_START = 0.95; MUON_MOMENTUM_END = 0.95 (")
    assert "\n" not in proposal.description and len(proposal.description) < 120
    assert proposal.usage == {}
    assert proposer.name == "backlog"


def test_description_names_the_edit_and_the_change_on_one_line():
    item = _item("MM-1", "Start 0.9 (narrower ramp 0.9→0.95)", Assignment("MUON_MOMENTUM_START", "0.9"))
    proposal = BacklogProposer().propose(_state(item))
    assert isinstance(proposal, Proposal)
    assert proposal.description == "MUON_MOMENTUM_START = 0.9 (Start 0.9, narrower ramp 0.9→0.95)"


def test_a_long_change_is_cut_to_one_short_line():
    item = _item("NS-1", "fewer iterations\nbecause " + "speed " * 40, Assignment("MUON_NS_STEPS", "3"))
    proposal = BacklogProposer().propose(_state(item))
    assert isinstance(proposal, Proposal)
    assert "\n" not in proposal.description and len(proposal.description) < 120
    assert proposal.description.startswith("MUON_NS_STEPS = 3 (fewer iterations because speed")


def test_a_missing_constant_is_skipped_with_its_sentence():
    item = _item("MM-9", "x", Assignment("MUON_MOMENTUM_START", "0.9"), Assignment("MUON_FOO", "1"))
    assert BacklogProposer().propose(_state(item)) == Skip(
        "MM-9", "MUON_FOO matches no module-level assignment in train.py; the item cannot be applied as written."
    )


def test_a_value_already_in_place_is_skipped():
    same_text = _item("NS-0", "five", Assignment("MUON_NS_STEPS", "5"))
    same_value = _item("MM-0", "ramp", Assignment("MUON_MOMENTUM_START", "0.850"), Assignment("MUON_MOMENTUM_END", "0.95"))
    for item in (same_text, same_value):
        result = BacklogProposer().propose(_state(item))
        assert isinstance(result, Skip) and result.experiment == item.id
        assert "already" in result.reason and "\n" not in result.reason
    float_for_int = BacklogProposer().propose(_state(_item("NS-5", "float", Assignment("MUON_NS_STEPS", "5.0"))))
    assert isinstance(float_for_int, Proposal)


def test_nothing_to_propose_without_an_item_or_without_edits():
    assert BacklogProposer().propose(_state(None)) is None
    assert BacklogProposer().propose(_state(_item("DN-1", "a learned optimizer"))) is None


def test_the_backlog_proposer_offers_the_whole_protocol_and_cannot_repair():
    item = _item("NS-1", "three", Assignment("MUON_NS_STEPS", "3"))
    proposer: Proposer = BacklogProposer()
    proposal = proposer.propose(_state(item))
    assert isinstance(proposal, Proposal)
    assert proposer.repair(_state(item), proposal, "Traceback ...", attempt=1) is None


def test_usage_columns_are_the_ledgers_and_empty_for_an_offline_result():
    offline = Skip("NS-1", "nothing to try")
    assert usage_columns(offline) == dict.fromkeys(USAGE_COLUMNS)
    priced = Skip("C-1", "declined", {"input_tokens": 10, "cached_tokens": 0, "output_tokens": 2, "cost_usd": 0.5})
    assert list(usage_columns(priced).values()) == [10, 0, 2, 0.5]
    assert set(USAGE_COLUMNS) <= set(COLUMNS)
