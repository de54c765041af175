"""Anthropic's text editor tool (str_replace_based_edit_tool), run against an in-memory train.py.

The Claude proposer hands each editor call to an EditorSession: `view` reads train.py or a read-only
project file, `str_replace` and `insert` change the in-memory train.py, and anything else is answered
with an error the model sees. Nothing on disk is written: the loop commits the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

VIEW_MAX_CHARS = 60_000  # a view longer than this is clipped
SNIPPET_CONTEXT = 3  # lines shown around an edit


class ToolCallError(Exception):
    """An editor call that cannot be carried out; the message is the error tool_result the model sees."""


class EditorSession:
    """Anthropic's text editor tool over an in-memory train.py; the other project files are read-only."""

    def __init__(self, train_py: str, readable: Mapping[str, Path], repo_root: Path):
        self.train_py = train_py
        self._readable = dict(readable)  # name the model uses -> file on disk
        self._names = ["train.py", *self._readable]
        self._roots = {PurePosixPath(repo_root.as_posix()), PurePosixPath(repo_root.resolve().as_posix())}

    def run(self, params: object) -> tuple[str, bool]:
        """The tool_result text of one call, and whether it is an error."""
        try:
            return self._dispatch(params if isinstance(params, dict) else {}), False
        except ToolCallError as refusal:
            return str(refusal), True

    def _dispatch(self, params: Mapping[str, object]) -> str:
        command = params.get("command")
        if command == "view":
            return self._view(params)
        if command in ("str_replace", "insert"):
            name = self._name(params)
            if name != "train.py":
                raise ToolCallError(f"only train.py may be edited; {name} is read-only.")
            return self._str_replace(params) if command == "str_replace" else self._insert(params)
        if command == "create":
            raise ToolCallError("create is not allowed: an experiment changes train.py only, with str_replace or insert.")
        if not isinstance(command, str):
            raise ToolCallError("the call needs a 'command': view, str_replace or insert.")
        raise ToolCallError(f"there is no command '{command}'; use view, str_replace or insert.")

    def _name(self, params: Mapping[str, object]) -> str:
        raw = params.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise ToolCallError("the call needs a 'path' relative to the repository root, such as train.py.")
        path = PurePosixPath(raw.strip())
        for root in self._roots:
            if path.is_absolute() and path.is_relative_to(root):
                path = path.relative_to(root)
        name = str(path)
        if name not in self._names and name != ".":
            raise ToolCallError(f"{raw} is not available; the files are {', '.join(self._names)}.")
        return name

    def _text(self, name: str) -> str:
        if name == "train.py":
            return self.train_py
        try:
            return self._readable[name].read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise ToolCallError(f"{name} does not exist yet.") from None

    def _view(self, params: Mapping[str, object]) -> str:
        name = self._name(params)
        if name == ".":
            return "Files, relative to the repository root (only train.py is editable):\n" + "\n".join(self._names)
        lines = lines_of(self._text(name))
        start, end = 1, len(lines)
        view_range = params.get("view_range")
        if view_range is not None:
            if not (isinstance(view_range, list) and len(view_range) == 2 and all(_is_int(v) for v in view_range)):
                raise ToolCallError("view_range must be two line numbers [start, end], with end -1 for the last line.")
            start, end = view_range
            end = len(lines) if end == -1 else end
            if not 1 <= start <= len(lines):
                raise ToolCallError(f"view_range starts at line {start}, but {name} has lines 1 to {len(lines)}.")
            if end < start:
                raise ToolCallError(f"view_range ends at line {end}, before its start {start}.")
            if end > len(lines):
                raise ToolCallError(
                    f"view_range ends at line {end}, but {name} has lines 1 to {len(lines)}; use -1 for the last line."
                )
        body = numbered(lines[start - 1:end], start) or f"{name} is empty."
        if len(body) > VIEW_MAX_CHARS:
            body = body[:VIEW_MAX_CHARS] + f"\n<clipped at {VIEW_MAX_CHARS} characters; view a smaller view_range>"
        return body

    def _str_replace(self, params: Mapping[str, object]) -> str:
        old, new = params.get("old_str"), params.get("new_str", "")
        if not isinstance(old, str) or not old:
            raise ToolCallError("str_replace needs a non-empty 'old_str' copied exactly from train.py.")
        if not isinstance(new, str):
            raise ToolCallError("str_replace needs 'new_str' as a string (empty to delete old_str).")
        count = self.train_py.count(old)
        if count == 0:
            raise ToolCallError(
                "old_str was not found in train.py; view the file and copy the text exactly, whitespace included."
            )
        if count > 1:
            raise ToolCallError(
                f"old_str occurs {count} times in train.py; include more surrounding lines so it is unique."
            )
        at = self.train_py.index(old)
        self.train_py = self.train_py[:at] + new + self.train_py[at + len(old):]
        first = self.train_py.count("\n", 0, at) + 1
        return self._snippet(first, first + new.count("\n"))

    def _insert(self, params: Mapping[str, object]) -> str:
        line = params.get("insert_line")
        text = params.get("insert_text", params.get("new_str"))  # text_editor_20250124 called it new_str
        lines = lines_of(self.train_py)
        if not _is_int(line):
            raise ToolCallError("insert needs 'insert_line', the line to insert after (0 for the top of the file).")
        if not isinstance(text, str) or not text:
            raise ToolCallError("insert needs a non-empty 'insert_text'.")
        if not 0 <= line <= len(lines):
            raise ToolCallError(
                f"insert_line {line} is outside train.py, which has lines 1 to {len(lines)}; use 0 for the top."
            )
        inserted = lines_of(text)
        ends_with_newline = self.train_py.endswith("\n") or not self.train_py
        self.train_py = "\n".join(lines[:line] + inserted + lines[line:]) + ("\n" if ends_with_newline else "")
        return self._snippet(line + 1, line + len(inserted))

    def _snippet(self, first: int, last: int) -> str:
        lines = lines_of(self.train_py)
        start = max(1, first - SNIPPET_CONTEXT)
        end = min(len(lines), last + SNIPPET_CONTEXT)
        return f"Edited train.py; lines {start} to {end} now read:\n" + numbered(lines[start - 1:end], start)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lines_of(text: str) -> list[str]:
    """Lines split on newlines only, so numbers match an editor's; no phantom line after a final newline."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def numbered(lines: Sequence[str], first: int) -> str:
    return "\n".join(f"{number:6}\t{line}" for number, line in enumerate(lines, first))

