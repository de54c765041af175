"""The experiment backlog: items parsed from a GitHub issue copied as text, or from agent/backlog.md.

Item tables are the tables whose first header cell is `ID`; the line before a table (its nearest
`#` heading, else its nearest non-empty line) names its section. An `Execution Order` list says
which items run first, and an `Edits` section gives items machine-readable changes of train.py's
constants, one `ID: NAME = literal` per line (several joined by `;` allowed).
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.stops import UserError

PRIORITIES = ("HIGH", "MEDIUM", "LOW")

_NEWLINE = re.compile(r"\r\n|\r|\n")
_ID = re.compile(r"[A-Z]+-\d+")
_ID_MENTION = re.compile(r"\b[A-Z]+-\d+\b")
_UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9_]*")
_SEPARATOR_CELL = re.compile(r":?-+:?")
_BULLET = re.compile(r"\s*(?:[-*+]|\d+[.)])\s+(.*)")
_EDIT_LINE = re.compile(r"\s*(?:[-*+]\s+)?[*_]*([A-Za-z]+-\d+)[*_]*\s*:\s*(.*)")
_CODE_SPAN = re.compile(r"`([^`]*)`(.*)")
_HEADING_MAX_WORDS = 5


class BacklogError(UserError):
    """A backlog file that cannot be read as written; the message names the line and the fix."""


@dataclass(frozen=True)
class Assignment:
    """One constant of train.py set to a Python literal, kept as its source text."""

    name: str
    value: str


@dataclass(frozen=True)
class BacklogItem:
    """One experiment of the backlog, with its rank and its machine-readable edits (maybe none)."""

    id: str
    section: str
    change: str
    priority: str
    order: int
    edits: tuple[Assignment, ...] = ()
    extra: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def description(self) -> str:
        """One line saying what the item tries, e.g. 'Muon Beta2: beta2: 0.99'."""
        text = f"{self.section}: {self.change}" if self.section else self.change
        return " ".join(text.split())


@dataclass(frozen=True)
class Backlog:
    """The backlog a command reads: where its text is (a file, or an issue's cached copy) and its items."""

    path: Path
    items: list[BacklogItem]


@dataclass(frozen=True)
class _Row:
    id: str
    section: str
    change: str
    priority: str
    extra: dict[str, str]
    line: int


def load_backlog(path: str | Path) -> list[BacklogItem]:
    """Read and parse a backlog file; a missing or unreadable file is a BacklogError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BacklogError(f"The backlog file {path} does not exist; check the path or create it.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BacklogError(f"The backlog file {path} cannot be read ({exc}); make it a readable UTF-8 text file.") from None
    return parse_backlog(text, source=str(path))


def backlog_from_flags(file: Path, issue: str | None, api_url: str | None, program: str) -> Backlog:
    """The backlog that --backlog, --backlog-issue and --github-api-url name: the file, else the issue fetched (a note
    on stderr when its cached copy stands in); the loop and the report both read theirs here."""
    if issue:
        from agent.github_backlog import fetch_issue_backlog  # requests and prepare.py only when an issue is read

        fetched = fetch_issue_backlog(issue, api_url=api_url)
        if fetched.note:
            print(f"{program}: {fetched.note}", file=sys.stderr)
        file = fetched.path
    return Backlog(file, load_backlog(file))


def parse_backlog(text: str, source: str = "backlog") -> list[BacklogItem]:
    """Parse backlog text into items sorted by rank: execution order, then priority, then file order."""
    rows, edit_lines, execution_order = _scan(_NEWLINE.split(text), source)
    if not rows:
        raise BacklogError(
            f"{source} holds no backlog items: no table whose first column is ID has rows; "
            "add one like '| ID | Change | Priority |' with a row per experiment."
        )
    seen: dict[str, int] = {}
    for row in rows:
        if row.id in seen:
            raise BacklogError(
                f"{source} line {row.line}: the ID {row.id} is already used on line {seen[row.id]}; "
                "give every item its own ID."
            )
        seen[row.id] = row.line

    edits = _parse_edits(edit_lines, seen, source)
    first: list[str] = []
    for line_no, item_id in execution_order:
        if item_id not in seen:
            raise BacklogError(
                f"{source} line {line_no}: the execution order names {item_id}, which no table defines; "
                "add a row for it or remove it from the list."
            )
        if item_id not in first:
            first.append(item_id)

    def rank(indexed: tuple[int, _Row]) -> tuple[int, int, int]:
        position, row = indexed
        if row.id in first:
            return (0, first.index(row.id), position)
        return (1, PRIORITIES.index(row.priority), position)

    ranked = sorted(enumerate(rows), key=rank)
    return [
        BacklogItem(
            id=row.id,
            section=row.section,
            change=row.change,
            priority=row.priority,
            order=order,
            edits=tuple(edits.get(row.id, ())),
            extra=row.extra,
        )
        for order, (_, row) in enumerate(ranked)
    ]


def _scan(
    lines: list[str], source: str
) -> tuple[list[_Row], list[tuple[int, str, str]], list[tuple[int, str]]]:
    """One pass over the lines: item rows, edit lines (line, ID, text) and execution-order mentions."""
    rows: list[_Row] = []
    edit_lines: list[tuple[int, str, str]] = []
    execution_order: list[tuple[int, str]] = []

    mode: str | None = None
    mode_started = False
    last_heading: str | None = None
    last_line: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("|"):
            end = i
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            section = last_heading or last_line or ""
            rows.extend(_table_rows(lines, i, end, section, source))
            mode, last_heading, last_line = None, None, None
            i = end
            continue
        if stripped:
            heading = stripped.lstrip("#").strip()
            last_line = heading
            if stripped.startswith("#"):
                last_heading = heading
            if _is_heading(stripped, "execution order"):
                mode, mode_started = "order", False
            elif _is_heading(stripped, "edits"):
                mode, mode_started = "edits", False
            elif stripped.startswith("#"):
                mode = None
            elif mode == "order":
                bullet = _BULLET.fullmatch(line)
                if bullet:
                    mode_started = True
                    execution_order.extend((i + 1, m) for m in _ID_MENTION.findall(bullet.group(1)))
                elif mode_started:
                    mode = None
            elif mode == "edits":
                edit = _EDIT_LINE.fullmatch(line)
                if edit:
                    mode_started = True
                    edit_lines.append((i + 1, edit.group(1), edit.group(2)))
                elif mode_started:
                    mode = None
        i += 1

    return rows, edit_lines, execution_order


def _is_heading(stripped: str, words: str) -> bool:
    """A `#` heading containing the words, or a short title-like line (as a copied issue shows it)."""
    text = stripped.strip("#*_ ").rstrip(":").strip()
    if not re.search(rf"\b{words}\b", text, re.IGNORECASE):
        return False
    if stripped.startswith("#"):
        return True
    return len(text.split()) <= _HEADING_MAX_WORDS and not text.endswith((".", "!", "?"))


def _cells(line: str) -> list[str]:
    body = line.strip()[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body)]


def _unbold(cell: str) -> str:
    return cell.strip("*_ ").strip()


def _table_rows(lines: list[str], start: int, end: int, section: str, source: str) -> list[_Row]:
    header = [_unbold(cell) for cell in _cells(lines[start])]
    if header[0].lower() != "id":
        return []
    header_line = start + 1
    lowered = [name.lower() for name in header]
    if "priority" not in lowered:
        raise BacklogError(
            f"{source} line {header_line}: the item table has no Priority column; "
            "add one holding HIGH, MEDIUM or LOW."
        )
    priority_column = lowered.index("priority")
    if len(header) < 3 or priority_column == 1:
        raise BacklogError(
            f"{source} line {header_line}: the item table's second column must say the change; "
            "write its header like '| ID | Change | Priority |'."
        )
    body = start + 1
    if body < end and all(_SEPARATOR_CELL.fullmatch(cell) for cell in _cells(lines[body])):
        body += 1

    rows = []
    for index in range(body, end):
        line_no = index + 1
        raw = lines[index].strip()
        cells = _cells(lines[index])
        if len(cells) != len(header):
            raise BacklogError(
                f"{source} line {line_no}: the row '{raw}' has {len(cells)} cells but its table has "
                f"{len(header)} columns; give every row the header's columns."
            )
        item_id = _unbold(cells[0]).upper()
        if not _ID.fullmatch(item_id):
            raise BacklogError(
                f"{source} line {line_no}: the ID '{cells[0]}' is not of the form MM-1; "
                "write letters, a dash and a number."
            )
        priority = _unbold(cells[priority_column]).upper()
        if priority not in PRIORITIES:
            raise BacklogError(
                f"{source} line {line_no}: the priority '{cells[priority_column]}' of {item_id} is unknown; "
                "write HIGH, MEDIUM or LOW."
            )
        change = cells[1] if lowered[1] == "change" else f"{header[1]}: {cells[1]}"
        extra = {
            header[column]: cells[column]
            for column in range(2, len(header))
            if column != priority_column
        }
        rows.append(_Row(item_id, section, change, priority, extra, line_no))
    return rows


def _parse_edits(
    edit_lines: list[tuple[int, str, str]], defined: dict[str, int], source: str
) -> dict[str, list[Assignment]]:
    edits: dict[str, list[Assignment]] = {}
    for line_no, raw_id, statement_text in edit_lines:
        item_id = raw_id.upper()
        where = f"{source} line {line_no}"
        if item_id not in defined:
            raise BacklogError(
                f"{where}: the edit is for {item_id}, which no table defines; "
                "add a row for it or fix the ID."
            )
        code_span = _CODE_SPAN.fullmatch(statement_text.strip())
        if code_span:
            statement_text = code_span.group(1) + code_span.group(2)
        try:
            statements = ast.parse(statement_text).body
        except SyntaxError:
            statements = []
        if not statements:
            raise BacklogError(
                f"{where}: '{statement_text}' is not of the form NAME = value; "
                "write assignments like 'MUON_NS_STEPS = 3', joined by ';'."
            )
        for statement in statements:
            text = ast.get_source_segment(statement_text, statement) or statement_text
            if not (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
            ):
                raise BacklogError(
                    f"{where}: '{text}' is not of the form NAME = value; "
                    "write assignments like 'MUON_NS_STEPS = 3', joined by ';'."
                )
            name = statement.targets[0].id
            if not _UPPER_SNAKE.fullmatch(name):
                raise BacklogError(
                    f"{where}: '{name}' is not an UPPER_SNAKE constant name; "
                    "name a constant of train.py such as MUON_NS_STEPS."
                )
            value = ast.get_source_segment(statement_text, statement.value) or ""
            try:
                ast.literal_eval(statement.value)
            except (ValueError, TypeError, RecursionError):
                raise BacklogError(
                    f"{where}: the value '{value}' of {name} is not a Python literal; "
                    "write a number, a quoted string, True, False, None, or a list or tuple of those."
                ) from None
            item_edits = edits.setdefault(item_id, [])
            if any(edit.name == name for edit in item_edits):
                raise BacklogError(
                    f"{where}: {item_id} sets {name} a second time; give each constant one value per item."
                )
            item_edits.append(Assignment(name, value))
    return edits
