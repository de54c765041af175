"""The Claude proposer: one conversation with the Anthropic Messages API edits train.py in memory.

program.md is the system prompt; the first user message holds train.py (the cached prefix) and the
state of the run. The model reads project files and edits train.py through Anthropic's text editor
tool (agent/editor_tool.py, run against an in-memory copy: the loop commits the result), and ends by
calling `finish` with a one-line description. Every Proposal or Skip carries the tokens and dollars
of its conversation; each request is charged to the tag's CostBudget (--max-cost) before the next.
"""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path

import anthropic
from anthropic.types import Message

from agent.cost import CostBudget, PriceTable, TokenUsage
from agent.editor_tool import EditorSession, lines_of, numbered
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
_LOG_TAIL_LINES = 80
_LOG_TAIL_CHARS = 8_000
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


class UnknownModel(UserError):
    """The API answered 404 for the model."""


class ProposerAuthError(LoopStop):
    """The API refused the key or the account (401, 402, 403)."""


class ProposerUnavailable(LoopStop):
    """The API kept failing through the SDK's retries and every backoff step."""


class RequestRejected(Exception):
    """A request the API refused for this experiment only; the message is the Skip reason."""


# What a failed request means, by HTTP status. Retried (and so is a failed connection): the same request
# again after the SDK's own retries, once per backoff step. Stopping: no later request can succeed, so the
# loop stops with the sentence. Any other status: the API refused this experiment's request; it is skipped.
RETRIED_STATUSES = frozenset({408, 409, 429, *range(500, 600)})
STOPPING_STATUSES: dict[int, tuple[type[Exception], str]] = {
    401: (ProposerAuthError, "the Anthropic API rejected the API key ({status} {kind}); check ANTHROPIC_API_KEY, "
                             "then run again with the same tag."),
    402: (ProposerAuthError, "the Anthropic API cannot bill this account ({status} {kind}); check its billing, "
                             "then run again with the same tag."),
    403: (ProposerAuthError, "the Anthropic API key may not use {model} ({status} {kind}); check the key's "
                             "permissions, then run again with the same tag."),
    404: (UnknownModel, "the Anthropic API at {base_url} answered {status} {kind} for the model '{model}'; "
                        "pass --model with a current model such as {default_model}, or check ANTHROPIC_BASE_URL."),
}


# ---------------------------------------------------------------------------
# The finish tool
# ---------------------------------------------------------------------------

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
        "text": "train.py, as `view` shows it:\n" + numbered(lines_of(train_py), 1),
        "cache_control": _EPHEMERAL,
    }


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _ledger_tsv(rows: Sequence[Mapping[str, str]]) -> str:
    lines = ["\t".join(_LEDGER_COLUMNS)]
    lines += ["\t".join(_one_line(row.get(column, "")) for column in _LEDGER_COLUMNS) for row in rows]
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

    def propose(self, state: ProposerState) -> Proposal | Skip:
        """Implement the state's backlog item, or an idea of the model's own when the backlog is exhausted."""
        item = state.item
        parts = [_run_state(state, self.recent_rows), ""]
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
        usage = TokenUsage()
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
            except RequestRejected as rejected:
                return Skip(experiment, str(rejected), usage.ledger(self._price))
            usage = usage + TokenUsage.of(response.usage)
            messages.append(response.to_param())
            calls = [block for block in response.content if block.type == "tool_use"]
            if not calls:
                if response.stop_reason == "refusal":
                    reason = "the model declined to make this change (stop_reason refusal)."
                    return Skip(experiment, reason, usage.ledger(self._price))
                if nudged:
                    said = _one_line(" ".join(block.text for block in response.content if block.type == "text"))[:200]
                    reason = f"the model stopped without calling finish, even when reminded (it said: '{said}')."
                    return Skip(experiment, reason, usage.ledger(self._price))
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
                        return Proposal(experiment, description, session.train_py, usage.ledger(self._price))
                    is_error = True
                elif call.name == EDITOR_NAME:
                    text, is_error = session.run(call.input)
                else:
                    text, is_error = f"there is no tool named '{call.name}'; use {EDITOR_NAME} or finish.", True
                problem = text if is_error else problem
                results.append({"type": "tool_result", "tool_use_id": call.id, "content": text, "is_error": is_error})
            messages.append({"role": "user", "content": results})
        reason = f"no valid finish in {self.max_turns} turns (last problem: {problem.rstrip('.')})."
        return Skip(experiment, reason, usage.ledger(self._price))

    def _send(self, system: list[dict[str, object]], messages: list[dict[str, object]]) -> Message:
        """One request, after the SDK's own retries and then one more per backoff step; charged to the budget."""
        for wait in (*self._backoff, None):
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
                status = getattr(error, "status_code", None)  # None: the connection failed or timed out
                if status is not None and status not in RETRIED_STATUSES:
                    raise self._refusal(error) from None
                if wait is None:
                    raise ProposerUnavailable(
                        f"the Anthropic API kept failing ({_failure_label(error)}) for "
                        f"{_duration(sum(self._backoff))}; run again later with the same tag to resume."
                    ) from None
                time.sleep(wait)
                continue
            self._budget.charge(TokenUsage.of(response.usage).cost(self._price))
            return response

    def _refusal(self, error: anthropic.APIStatusError) -> Exception:
        """The exception for a request the API refused outright: a loop stop, or the reason to skip."""
        status, (kind, message) = error.status_code, _error_details(error)
        if status in STOPPING_STATUSES:
            stop, sentence = STOPPING_STATUSES[status]
            return stop(sentence.format(status=status, kind=kind, model=self.model, base_url=self._client.base_url,
                                        default_model=DEFAULT_MODEL))
        return RequestRejected(self._redact(f"the Anthropic API rejected the request ({status} {kind}: {message})."))

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


def _error_details(error: anthropic.APIStatusError) -> tuple[str, str]:
    """The API's error type and message, from the body `{"error": {"type": ..., "message": ...}}`."""
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(detail.get("type") or "error"), _one_line(detail.get("message") or error.message)


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
