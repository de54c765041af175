"""The backlog parser on the seed issue, on our default backlog, and on malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.backlog import Assignment, BacklogError, load_backlog, parse_backlog
from agent.stops import UserError

REPO = Path(__file__).resolve().parents[1]
SEED = Path(__file__).parent / "data" / "backlog_issue_7.txt"  # the real issue page, copied as text
DEFAULT_BACKLOG = REPO / "agent" / "backlog.md"

# The seed's execution order first, then the rest by priority (all MEDIUM before LOW), then file order.
EXPECTED_ORDER = ["NS-1", "MM-5", "MM-1", "MM-3", "MB-2", "ABL-1", "MM-2", "MM-4", "NS-2", "MB-1", "MB-3", "ABL-2"]


def test_seed_issue_parses_with_page_chrome_around_it():
    items = load_backlog(SEED)
    assert [item.id for item in items] == EXPECTED_ORDER
    assert [item.order for item in items] == list(range(12))
    by_id = {item.id: item for item in items}
    momentum = "Momentum Schedule Experiments"
    expected = {
        "MM-1": (momentum, "Start 0.9 (narrower ramp 0.9→0.95)", "MEDIUM"),
        "MM-2": (momentum, "End 0.99 (wider ramp 0.85→0.99)", "MEDIUM"),
        "MM-3": (momentum, "Faster ramp (150 steps instead of 300)", "MEDIUM"),
        "MM-4": (momentum, "Slower ramp (600 steps)", "LOW"),
        "MM-5": (momentum, "Constant 0.95 (no ramp)", "MEDIUM"),
        "NS-1": ("Newton-Schulz Iterations", "ns_steps: 3", "MEDIUM"),
        "NS-2": ("Newton-Schulz Iterations", "ns_steps: 7", "LOW"),
        "MB-1": ("Muon Beta2", "beta2: 0.9", "LOW"),
        "MB-2": ("Muon Beta2", "beta2: 0.99", "LOW"),
        "MB-3": ("Muon Beta2", "beta2: 0.999", "LOW"),
        "ABL-1": ("Pure AdamW Ablation (Diagnostic)", "Replace all Muon with AdamW (keep MATRIX_LR=0.04)", "LOW"),
        "ABL-2": ("Pure AdamW Ablation (Diagnostic)", "Pure AdamW with standard LR=0.001 for matrices", "LOW"),
    }
    assert {i: (item.section, item.change, item.priority) for i, item in by_id.items()} == expected
    assert by_id["NS-1"].extra == {"Rationale": "Faster per step → more training steps in 5 min"}
    assert by_id["MM-1"].extra == {}
    assert all(item.edits == () for item in items)
    assert by_id["MM-1"].description == "Momentum Schedule Experiments: Start 0.9 (narrower ramp 0.9→0.95)"
    assert by_id["NS-1"].description == "Newton-Schulz Iterations: ns_steps: 3"


def test_default_backlog_has_the_seed_items_the_deepnested_items_and_their_edits():
    items = load_backlog(DEFAULT_BACKLOG)
    assert [item.id for item in items] == (EXPECTED_ORDER[:7] + ["DN-1"] + EXPECTED_ORDER[7:]
                                          + ["DN-2", "DN-3", "DN-4", "DN-5", "DN-6", "DN-7"])
    edits = {item.id: [(a.name, a.value) for a in item.edits] for item in items}
    assert edits == {
        "MM-1": [("MUON_MOMENTUM_START", "0.9")],
        "MM-2": [("MUON_MOMENTUM_END", "0.99")],
        "MM-3": [("MUON_MOMENTUM_RAMP_STEPS", "150")],
        "MM-4": [("MUON_MOMENTUM_RAMP_STEPS", "600")],
        "MM-5": [("MUON_MOMENTUM_START", "0.95"), ("MUON_MOMENTUM_END", "0.95")],
        "NS-1": [("MUON_NS_STEPS", "3")],
        "NS-2": [("MUON_NS_STEPS", "7")],
        "MB-1": [("MUON_BETA2", "0.9")],
        "MB-2": [("MUON_BETA2", "0.99")],
        "MB-3": [("MUON_BETA2", "0.999")],
        "ABL-1": [("MATRIX_OPTIMIZER", '"adamw"'), ("MATRIX_LR", "0.04")],
        "ABL-2": [("MATRIX_OPTIMIZER", '"adamw"'), ("MATRIX_LR", "0.001")],
        "DN-1": [("OPTIMIZER", '"deepnested"')],
        "DN-2": [("OPTIMIZER", '"deepnested"'), ("DN_MOMENTUM_NUM_LAYERS", "3"), ("DN_CONTROLLER_NUM_LAYERS", "2"),
                 ("DN_MODE", '"explicit"')],
        "DN-3": [("OPTIMIZER", '"deepnested"'), ("DN_MOMENTUM_NUM_LAYERS", "4"), ("DN_CONTROLLER_NUM_LAYERS", "5"),
                 ("DN_MODE", '"explicit"')],
        "DN-4": [("OPTIMIZER", '"deepnested"'), ("DN_CONTROLLER_UPDATE_FREQ", "10")],
        "DN-5": [("OPTIMIZER", '"deepnested"'), ("DN_USE_CMS", "True"), ("DN_CMS_FREQUENCIES", "(1, 10, 100)")],
        "DN-6": [("OPTIMIZER", '"deepnested"'), ("DN_META_LR", "1e-4")],
        "DN-7": [("OPTIMIZER", '"deepnested"'), ("DN_META_LR", "1e-2")],
    }
    priorities = {item.id: item.priority for item in items}
    assert [i for i, p in priorities.items() if p == "MEDIUM"] == ["NS-1", "MM-5", "MM-1", "MM-3", "MM-2", "DN-1"]
    assert all(item.section and "\n" not in item.description for item in items)


def test_markdown_tolerances_and_ordering():
    text = """\
# Backlog

## Wide ideas

Some prose under the heading does not name the section.

| ID | Change | Priority | Notes |
|:---|---|:---:|---|
| **LR-1** | Raise lr | low | a \\| pipe |
| LR-6 | Decay | LOW | |
| LR-5 | Clip | MEDIUM | |
| LR-2 | Lower lr | HIGH | |
| LR-3 | Warmup | Medium | |
| LR-4 | Cooldown | HIGH | |

Execution order:
1. LR-3 first
2. LR-3 again, then LR-1

## Machine-readable edits

These lines are read by the backlog proposer.
- LR-1: LR = 0.1; NAME = "a;b"
**LR-1**: WARMUP = (1, 2)
LR-2: `LR = -0.5`  # lower

Generated with Claude Code
LR-4: not read, the section ended at the line above.
"""
    items = parse_backlog(text, source="t.md")
    assert [(item.id, item.order) for item in items] == [
        ("LR-3", 0), ("LR-1", 1), ("LR-2", 2), ("LR-4", 3), ("LR-5", 4), ("LR-6", 5)
    ]
    by_id = {item.id: item for item in items}
    assert by_id["LR-1"].section == "Wide ideas"
    assert by_id["LR-1"].priority == "LOW"
    assert by_id["LR-1"].extra == {"Notes": "a | pipe"}
    assert by_id["LR-1"].edits == (
        Assignment("LR", "0.1"),
        Assignment("NAME", '"a;b"'),
        Assignment("WARMUP", "(1, 2)"),
    )
    assert by_id["LR-2"].edits == (Assignment("LR", "-0.5"),)
    assert by_id["LR-4"].edits == ()


GOOD = """\
## Momentum

| ID | Change | Priority |
|---|---|---|
| MM-1 | Start 0.9 | MEDIUM |
| MM-2 | End 0.99 | LOW |

## Execution Order

- MM-2

## Edits

MM-1: MUON_MOMENTUM_START = 0.9
"""


def _broken(line_no: int, new_line: str) -> str:
    lines = GOOD.splitlines()
    lines[line_no - 1] = new_line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("line_no", "new_line", "message"),
    [
        (6, "| MM-9 | x |", "the row '| MM-9 | x |' has 2 cells but its table has 3 columns; give every row"),
        (6, "| MM-2 | End 0.99 | URGENT |", "the priority 'URGENT' of MM-2 is unknown; write HIGH, MEDIUM or LOW."),
        (6, "| MM-1 | End 0.99 | LOW |", "the ID MM-1 is already used on line 5; give every item its own ID."),
        (6, "| momentum | End 0.99 | LOW |", "the ID 'momentum' is not of the form MM-1"),
        (3, "| ID | Change | Rationale |", "the item table has no Priority column"),
        (10, "- MM-3 (not defined)", "the execution order names MM-3, which no table defines"),
        (14, "MM-7: MUON_MOMENTUM_START = 0.9", "the edit is for MM-7, which no table defines"),
        (14, "MM-1: MUON_MOMENTUM_START = 0.9 * x", "the value '0.9 * x' of MUON_MOMENTUM_START is not a Python literal"),
        (14, "MM-1: muon_start = 0.9", "'muon_start' is not an UPPER_SNAKE constant name"),
        (14, "MM-1: MUON_MOMENTUM_START 0.9", "'MUON_MOMENTUM_START 0.9' is not of the form NAME = value"),
        (14, "MM-1: A = 1; A = 2", "MM-1 sets A a second time"),
    ],
)
def test_malformed_backlog_names_the_line_and_the_fix(tmp_path, line_no, new_line, message):
    path = tmp_path / "backlog.md"
    path.write_text(_broken(line_no, new_line), encoding="utf-8")
    with pytest.raises(BacklogError) as raised:
        load_backlog(path)
    text = str(raised.value)
    assert text.startswith(f"{path} line {line_no}: ")
    assert message in text
    assert text.endswith(".") and "\n" not in text
    assert isinstance(raised.value, UserError)


def test_the_good_backlog_itself_parses():
    items = parse_backlog(GOOD)
    assert [(item.id, item.edits) for item in items] == [
        ("MM-2", ()),
        ("MM-1", (Assignment("MUON_MOMENTUM_START", "0.9"),)),
    ]


def test_a_file_without_an_item_table_says_so():
    text = "Current config\n| Parameter | Value |\n|---|---|\n| ns_steps | 5 |\n"
    with pytest.raises(BacklogError, match=r"^b\.md holds no backlog items: no table whose first column is ID"):
        parse_backlog(text, source="b.md")


def test_a_missing_file_is_a_user_error(tmp_path):
    path = tmp_path / "nope.md"
    with pytest.raises(BacklogError, match=f"^The backlog file {path} does not exist; check the path"):
        load_backlog(path)
