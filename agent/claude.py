"""The Claude proposer: one conversation with the Anthropic Messages API edits train.py in memory.

program.md is the system prompt; the first user message holds train.py (the cached prefix) and the
state of the run. The model reads project files and edits train.py through Anthropic's text editor
tool, run here against an in-memory copy (nothing on disk is written: the loop commits the result),
and ends by calling `finish` with a one-line description. Tokens and dollars are summed per
proposal and charged to a CostBudget that caps the whole run.
"""

from __future__ import annotations

import ast
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path, PurePosixPath

import anthropic
from anthropic.types import Message, Usage

from agent.proposer import DESCRIPTION_MAX_CHARS, Proposal, ProposerState, Skip
from agent.stops import LoopStop, UserError

DEFAULT_MODEL = "claude-sonnet-5-5"
EDITOR_NAME = "str_replace_based_edit_tool"
FINISH_NAME = "finish"
TOOLS = [
    {"type": "text_editor_20250728", "name": EDITOR_NAME},
    {
        "name": FINISH_NAME,
        "description": (
            "Call once train.py holds the complete experiment. The description is one line saying what "
            "changed (it becomes the commit message and the ledger entry)."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "description": {"type": "string", "description": "One line, at most ~120 characters."},
            },
            "required": ["description"],
        },
    },
]

_EPHEMERAL = {"type": "ephemeral"}
_VIEW_MAX_CHARS = 60_000
_LOG_TAIL_LINES = 80
_LOG_TAIL_CHARS = 8_000
_SNIPPET_CONTEXT = 3
_RATE_KEYS = ("input", "output", "cache_write", "cache_read")
_LEDGER_COLUMNS = ("experiment", "status", "val_bpb", "description", "reason")
_NUDGE = (
    "Call finish with a one-line description when train.py holds the experiment; make the edit first if it does not."
)
_NUDGE_MAX_TOKENS = (
    "Your reply hit the max_tokens limit before any tool call; make the change in smaller str_replace "
    "edits, then call finish."
)


class MissingApiKey(UserError):
    """No ANTHROPIC_API_KEY in the environment."""


class MissingProgram(UserError):
    """program.md, the system prompt, is not in the repository."""


class MissingPrice(UserError):
    """The model has no price, so its cost cannot be counted against --max-cost."""


class PriceFileError(UserError):
    """A price file that cannot be read as {"model": {"input": ..., "output": ...}}."""


class UnknownModel(UserError):
    """The API answered 404 for the model."""


class BudgetExhausted(LoopStop):
    """The run's --max-cost is spent."""


class ProposerAuthError(LoopStop):
    """The API refused the key or the account (401, 402, 403)."""


class ProposerUnavailable(LoopStop):
    """The API kept failing through the SDK's retries and every backoff step."""


class _Rejected(Exception):
    """A request the API refused for this experiment only (a 4xx); the message is the Skip reason."""


class _Refused(Exception):
    """A tool call that cannot be carried out; the message is the error tool_result the model sees."""


# ---------------------------------------------------------------------------
# Prices, usage and the budget
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Price:
    """USD per million tokens of one model."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    @classmethod
    def of(
        cls, input: float, output: float, cache_write: float | None = None, cache_read: float | None = None
    ) -> Price:
        """A price whose cache rates default to 1.25x input (5-minute write) and 0.1x input (read)."""
        return cls(
            input=input,
            output=output,
            cache_write=input * 1.25 if cache_write is None else cache_write,
            cache_read=input * 0.1 if cache_read is None else cache_read,
        )


# Anthropic's published rates; Opus 5.5 and Fable 5.1 read the cache for less than the usual 0.1x.
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-5-5": Price.of(4.0, 20.0, cache_read=0.20),
    "claude-sonnet-5-5": Price.of(2.0, 10.0),
    "claude-fable-5-1": Price.of(10.0, 50.0, cache_read=0.25),
    "claude-opus-5": Price.of(5.0, 25.0),
    "claude-sonnet-5": Price.of(2.0, 10.0),
    "claude-opus-4-8": Price.of(5.0, 25.0),
    "claude-opus-4-7": Price.of(5.0, 25.0),
    "claude-opus-4-6": Price.of(5.0, 25.0),
    "claude-sonnet-4-6": Price.of(3.0, 15.0),
    "claude-haiku-4-5": Price.of(1.0, 5.0),
    "claude-haiku-4-5-20251001": Price.of(1.0, 5.0),
}


class PriceTable:
    """Per-model prices: the defaults, with a user's price file merged over them."""

    def __init__(self, prices: Mapping[str, Price] | None = None):
        self.prices = {**DEFAULT_PRICES, **(prices or {})}

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """The defaults with a JSON file `{"model": {"input": 3.0, "output": 15.0}}` merged over them."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PriceFileError(f"the price file {path} does not exist; check the path.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PriceFileError(
                f"the price file {path} is not readable JSON ({error}); fix it and run again."
            ) from None
        if not isinstance(data, dict):
            raise PriceFileError(
                f"the price file {path} must map models to prices; write it like {_price_example('claude-x')}."
            )
        return cls({model: _price_entry(path, model, rates) for model, rates in data.items()})

    def price(self, model: str) -> Price:
        try:
            return self.prices[model]
        except KeyError:
            raise MissingPrice(
                f"there is no price for the model '{model}'; give a price file such as {_price_example(model)} "
                "(USD per million tokens) with --prices."
            ) from None


def _price_entry(path: Path, model: str, rates: object) -> Price:
    """One model's price from a price file; cache rates are optional."""
    valid = (
        isinstance(rates, dict)
        and all(_is_number(rates.get(key)) for key in ("input", "output"))
        and all(_is_number(rates[key]) for key in _RATE_KEYS[2:] if key in rates)
    )
    if not valid:
        raise PriceFileError(
            f"the price file {path} gives '{model}' no numeric input and output prices; "
            f"write it like {_price_example(model)} (USD per million tokens)."
        )
    return Price.of(**{key: float(rates[key]) for key in _RATE_KEYS if key in rates})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _price_example(model: str) -> str:
    return json.dumps({model: {"input": 3.0, "output": 15.0}})


@dataclass(frozen=True)
class TokenUsage:
    """Tokens summed over requests, split the way they are billed."""

    input: int = 0  # uncached input
    cache_write: int = 0
    cache_read: int = 0
    output: int = 0

    @classmethod
    def of(cls, usage: Usage) -> TokenUsage:
        return cls(
            input=usage.input_tokens,
            cache_write=usage.cache_creation_input_tokens or 0,
            cache_read=usage.cache_read_input_tokens or 0,
            output=usage.output_tokens,
        )

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input + other.input,
            self.cache_write + other.cache_write,
            self.cache_read + other.cache_read,
            self.output + other.output,
        )

    def cost(self, price: Price) -> float:
        return (
            self.input * price.input
            + self.cache_write * price.cache_write
            + self.cache_read * price.cache_read
            + self.output * price.output
        ) / 1e6

    def ledger(self, price: Price) -> dict[str, float]:
        """The ledger's columns: input_tokens (cache writes included), cached_tokens, output_tokens, cost_usd."""
        return {
            "input_tokens": self.input + self.cache_write,
            "cached_tokens": self.cache_read,
            "output_tokens": self.output,
            "cost_usd": self.cost(price),
        }


@dataclass
class CostBudget:
    """The run's cap on LLM spend in USD (--max-cost); None means no cap."""

    max_usd: float | None
    spent: float = 0.0

    def charge(self, usd: float) -> None:
        self.spent += usd

    def check(self) -> None:
        """Raise BudgetExhausted once the spend reaches the cap."""
        if self.max_usd is not None and self.spent >= self.max_usd:
            raise BudgetExhausted(
                f"the --max-cost budget of ${self.max_usd:.2f} is spent (${self.spent:.2f}); "
                "raise it to continue, the same tag resumes."
            )


# ---------------------------------------------------------------------------
# The text editor tool, run against an in-memory train.py
# ---------------------------------------------------------------------------

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
        except _Refused as refusal:
            return str(refusal), True

    def _dispatch(self, params: Mapping[str, object]) -> str:
        command = params.get("command")
        if command == "view":
            return self._view(params)
        if command in ("str_replace", "insert"):
            name = self._name(params)
            if name != "train.py":
                raise _Refused(f"only train.py may be edited; {name} is read-only.")
            return self._str_replace(params) if command == "str_replace" else self._insert(params)
        if command == "create":
            raise _Refused("create is not allowed: an experiment changes train.py only, with str_replace or insert.")
        if not isinstance(command, str):
            raise _Refused("the call needs a 'command': view, str_replace or insert.")
        raise _Refused(f"there is no command '{command}'; use view, str_replace or insert.")

    def _name(self, params: Mapping[str, object]) -> str:
        raw = params.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise _Refused("the call needs a 'path' relative to the repository root, such as train.py.")
        path = PurePosixPath(raw.strip())
        for root in self._roots:
            if path.is_absolute() and path.is_relative_to(root):
                path = path.relative_to(root)
        name = str(path)
        if name not in self._names and name != ".":
            raise _Refused(f"{raw} is not available; the files are {', '.join(self._names)}.")
        return name

    def _text(self, name: str) -> str:
        if name == "train.py":
            return self.train_py
        try:
            return self._readable[name].read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise _Refused(f"{name} does not exist yet.") from None

    def _view(self, params: Mapping[str, object]) -> str:
        name = self._name(params)
        if name == ".":
            return "Files, relative to the repository root (only train.py is editable):\n" + "\n".join(self._names)
        lines = _lines(self._text(name))
        start, end = 1, len(lines)
        view_range = params.get("view_range")
        if view_range is not None:
            if not (isinstance(view_range, list) and len(view_range) == 2 and all(_is_int(v) for v in view_range)):
                raise _Refused("view_range must be two line numbers [start, end], with end -1 for the last line.")
            start, end = view_range
            end = len(lines) if end == -1 else end
            if not 1 <= start <= len(lines):
                raise _Refused(f"view_range starts at line {start}, but {name} has lines 1 to {len(lines)}.")
            if end < start:
                raise _Refused(f"view_range ends at line {end}, before its start {start}.")
            if end > len(lines):
                raise _Refused(
                    f"view_range ends at line {end}, but {name} has lines 1 to {len(lines)}; use -1 for the last line."
                )
        body = _numbered(lines[start - 1:end], start) or f"{name} is empty."
        if len(body) > _VIEW_MAX_CHARS:
            body = body[:_VIEW_MAX_CHARS] + f"\n<clipped at {_VIEW_MAX_CHARS} characters; view a smaller view_range>"
        return body

    def _str_replace(self, params: Mapping[str, object]) -> str:
        old, new = params.get("old_str"), params.get("new_str", "")
        if not isinstance(old, str) or not old:
            raise _Refused("str_replace needs a non-empty 'old_str' copied exactly from train.py.")
        if not isinstance(new, str):
            raise _Refused("str_replace needs 'new_str' as a string (empty to delete old_str).")
        count = self.train_py.count(old)
        if count == 0:
            raise _Refused(
                "old_str was not found in train.py; view the file and copy the text exactly, whitespace included."
            )
        if count > 1:
            raise _Refused(
                f"old_str occurs {count} times in train.py; include more surrounding lines so it is unique."
            )
        at = self.train_py.index(old)
        self.train_py = self.train_py[:at] + new + self.train_py[at + len(old):]
        first = self.train_py.count("\n", 0, at) + 1
        return self._snippet(first, first + new.count("\n"))

    def _insert(self, params: Mapping[str, object]) -> str:
        line = params.get("insert_line")
        text = params.get("insert_text", params.get("new_str"))  # text_editor_20250124 called it new_str
        lines = _lines(self.train_py)
        if not _is_int(line):
            raise _Refused("insert needs 'insert_line', the line to insert after (0 for the top of the file).")
        if not isinstance(text, str) or not text:
            raise _Refused("insert needs a non-empty 'insert_text'.")
        if not 0 <= line <= len(lines):
            raise _Refused(
                f"insert_line {line} is outside train.py, which has lines 1 to {len(lines)}; use 0 for the top."
            )
        inserted = _lines(text)
        ends_with_newline = self.train_py.endswith("\n") or not self.train_py
        self.train_py = "\n".join(lines[:line] + inserted + lines[line:]) + ("\n" if ends_with_newline else "")
        return self._snippet(line + 1, line + len(inserted))

    def _snippet(self, first: int, last: int) -> str:
        lines = _lines(self.train_py)
        start = max(1, first - _SNIPPET_CONTEXT)
        end = min(len(lines), last + _SNIPPET_CONTEXT)
        return f"Edited train.py; lines {start} to {end} now read:\n" + _numbered(lines[start - 1:end], start)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lines(text: str) -> list[str]:
    """Lines split on newlines only, so numbers match an editor's; no phantom line after a final newline."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _numbered(lines: Sequence[str], first: int) -> str:
    return "\n".join(f"{number:6}\t{line}" for number, line in enumerate(lines, first))


def _description(tool_input: object) -> str:
    """finish's description cut to its first non-empty line and capped; empty when there is none."""
    text = tool_input.get("description") if isinstance(tool_input, dict) else None
    first = next((line for line in text.splitlines() if line.strip()), "") if isinstance(text, str) else ""
    line = " ".join(first.split())
    if len(line) > DESCRIPTION_MAX_CHARS:
        line = line[: DESCRIPTION_MAX_CHARS - 1].rstrip() + "…"
    return line


def _finish_problem(train_py: str, start: str, description: str) -> str | None:
    """Why finish cannot be accepted yet, or None when the proposal is complete."""
    if not description:
        return "finish needs a one-line 'description' of the change."
    if train_py == start:
        return "train.py is unchanged; make the edit with str_replace_based_edit_tool before calling finish."
    try:
        ast.parse(train_py)
    except (SyntaxError, ValueError) as error:
        line = getattr(error, "lineno", None)
        where = f"line {line}: " if line else ""
        message = getattr(error, "msg", None) or str(error)
        return f"train.py does not parse ({where}{message}); fix it before calling finish."
    return None


# ---------------------------------------------------------------------------
# What the model is told
# ---------------------------------------------------------------------------

def _train_py_block(train_py: str) -> dict[str, object]:
    return {
        "type": "text",
        "text": "train.py, as `view` shows it:\n" + _numbered(_lines(train_py), 1),
        "cache_control": _EPHEMERAL,
    }


def _cell(value: object) -> str:
    return " ".join(str(value).split())


def _ledger_tsv(rows: Sequence[Mapping[str, str]]) -> str:
    lines = ["\t".join(_LEDGER_COLUMNS)]
    lines += ["\t".join(_cell(row.get(column, "")) for column in _LEDGER_COLUMNS) for row in rows]
    return "\n".join(lines)


def _log_tail(log: str) -> str:
    tail = "\n".join(log.rstrip().splitlines()[-_LOG_TAIL_LINES:])
    return tail[-_LOG_TAIL_CHARS:]


def _run_state(state: ProposerState, recent_rows: int) -> str:
    sigma = "unknown" if state.sigma is None else f"{state.sigma:.6f}"
    lines = [
        f"Run tag: {state.tag}. Best commit: {state.best_commit}, val_bpb {state.best_val_bpb:.6f} "
        f"(lower is better). Noise floor (sigma of val_bpb): {sigma}.",
        "",
    ]
    rows = state.ledger_rows[-recent_rows:] if recent_rows > 0 else []
    if rows:
        heading = f"The last {len(rows)} of {len(state.ledger_rows)} experiments on this tag, oldest first:"
        lines += [heading, _ledger_tsv(rows)]
    else:
        lines.append("No experiments on this tag yet.")
    return "\n".join(lines)


def _own_experiment_id(rows: Sequence[Mapping[str, str]]) -> str:
    return f"C-{1 + sum(1 for row in rows if row.get('experiment', '').startswith('C-'))}"


def _edit_instructions(files: Sequence[str]) -> str:
    return (
        f"Paths are relative to the repository root; you can view {', '.join(files)}, and edit only train.py "
        f"(with {EDITOR_NAME}: str_replace or insert). When train.py holds the experiment, call finish with a "
        "one-line description of the change."
    )


# ---------------------------------------------------------------------------
# The proposer
# ---------------------------------------------------------------------------

class ClaudeProposer:
    """Proposes an edit of train.py through a tool-use conversation with Claude."""

    name = "claude"

    def __init__(
        self,
        repo_root: Path,
        *,
        backlog_path: Path,
        ledger_path: Path,
        budget: CostBudget,
        model: str | None = None,
        max_turns: int = 24,
        max_tokens: int = 8192,
        prices: PriceTable | None = None,
        client: anthropic.Anthropic | None = None,
        max_retries: int = 2,
        backoff: Sequence[float] = (30, 60, 120, 240, 480),
        recent_rows: int = 20,
    ):
        """model None means AUTORESEARCH_MODEL, else DEFAULT_MODEL; client None means one from the environment."""
        self.repo_root = Path(repo_root)
        self.model = model or os.environ.get("AUTORESEARCH_MODEL") or DEFAULT_MODEL
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.recent_rows = recent_rows
        self._budget = budget
        self._price = (prices or PriceTable()).price(self.model)
        self._backoff = tuple(backoff)
        self._program_path = self.repo_root / "program.md"
        if not self._program_path.is_file():
            raise MissingProgram(f"{self._program_path} is missing; restore program.md, the proposer's instructions.")
        if client is None:
            api_key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
            if not api_key:
                raise MissingApiKey(
                    "ANTHROPIC_API_KEY is not set: export it, "
                    "or run with --proposer backlog for the offline backlog proposer."
                )
            client = anthropic.Anthropic(api_key=api_key, max_retries=max_retries)
        self._client = client
        self._secrets = [secret for secret in (client.api_key, client.auth_token) if secret]
        backlog_path = Path(backlog_path)
        backlog_name = (
            backlog_path.relative_to(self.repo_root).as_posix()
            if backlog_path.is_relative_to(self.repo_root)
            else backlog_path.name
        )
        self._readable = {
            "prepare.py": self.repo_root / "prepare.py",
            "program.md": self._program_path,
            "README.md": self.repo_root / "README.md",
            backlog_name: backlog_path,
            "experiments.tsv": Path(ledger_path),
        }
        self._usage = TokenUsage()
        self.last_usage: dict[str, float] = self._usage.ledger(self._price)

    def propose(self, state: ProposerState) -> Proposal | Skip:
        """Implement the state's backlog item, or an idea of the model's own when the backlog is exhausted."""
        item = state.item
        parts = [_run_state(state, self.recent_rows), ""]
        if state.crash_log:
            parts += ["The last run crashed; the tail of its log:", _log_tail(state.crash_log), ""]
        if item is not None:
            experiment = item.id
            parts += [
                f"Backlog item {item.id}: implement exactly this item.",
                f"id: {item.id}",
                f"section: {item.section}",
                f"change: {item.change}",
                f"priority: {item.priority}",
                *(f"{column.lower()}: {value}" for column, value in item.extra.items()),
            ]
            if item.edits:
                parts.append("edits: " + "; ".join(f"{edit.name} = {edit.value}" for edit in item.edits))
        else:
            experiment = _own_experiment_id(state.ledger_rows)
            parts.append(
                "The backlog is exhausted: propose one idea of your own that is not a repeat of these. "
                f"Its experiment ID is {experiment}."
            )
        parts += ["", _edit_instructions(["train.py", *self._readable])]
        return self._converse(experiment, state.train_py, "\n".join(parts))

    def repair(self, state: ProposerState, proposal: Proposal, crash_log: str, attempt: int) -> Proposal | Skip:
        """Fix a proposal whose run crashed, in a new conversation; the experiment ID stays."""
        brief = "\n".join([
            _run_state(state, self.recent_rows),
            "",
            f"Experiment {proposal.experiment} ({proposal.description}) crashed; this is repair attempt {attempt}. "
            "The train.py above is that experiment's version. The tail of its run log:",
            _log_tail(crash_log),
            "",
            "Fix the crash with the smallest change that keeps the experiment's idea. Then call finish with the "
            "experiment's one-line description (it replaces the old one; you may add the fix in a few words).",
            "",
            _edit_instructions(["train.py", *self._readable]),
        ])
        return self._converse(proposal.experiment, proposal.train_py, brief)

    def _converse(self, experiment: str, train_py: str, brief: str) -> Proposal | Skip:
        self._usage = TokenUsage()
        self.last_usage = self._usage.ledger(self._price)
        session = EditorSession(train_py, self._readable, self.repo_root)
        program = self._program_path.read_text(encoding="utf-8")
        system = [{"type": "text", "text": program, "cache_control": _EPHEMERAL}]
        messages: list[dict[str, object]] = [
            {"role": "user", "content": [_train_py_block(train_py), {"type": "text", "text": brief}]}
        ]
        problem = "the model kept working without calling finish"
        nudged = False
        for _ in range(self.max_turns):
            try:
                response = self._send(system, messages)
            except _Rejected as rejected:
                return Skip(experiment, str(rejected))
            messages.append(response.to_param())
            calls = [block for block in response.content if block.type == "tool_use"]
            if not calls:
                if response.stop_reason == "refusal":
                    return Skip(experiment, "the model declined to make this change (stop_reason refusal).")
                if nudged:
                    said = _cell(" ".join(block.text for block in response.content if block.type == "text"))[:200]
                    reason = f"the model stopped without calling finish, even when reminded (it said: '{said}')."
                    return Skip(experiment, reason)
                nudged, problem = True, "the model stopped without calling finish"
                nudge = _NUDGE_MAX_TOKENS if response.stop_reason == "max_tokens" else _NUDGE
                messages.append({"role": "user", "content": [{"type": "text", "text": nudge}]})
                continue
            results = []
            for call in calls:
                if call.name == FINISH_NAME:
                    description = _description(call.input)
                    text = _finish_problem(session.train_py, train_py, description)
                    if text is None:
                        return Proposal(experiment, description, session.train_py, usage=dict(self.last_usage))
                    is_error = True
                elif call.name == EDITOR_NAME:
                    text, is_error = session.run(call.input)
                else:
                    text, is_error = f"there is no tool named '{call.name}'; use {EDITOR_NAME} or finish.", True
                problem = text if is_error else problem
                results.append({"type": "tool_result", "tool_use_id": call.id, "content": text, "is_error": is_error})
            messages.append({"role": "user", "content": results})
        return Skip(experiment, f"no valid finish in {self.max_turns} turns (last problem: {problem.rstrip('.')}).")

    def _send(self, system: list[dict[str, object]], messages: list[dict[str, object]]) -> Message:
        """One request, after the SDK's own retries and then our backoff; charged to the budget."""
        failures = 0
        while True:
            self._budget.check()
            try:
                response = self._client.messages.create(
                    model=self.model,
                    max_tokens=self.max_tokens,
                    system=system,
                    tools=TOOLS,
                    messages=_with_moving_breakpoint(messages),
                )
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as error:
                if not _transient(error):
                    raise self._refusal(error) from None
                if failures == len(self._backoff):
                    raise ProposerUnavailable(
                        f"the Anthropic API kept failing ({_failure_label(error)}) for "
                        f"{_duration(sum(self._backoff))}; run again later with the same tag to resume."
                    ) from None
                time.sleep(self._backoff[failures])
                failures += 1
                continue
            request = TokenUsage.of(response.usage)
            self._budget.charge(request.cost(self._price))
            self._usage = self._usage + request
            self.last_usage = self._usage.ledger(self._price)
            return response

    def _refusal(self, error: anthropic.APIStatusError) -> Exception:
        """The exception for a request the API refused outright: a loop stop, or a Skip reason."""
        status, kind, message = error.status_code, *_error_details(error)
        if status == 401:
            return ProposerAuthError(
                f"the Anthropic API rejected the API key ({status} {kind}); check ANTHROPIC_API_KEY, "
                "then run again with the same tag."
            )
        if status == 402:
            return ProposerAuthError(
                f"the Anthropic API cannot bill this account ({status} {kind}); check its billing, "
                "then run again with the same tag."
            )
        if status == 403:
            return ProposerAuthError(
                f"the Anthropic API key may not use {self.model} ({status} {kind}); check the key's permissions, "
                "then run again with the same tag."
            )
        if status == 404:
            return UnknownModel(
                f"the Anthropic API at {self._client.base_url} answered {status} {kind} for the model '{self.model}'; "
                f"pass --model with a current model such as {DEFAULT_MODEL}, or check ANTHROPIC_BASE_URL."
            )
        return _Rejected(self._redact(f"the Anthropic API rejected the request ({status} {kind}: {message})."))

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def _with_moving_breakpoint(messages: list[dict[str, object]]) -> list[dict[str, object]]:
    """The messages with a cache breakpoint on their last block: each turn reads the one before from the cache."""
    last = messages[-1]
    content = list(last["content"])
    content[-1] = {**content[-1], "cache_control": _EPHEMERAL}
    return [*messages[:-1], {**last, "content": content}]


def _transient(error: anthropic.APIStatusError | anthropic.APIConnectionError) -> bool:
    if isinstance(error, anthropic.APIConnectionError):
        return True
    return error.status_code in (408, 409, 429) or error.status_code >= 500


def _error_details(error: anthropic.APIStatusError) -> tuple[str, str]:
    """The API's error type and message, from the body `{"error": {"type": ..., "message": ...}}`."""
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(detail.get("type") or "error"), _cell(detail.get("message") or error.message)


def _failure_label(error: anthropic.APIStatusError | anthropic.APIConnectionError) -> str:
    if isinstance(error, anthropic.APITimeoutError):
        return "timeout"
    if isinstance(error, anthropic.APIConnectionError):
        return "connection error"
    if error.status_code == 529:
        return "529 overloaded"
    try:
        return f"{error.status_code} {HTTPStatus(error.status_code).phrase.lower()}"
    except ValueError:
        return f"{error.status_code} {_error_details(error)[0]}"


def _duration(seconds: float) -> str:
    if seconds >= 60:
        return f"{int(seconds // 60)} minutes"
    return f"{seconds:g} seconds"
