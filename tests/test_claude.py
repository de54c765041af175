"""The Claude proposer, driven through the real anthropic SDK against the local fake Messages API."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import anthropic
import pytest
from anthropic._data import DEPRECATED_MODELS
from anthropic.types import Model

from agent.backlog import Assignment, BacklogItem
from agent.claude import (
    DEFAULT_MODEL,
    ClaudeProposer,
    MissingApiKey,
    ProposerAuthError,
    ProposerUnavailable,
    UnknownModel,
)
from agent.cost import BudgetExhausted, CostBudget, MissingPrice, PriceFileError, PriceTable
from agent.proposer import Proposal, ProposerState, Skip
from fake_anthropic import (
    EDITOR,
    ApiError,
    FakeAnthropic,
    Reply,
    editor,
    end_turn,
    finish,
    insert,
    str_replace,
    token_usage,
    tool_call,
    view,
)

TRAIN_PY = '''\
"""A tiny stand-in of train.py."""
DEPTH = 4  # transformer blocks
MATRIX_LR = 0.02  # Muon learning rate
MUON_NS_STEPS = 5  # Newton-Schulz iterations
EMBEDDING_LR = 0.02  # AdamW learning rate for embeddings

def main():
    print(DEPTH, MATRIX_LR, MUON_NS_STEPS)
'''
PREPARE_PY = "MAX_SEQ_LEN = 256\n"
PROGRAM_MD = "You are an autonomous ML researcher. Change only train.py.\n"
ITEM = BacklogItem(
    id="NS-1",
    section="Newton-Schulz iterations",
    change="Three orthogonalisation iterations instead of five",
    priority="MEDIUM",
    order=0,
    edits=(Assignment("MUON_NS_STEPS", "3"),),
    extra={"Rationale": "Cheaper steps buy more of them"},
)
NS3 = TRAIN_PY.replace("MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3")
SECRET = "sk-ant-api03-secret-key"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "agent").mkdir()
    (tmp_path / "train.py").write_text(TRAIN_PY)
    (tmp_path / "prepare.py").write_text(PREPARE_PY)
    (tmp_path / "program.md").write_text(PROGRAM_MD)
    (tmp_path / "README.md").write_text("# readme\n")
    (tmp_path / "agent" / "backlog.md").write_text("| ID | Change | Priority |\n|---|---|---|\n| NS-1 | three | MEDIUM |\n")
    (tmp_path / "experiments.tsv").write_text("commit\tval_bpb\n")
    return tmp_path


def state(
    item: BacklogItem | None = ITEM, rows: list[dict[str, str]] | None = None, sigma: float | None = 0.004
) -> ProposerState:
    return ProposerState(
        tag="nov28", best_commit="abc1234", best_val_bpb=1.234567, sigma=sigma,
        ledger_rows=rows or [], item=item, train_py=TRAIN_PY,
    )


def proposer(
    repo: Path, client: anthropic.Anthropic | None, *, budget: CostBudget | None = None, **options
) -> ClaudeProposer:
    """A proposer on the fixture repository; client None makes it build its own from the environment."""
    return ClaudeProposer(
        repo,
        backlog_path=repo / "agent" / "backlog.md",
        ledger_path=repo / "experiments.tsv",
        budget=budget or CostBudget(None),
        client=client,
        **options,
    )


def result(server: FakeAnthropic, index: int) -> tuple[str, bool]:
    [block] = server.tool_results(index)
    return block["content"], block.get("is_error", False)


def test_a_scripted_view_replace_and_finish_becomes_the_proposal(repo, fake_anthropic):
    fake_anthropic.play(
        view("train.py"),
        str_replace("train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"),
        finish("MUON_NS_STEPS = 3: three Newton-Schulz iterations"),
    )
    proposal = proposer(repo, fake_anthropic.client()).propose(state())

    assert proposal == Proposal("NS-1", "MUON_NS_STEPS = 3: three Newton-Schulz iterations", NS3, usage=proposal.usage)
    assert len(fake_anthropic.requests) == 3 and fake_anthropic.pending == 0
    viewed, is_error = result(fake_anthropic, 1)
    assert not is_error and viewed.splitlines()[3] == "     4\tMUON_NS_STEPS = 5  # Newton-Schulz iterations"
    assert result(fake_anthropic, 2) == (
        "Edited train.py; lines 1 to 7 now read:\n"
        '     1\t"""A tiny stand-in of train.py."""\n'
        "     2\tDEPTH = 4  # transformer blocks\n"
        "     3\tMATRIX_LR = 0.02  # Muon learning rate\n"
        "     4\tMUON_NS_STEPS = 3  # Newton-Schulz iterations\n"
        "     5\tEMBEDDING_LR = 0.02  # AdamW learning rate for embeddings\n"
        "     6\t\n"
        "     7\tdef main():",
        False,
    )
    assert (repo / "train.py").read_text() == TRAIN_PY
    body = fake_anthropic.requests[0].body
    assert body["model"] == DEFAULT_MODEL and body["max_tokens"] == 8192
    assert body["tools"][0] == {"type": "text_editor_20250728", "name": EDITOR}
    assert body["tools"][1]["name"] == "finish" and body["tools"][1]["input_schema"]["required"] == ["description"]
    assert fake_anthropic.requests[0].api_key == "test-key"


def test_the_request_caches_program_md_and_train_py_and_states_the_item(repo, fake_anthropic):
    rows = [
        {"experiment": "MM-1", "status": "discard", "val_bpb": "1.240000", "description": "first", "reason": "r1"},
        {
            "experiment": "MM-2", "status": "keep", "val_bpb": "1.234567",
            "description": "second\tone", "reason": "-0.01 < -2 sigma",
        },
        {"experiment": "MM-3", "status": "crash", "val_bpb": "0.000000", "description": "third", "reason": "exit 1"},
    ]
    fake_anthropic.play(str_replace("train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"), finish("three"))
    proposer(repo, fake_anthropic.client(), recent_rows=2).propose(state(rows=rows))

    first = fake_anthropic.requests[0].body
    assert first["system"] == [{"type": "text", "text": PROGRAM_MD, "cache_control": {"type": "ephemeral"}}]
    stable, variable = first["messages"][0]["content"]
    assert stable["cache_control"] == {"type": "ephemeral"}
    assert stable["text"].splitlines()[1:3] == [
        '     1\t"""A tiny stand-in of train.py."""',
        "     2\tDEPTH = 4  # transformer blocks",
    ]
    text = variable["text"]
    assert "Best commit: abc1234, val_bpb 1.234567" in text and "Noise floor (sigma of val_bpb): 0.004000" in text
    assert "The last 2 of 3 experiments on this tag, oldest first:\n" in text
    assert "experiment\tstatus\tval_bpb\tdescription\treason\n" in text
    assert "MM-2\tkeep\t1.234567\tsecond one\t-0.01 < -2 sigma\nMM-3\tcrash\t0.000000\tthird\texit 1" in text
    assert "MM-1" not in text
    assert "Backlog item NS-1: implement exactly this item." in text
    assert "change: Three orthogonalisation iterations instead of five" in text
    assert "priority: MEDIUM" in text and "rationale: Cheaper steps buy more of them" in text
    assert "edits: MUON_NS_STEPS = 3" in text
    assert "agent/backlog.md" in text and "experiments.tsv" in text

    second = fake_anthropic.requests[1].body["messages"]
    assert "cache_control" not in second[0]["content"][1]
    assert second[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    for request in fake_anthropic.requests:
        blocks = request.body["system"] + [b for m in request.body["messages"] for b in m["content"]]
        assert sum("cache_control" in block for block in blocks) == 3


def test_edits_outside_train_py_create_and_malformed_calls_come_back_as_errors(repo, fake_anthropic):
    fake_anthropic.play(
        str_replace("prepare.py", "MAX_SEQ_LEN = 256", "MAX_SEQ_LEN = 512"),
        editor("create", path="new.py", file_text="x = 1\n"),
        view("secrets.txt"),
        editor("str_replace", path="train.py", new_str="x"),
        editor("undo_edit", path="train.py"),
        tool_call("bash", {"command": "ls"}),
        str_replace("train.py", "MUON_NS_STEPS = 7", "MUON_NS_STEPS = 3"),
        finish(" \n "),
        str_replace(str(repo / "train.py"), "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"),
        finish("three"),
    )
    proposal = proposer(repo, fake_anthropic.client()).propose(state())

    assert isinstance(proposal, Proposal) and proposal.train_py == NS3
    assert [result(fake_anthropic, i) for i in range(1, 9)] == [
        ("only train.py may be edited; prepare.py is read-only.", True),
        ("create is not allowed: an experiment changes train.py only, with str_replace or insert.", True),
        (
            "secrets.txt is not available; the files are "
            "train.py, prepare.py, program.md, README.md, agent/backlog.md, experiments.tsv.",
            True,
        ),
        ("str_replace needs a non-empty 'old_str' copied exactly from train.py.", True),
        ("there is no command 'undo_edit'; use view, str_replace or insert.", True),
        ("there is no tool named 'bash'; use str_replace_based_edit_tool or finish.", True),
        ("old_str was not found in train.py; view the file and copy the text exactly, whitespace included.", True),
        ("finish needs a one-line 'description' of the change.", True),
    ]
    assert result(fake_anthropic, 9)[1] is False
    assert (repo / "prepare.py").read_text() == PREPARE_PY and not (repo / "new.py").exists()


def test_a_non_unique_old_str_says_how_many_times_it_occurs(repo, fake_anthropic):
    fake_anthropic.play(
        str_replace("train.py", "0.02", "0.03"),
        str_replace("train.py", "MATRIX_LR = 0.02", "MATRIX_LR = 0.03"),
        finish("matrix lr 0.03"),
    )
    proposal = proposer(repo, fake_anthropic.client()).propose(state())

    assert result(fake_anthropic, 1) == ("old_str occurs 2 times in train.py; include more surrounding lines so it is unique.", True)
    assert proposal.train_py == TRAIN_PY.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.03")


def test_insert_checks_its_line_and_inserts_after_it(repo, fake_anthropic):
    fake_anthropic.play(
        insert("train.py", 99, "WARMUP_STEPS = 10"),
        insert("train.py", -1, "WARMUP_STEPS = 10"),
        insert("train.py", 5, "WARMUP_STEPS = 10  # linear warmup\n"),
        finish("add warmup constant"),
    )
    proposal = proposer(repo, fake_anthropic.client()).propose(state())

    assert result(fake_anthropic, 1) == ("insert_line 99 is outside train.py, which has lines 1 to 8; use 0 for the top.", True)
    assert result(fake_anthropic, 2)[1] is True
    lines = TRAIN_PY.splitlines(keepends=True)
    assert proposal.train_py == "".join(lines[:5] + ["WARMUP_STEPS = 10  # linear warmup\n"] + lines[5:])


def test_view_range_shows_those_lines_and_rejects_bad_ranges(repo, fake_anthropic):
    fake_anthropic.play(
        view("train.py", [2, 3]),
        view("train.py", [7, -1]),
        view("train.py", [0, 2]),
        view("train.py", [5, 99]),
        view("./prepare.py"),
        view("experiments.tsv"),
        view("."),
        str_replace("train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"),
        finish("three"),
    )
    proposer(repo, fake_anthropic.client()).propose(state())

    assert result(fake_anthropic, 1) == ("     2\tDEPTH = 4  # transformer blocks\n     3\tMATRIX_LR = 0.02  # Muon learning rate", False)
    assert result(fake_anthropic, 2) == ("     7\tdef main():\n     8\t    print(DEPTH, MATRIX_LR, MUON_NS_STEPS)", False)
    assert result(fake_anthropic, 3) == ("view_range starts at line 0, but train.py has lines 1 to 8.", True)
    assert result(fake_anthropic, 4) == ("view_range ends at line 99, but train.py has lines 1 to 8; use -1 for the last line.", True)
    assert result(fake_anthropic, 5) == ("     1\tMAX_SEQ_LEN = 256", False)
    assert result(fake_anthropic, 6) == ("     1\tcommit\tval_bpb", False)
    assert result(fake_anthropic, 7)[0].splitlines()[1:] == [
        "train.py", "prepare.py", "program.md", "README.md", "agent/backlog.md", "experiments.tsv",
    ]


def test_an_unchanged_train_py_cannot_finish_and_the_turn_limit_skips(repo, fake_anthropic):
    fake_anthropic.play(finish("nothing"), view("train.py"), finish("still nothing"))
    skip = proposer(repo, fake_anthropic.client(), max_turns=3).propose(state())

    unchanged = "train.py is unchanged; make the edit with str_replace_based_edit_tool before calling finish."
    assert result(fake_anthropic, 1) == (unchanged, True)
    assert skip == Skip("NS-1", f"no valid finish in 3 turns (last problem: {unchanged.rstrip('.')}).", skip.usage)
    assert skip.usage["output_tokens"] == 60  # three answered requests of 20 output tokens each
    assert len(fake_anthropic.requests) == 3


def test_an_unparseable_train_py_cannot_finish_and_the_error_names_the_line(repo, fake_anthropic):
    fake_anthropic.play(
        str_replace("train.py", "def main():", "def main(:"),
        finish("broken"),
        str_replace("train.py", "def main(:", "def main():"),
        str_replace("train.py", "DEPTH = 4", "DEPTH = 6"),
        finish("DEPTH = 6\nsecond line dropped"),
    )
    proposal = proposer(repo, fake_anthropic.client()).propose(state())

    text, is_error = result(fake_anthropic, 2)
    assert is_error and text.startswith("train.py does not parse (line 7: ") and text.endswith("); fix it before calling finish.")
    assert proposal.train_py == TRAIN_PY.replace("DEPTH = 4", "DEPTH = 6")
    assert proposal.description == "DEPTH = 6"


def test_a_long_description_is_cut_and_edits_and_finish_may_share_a_turn(repo, fake_anthropic):
    both = Reply(
        [
            {"type": "text", "text": "Making the change."},
            {
                "type": "tool_use",
                "name": EDITOR,
                "input": {"command": "str_replace", "path": "train.py", "old_str": "DEPTH = 4", "new_str": "DEPTH = 6"},
            },
            {"type": "tool_use", "name": "finish", "input": {"description": "deeper " * 40}},
        ],
        "tool_use",
    )
    fake_anthropic.play(both)
    proposal = proposer(repo, fake_anthropic.client()).propose(state())

    assert len(fake_anthropic.requests) == 1
    assert proposal.train_py == TRAIN_PY.replace("DEPTH = 4", "DEPTH = 6")
    assert proposal.description == ("deeper " * 17).strip() + "…" and len(proposal.description) == 119


def test_an_exhausted_backlog_asks_for_an_own_idea_and_a_model_that_stops_is_nudged_then_skipped(repo, fake_anthropic):
    rows = [{"experiment": e, "status": "discard"} for e in ("baseline", "C-1", "NS-1", "C-2")]
    fake_anthropic.play(end_turn("I would try a wider model."), end_turn("Still thinking about it."))
    skip = proposer(repo, fake_anthropic.client()).propose(state(item=None, rows=rows, sigma=None))

    text = fake_anthropic.requests[0].body["messages"][0]["content"][1]["text"]
    assert (
        "The backlog is exhausted: propose one idea of your own that is not a repeat of these. "
        "Its experiment ID is C-3."
    ) in text
    assert "Noise floor (sigma of val_bpb): unknown." in text
    nudge = fake_anthropic.requests[1].body["messages"][-1]
    assert nudge["role"] == "user" and nudge["content"][0]["text"].startswith("Call finish with a one-line description")
    assert skip == Skip(
        "C-3", "the model stopped without calling finish, even when reminded (it said: 'Still thinking about it.').",
        skip.usage,
    )


def test_the_sdk_retries_529_and_500_then_the_conversation_goes_on(repo, fake_anthropic):
    fake_anthropic.play(
        ApiError(529, "overloaded_error", "Overloaded"),
        ApiError(500, "api_error", "Internal server error"),
        str_replace("train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"),
        finish("three"),
    )
    proposal = proposer(repo, fake_anthropic.client(max_retries=2)).propose(state())

    assert isinstance(proposal, Proposal) and proposal.train_py == NS3
    assert [r.headers["x-stainless-retry-count"] for r in fake_anthropic.requests] == ["0", "1", "2", "0"]
    assert proposal.usage["output_tokens"] == 40  # two answered requests of 20 output tokens each


def test_backoff_retries_the_same_request_after_the_sdk_gives_up(repo, fake_anthropic):
    fake_anthropic.play(
        ApiError(529, "overloaded_error", "Overloaded"),
        str_replace("train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"),
        finish("three"),
    )
    proposal = proposer(repo, fake_anthropic.client(), backoff=(0.01,)).propose(state())

    assert isinstance(proposal, Proposal)
    assert fake_anthropic.requests[0].body == fake_anthropic.requests[1].body
    assert len(fake_anthropic.requests) == 3


def test_when_every_backoff_step_fails_the_loop_stops(repo, fake_anthropic):
    fake_anthropic.play(*[ApiError(529, "overloaded_error", "Overloaded")] * 6)
    with pytest.raises(ProposerUnavailable) as stop:
        proposer(repo, fake_anthropic.client(max_retries=1), backoff=(0.01, 0.01)).propose(state())

    assert str(stop.value) == (
        "the Anthropic API kept failing (529 overloaded) for 0.02 seconds; run again later with the same tag to resume."
    )
    assert len(fake_anthropic.requests) == 6  # (1 + 2 backoff steps) x (1 + 1 SDK retry)


def test_a_rejected_key_stops_the_loop_without_showing_the_key(repo, fake_anthropic):
    fake_anthropic.play(ApiError(401, "authentication_error", f"invalid x-api-key {SECRET}"))
    claude = proposer(repo, fake_anthropic.client(api_key=SECRET))
    with pytest.raises(ProposerAuthError) as stop:
        claude.propose(state())

    assert str(stop.value) == (
        "the Anthropic API rejected the API key (401 authentication_error); check ANTHROPIC_API_KEY, "
        "then run again with the same tag."
    )
    assert stop.value.__cause__ is None and stop.value.__suppress_context__
    assert fake_anthropic.requests[0].api_key == SECRET and len(fake_anthropic.requests) == 1


def test_a_bad_request_skips_the_item_with_the_apis_message_redacted(repo, fake_anthropic):
    fake_anthropic.play(ApiError(400, "invalid_request_error", f"prompt is too long (key {SECRET})"))
    claude = proposer(repo, fake_anthropic.client(api_key=SECRET))

    assert claude.propose(state()) == Skip(
        "NS-1", "the Anthropic API rejected the request (400 invalid_request_error: prompt is too long (key [redacted])).",
        {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "cost_usd": 0.0},
    )


def test_an_unknown_model_stops_the_loop_instead_of_skipping_every_item(repo, fake_anthropic):
    fake_anthropic.play(ApiError(404, "not_found_error", "model: claude-opus-5-5x"))
    prices = PriceTable.load(price_file(repo))
    claude = proposer(repo, fake_anthropic.client(), model="claude-opus-5-5x", prices=prices)
    with pytest.raises(UnknownModel) as stop:
        claude.propose(state())

    assert str(stop.value) == (
        f"the Anthropic API at {fake_anthropic.url} answered 404 not_found_error for the model 'claude-opus-5-5x'; "
        "pass --model with a current model such as claude-sonnet-5-5, or check ANTHROPIC_BASE_URL."
    )


def price_file(repo: Path) -> Path:
    path = repo / "prices.json"
    path.write_text(json.dumps({"claude-opus-5-5x": {"input": 4.0, "output": 20.0}}))
    return path


def test_usage_and_cost_are_summed_over_the_requests_and_charged(repo, fake_anthropic):
    # claude-sonnet-5-5: $2 input, $10 output, $2.50 cache write, $0.20 cache read per million tokens.
    fake_anthropic.play(
        str_replace(
            "train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3", tokens=token_usage(1000, 100, cache_creation=2000)
        ),
        finish("three", tokens=token_usage(50, 200, cache_read=2000)),
    )
    budget = CostBudget(5.0, spent=1.0)
    claude = proposer(repo, fake_anthropic.client(), budget=budget)
    proposal = claude.propose(state())

    # (1050 x 2.0 + 2000 x 2.5 + 2000 x 0.2 + 300 x 10.0) / 1e6 = 0.0105
    assert proposal.usage == pytest.approx(
        {"input_tokens": 3050, "cached_tokens": 2000, "output_tokens": 300, "cost_usd": 0.0105}
    )
    assert budget.spent == pytest.approx(1.0105)


def test_a_skip_still_charges_its_cost(repo, fake_anthropic):
    fake_anthropic.play(finish("nothing", tokens=token_usage(10_000, 1_000)))
    budget = CostBudget(None)
    claude = proposer(repo, fake_anthropic.client(), budget=budget, max_turns=1)

    skip = claude.propose(state())
    assert isinstance(skip, Skip)
    assert budget.spent == pytest.approx(0.03)  # 10k x $2 + 1k x $10 per million
    assert skip.usage == pytest.approx(
        {"input_tokens": 10_000, "cached_tokens": 0, "output_tokens": 1_000, "cost_usd": 0.03}
    )


def test_a_spent_budget_stops_before_any_request(repo, fake_anthropic):
    with pytest.raises(BudgetExhausted) as stop:
        proposer(repo, fake_anthropic.client(), budget=CostBudget(5.0, spent=5.03)).propose(state())

    assert str(stop.value) == "the --max-cost budget of $5.00 is spent ($5.03); raise it to continue, the same tag resumes."
    assert fake_anthropic.requests == []


def test_the_budget_is_checked_before_every_request(repo, fake_anthropic):
    fake_anthropic.play(view("train.py", tokens=token_usage(1000, 0)), finish("never sent"))
    budget = CostBudget(0.002)
    with pytest.raises(BudgetExhausted):
        proposer(repo, fake_anthropic.client(), budget=budget).propose(state())

    assert len(fake_anthropic.requests) == 1 and budget.spent == pytest.approx(0.002)


def test_repair_shows_the_crash_and_keeps_the_experiment_id(repo, fake_anthropic):
    broken = NS3.replace("print(DEPTH, MATRIX_LR, MUON_NS_STEPS)", "print(DEPTH, MATRIX_LR, MUON_STEPS)")
    crash_log = "step 00000 (0.0%)\nTraceback (most recent call last):\nNameError: name 'MUON_STEPS' is not defined\n"
    fake_anthropic.play(str_replace("train.py", "MUON_STEPS)", "MUON_NS_STEPS)"), finish("three NS steps (fixed a name)"))
    failed = Proposal("NS-1", "three NS steps", broken)
    repaired = proposer(repo, fake_anthropic.client()).repair(state(), failed, crash_log, attempt=2)

    assert repaired == Proposal("NS-1", "three NS steps (fixed a name)", NS3, usage=repaired.usage)
    stable, variable = fake_anthropic.requests[0].body["messages"][0]["content"]
    assert "     8\t    print(DEPTH, MATRIX_LR, MUON_STEPS)" in stable["text"]
    assert "Experiment NS-1 (three NS steps) crashed; this is repair attempt 2." in variable["text"]
    assert "NameError: name 'MUON_STEPS' is not defined" in variable["text"]


def test_without_an_api_key_the_sentence_says_what_to_do(repo, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(MissingApiKey) as stop:
        proposer(repo, None)

    assert str(stop.value) == (
        "ANTHROPIC_API_KEY is not set: export it, or run with --proposer backlog for the offline backlog proposer."
    )


def test_the_environment_gives_the_key_the_base_url_and_the_model(repo, fake_anthropic, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    for name, value in fake_anthropic.environment(api_key="env-key").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AUTORESEARCH_MODEL", "claude-opus-5-5")
    fake_anthropic.play(str_replace("train.py", "MUON_NS_STEPS = 5", "MUON_NS_STEPS = 3"), finish("three"))
    claude = proposer(repo, None)

    assert isinstance(claude.propose(state()), Proposal)
    assert fake_anthropic.requests[0].api_key == "env-key"
    assert fake_anthropic.requests[0].body["model"] == "claude-opus-5-5"


def test_the_default_model_is_current_and_priced():
    [listed] = typing.get_args(Model)[:1]
    assert DEFAULT_MODEL in typing.get_args(listed)
    assert DEFAULT_MODEL not in DEPRECATED_MODELS
    assert PriceTable().price(DEFAULT_MODEL).input == 2.0


def test_a_price_file_merges_over_the_defaults(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({
        "claude-sonnet-5-5": {"input": 3, "output": 15},
        "local-model": {"input": 1.0, "output": 2.0, "cache_read": 0.01},
    }))
    table = PriceTable.load(path)

    sonnet = table.price("claude-sonnet-5-5")
    assert (sonnet.input, sonnet.output, sonnet.cache_write, sonnet.cache_read) == pytest.approx((3.0, 15.0, 3.75, 0.3))
    local = table.price("local-model")
    assert (local.cache_write, local.cache_read) == pytest.approx((1.25, 0.01))
    assert table.price("claude-opus-5-5").cache_read == pytest.approx(0.20)

    path.write_text(json.dumps({"local-model": {"input": "cheap"}}))
    with pytest.raises(PriceFileError, match="gives 'local-model' no numeric input and output prices"):
        PriceTable.load(path)


def test_a_model_without_a_price_is_refused_before_any_request(repo, fake_anthropic):
    with pytest.raises(MissingPrice) as stop:
        proposer(repo, fake_anthropic.client(), model="claude-unpriced-1")

    assert str(stop.value) == (
        "there is no price for the model 'claude-unpriced-1'; give a price file such as "
        '{"claude-unpriced-1": {"input": 3.0, "output": 15.0}} (USD per million tokens) with --prices.'
    )
