"""Read and set train.py's module-level constants in place, keeping every other byte of the file.

A constant is a top-level statement `NAME = expr` (or `NAME: type = expr`) whose single target is
NAME; only the source span of `expr` is replaced, so trailing comments and layout survive.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

from agent.backlog import Assignment
from agent.stops import UserError

_NEWLINE = re.compile(rb"\r\n|\r|\n")


class ConstantEditError(UserError):
    """An edit that cannot be applied to train.py as written; the message says why."""


def read_constant(source: str, name: str) -> str:
    """The source text of the value assigned to the module-level constant `name`."""
    value = _constant_value(source, name)
    return ast.get_source_segment(source, value) or ""


def set_constants(source: str, assignments: Iterable[Assignment]) -> str:
    """`source` with each named constant's value expression replaced by the assignment's value text."""
    for assignment in assignments:
        value = _constant_value(source, assignment.name)
        encoded = source.encode("utf-8")
        line_starts = [0] + [match.end() for match in _NEWLINE.finditer(encoded)]
        start = line_starts[value.lineno - 1] + value.col_offset
        end = line_starts[value.end_lineno - 1] + value.end_col_offset
        source = (encoded[:start] + assignment.value.encode("utf-8") + encoded[end:]).decode("utf-8")
        try:
            ast.parse(source)
        except SyntaxError:
            raise ConstantEditError(
                f"Setting {assignment.name} = {assignment.value} leaves train.py unparseable; "
                "write the value as a Python expression."
            ) from None
    return source


def _constant_value(source: str, name: str) -> ast.expr:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ConstantEditError(
            f"train.py does not parse (line {exc.lineno}: {exc.msg}); fix it before editing its constants."
        ) from None
    values = [
        (statement.lineno, statement.value)
        for statement in tree.body
        if _assigns(statement, name)
    ]
    if not values:
        raise ConstantEditError(
            f"{name} matches no module-level assignment in train.py; the item cannot be applied as written."
        )
    if len(values) > 1:
        lines = ", ".join(str(line) for line, _ in values[:-1]) + f" and {values[-1][0]}"
        raise ConstantEditError(
            f"{name} matches {len(values)} module-level assignments (lines {lines}) in train.py; "
            "keep one so the edit is unambiguous."
        )
    return values[0][1]


def _assigns(statement: ast.stmt, name: str) -> bool:
    if isinstance(statement, ast.Assign):
        targets = statement.targets
        return len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id == name
    if isinstance(statement, ast.AnnAssign):
        target = statement.target
        return statement.value is not None and isinstance(target, ast.Name) and target.id == name
    return False
