"""Edits of train.py's module-level constants: exact spans replaced, every other byte kept."""

from __future__ import annotations

import ast

import pytest

from agent.backlog import Assignment
from agent.stops import UserError
from agent.train_constants import ConstantEditError, read_constant, set_constants

TRAIN_PY = '''"""Toy train.py: MUON_NS_STEPS = 9 in a docstring does not count."""
import os

PRESET = os.environ.get("AUTORESEARCH_PRESET", "cpu")
DEPTH = {"gpu": 8, "cpu": 4}[PRESET]  # transformer blocks
MUON_NS_STEPS = 5  # Newton–Schulz iterations
MUON_BETA2: float = 0.95  # NorMuon second moment
WINDOWS = (
    "SSSL",
    "L",
)
LABEL = "é→ü"; MATRIX_LR = 0.04  # two statements on one line


def get_muon_momentum(step):
    MUON_MOMENTUM_END = 0.5  # a local, not the constant
    return step
'''


def test_one_match_replaces_only_the_value_and_keeps_the_comment():
    edited = set_constants(TRAIN_PY, [Assignment("MUON_NS_STEPS", "3")])
    before, after = TRAIN_PY.splitlines(keepends=True), edited.splitlines(keepends=True)
    assert after[5] == "MUON_NS_STEPS = 3  # Newton–Schulz iterations\n"
    assert after[:5] == before[:5] and after[6:] == before[6:]


def test_annotated_assignment_keeps_its_annotation():
    edited = set_constants(TRAIN_PY, [Assignment("MUON_BETA2", "0.99")])
    assert edited == TRAIN_PY.replace("MUON_BETA2: float = 0.95", "MUON_BETA2: float = 0.99")


def test_whole_expression_and_multiline_values_are_replaced():
    edited = set_constants(TRAIN_PY, [Assignment("DEPTH", "6"), Assignment("WINDOWS", '("L",)')])
    expected = TRAIN_PY.replace('{"gpu": 8, "cpu": 4}[PRESET]', "6").replace(
        '(\n    "SSSL",\n    "L",\n)', '("L",)'
    )
    assert edited == expected
    assert read_constant(edited, "DEPTH") == "6"
    assert read_constant(edited, "WINDOWS") == '("L",)'


def test_byte_offsets_after_non_ascii_on_the_same_line():
    edited = set_constants(TRAIN_PY, [Assignment("MATRIX_LR", "0.001")])
    assert 'LABEL = "é→ü"; MATRIX_LR = 0.001  # two statements on one line\n' in edited
    assert edited.count("\n") == TRAIN_PY.count("\n")


def test_several_assignments_apply_in_turn():
    edited = set_constants(
        TRAIN_PY, [Assignment("MUON_NS_STEPS", "7"), Assignment("LABEL", '"x"'), Assignment("MUON_NS_STEPS", "3")]
    )
    assert read_constant(edited, "MUON_NS_STEPS") == "3"
    assert read_constant(edited, "LABEL") == '"x"'
    assert read_constant(edited, "MATRIX_LR") == "0.04"
    ast.parse(edited)


def test_crlf_line_endings_survive():
    source = "A = 1\r\nMUON_NS_STEPS = 5  # iterations\r\nB = 2\r\n"
    edited = set_constants(source, [Assignment("MUON_NS_STEPS", "3")])
    assert edited == "A = 1\r\nMUON_NS_STEPS = 3  # iterations\r\nB = 2\r\n"


def test_read_constant_gives_the_value_source_text():
    assert read_constant(TRAIN_PY, "DEPTH") == '{"gpu": 8, "cpu": 4}[PRESET]'
    assert read_constant(TRAIN_PY, "MUON_BETA2") == "0.95"


def test_no_match_is_a_one_sentence_error():
    with pytest.raises(ConstantEditError) as raised:
        set_constants(TRAIN_PY, [Assignment("MUON_FOO", "1")])
    assert str(raised.value) == (
        "MUON_FOO matches no module-level assignment in train.py; the item cannot be applied as written."
    )
    assert isinstance(raised.value, UserError)


@pytest.mark.parametrize("name", ["MUON_MOMENTUM_END", "AUTORESEARCH_PRESET", "SSSL"])
def test_names_in_strings_docstrings_or_indented_code_do_not_match(name):
    with pytest.raises(ConstantEditError, match=f"^{name} matches no module-level assignment"):
        set_constants(TRAIN_PY, [Assignment(name, "1")])


def test_chained_or_tuple_targets_do_not_match():
    source = "A = B = 1\nC, D = 2, 3\n"
    for name in "ABCD":
        with pytest.raises(ConstantEditError, match="matches no module-level assignment"):
            read_constant(source, name)


def test_two_matches_name_both_lines():
    source = TRAIN_PY + "MUON_NS_STEPS = 6\n"
    with pytest.raises(ConstantEditError) as raised:
        set_constants(source, [Assignment("MUON_NS_STEPS", "3")])
    assert str(raised.value).startswith("MUON_NS_STEPS matches 2 module-level assignments (lines 6 and 18)")


def test_a_value_that_breaks_the_syntax_is_refused():
    with pytest.raises(ConstantEditError, match="leaves train.py unparseable"):
        set_constants(TRAIN_PY, [Assignment("MUON_NS_STEPS", "3 +")])
