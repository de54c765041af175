"""The backlog read from a GitHub issue: the real `requests` against a local stand-in of GitHub's REST
API (a ThreadingHTTPServer on 127.0.0.1 that records each request and plays programmed answers), and
the loop's --backlog-issue flag, in process and as a real subprocess."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import prepare
from agent.backlog import BacklogError, backlog_from_flags, load_backlog
from agent.github_backlog import (
    GitHubBacklogError,
    IssueRef,
    fetch_issue_backlog,
    parse_issue_spec,
    resolve_api_url,
)
from agent.loop import REPO_ROOT, build_config, parse_args
from agent.stops import UserError
from fake_github import Answer, GitHubStub, error, issue

ISSUE = "owner/repo#7"
ISSUE_PATH = "/repos/owner/repo/issues/7"
RESET_EPOCH = 1893456000  # 2030-01-01 00:00:00 UTC
BACKLOG = "\r\n".join([  # GitHub keeps the CRLF line ends a browser sends; the cache keeps them too
    "Experiments for the week; the loop reads the tables below.",
    "",
    "## Momentum",
    "",
    "| ID | Change | Priority | Rationale |",
    "|---|---|---|---|",
    "| MM-1 | Start the ramp at 0.9 | MEDIUM | a shorter climb |",
    "| MM-2 | End the ramp at 0.99 | LOW | heavier averaging |",
    "",
    "## Newton-Schulz",
    "",
    "| ID | Change | Priority |",
    "|---|---|---|",
    "| NS-1 | Three iterations | MEDIUM |",
    "| NS-2 | Seven iterations | HIGH |",
    "",
    "## Execution Order",
    "",
    "1. NS-1",
    "2. MM-2",
    "",
    "## Edits",
    "",
    "NS-1: MUON_NS_STEPS = 3",
    "MM-1: MUON_MOMENTUM_START = 0.9",
    "",
])
EXPECTED_ORDER = ["NS-1", "MM-2", "NS-2", "MM-1"]  # execution order, then HIGH, then MEDIUM


@pytest.fixture(autouse=True)
def no_github_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GITHUB_TOKEN", "GITHUB_API_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "backlogs"


def cached_files(cache: Path) -> tuple[Path, Path]:
    folder = cache / "127.0.0.1" / "owner" / "repo"
    return folder / "7.md", folder / "7.json"


def snapshot(cache: Path) -> tuple[bytes, bytes, int, int]:
    markdown, meta = cached_files(cache)
    return markdown.read_bytes(), meta.read_bytes(), markdown.stat().st_mtime_ns, meta.stat().st_mtime_ns


@pytest.fixture
def local_time_not_utc() -> Iterator[None]:
    """A local time zone far from UTC, so a reset time shown in local time would be caught."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fetch(github: GitHubStub | str, cache: Path, **kwargs):
    url = github if isinstance(github, str) else github.url
    return fetch_issue_backlog(kwargs.pop("spec", ISSUE), api_url=url, cache_dir=cache, timeout=5, **kwargs)


def one_sentence(message: str) -> str:
    assert "\n" not in message and message.endswith("."), message
    assert ". " not in message.rstrip("."), message  # one sentence: no full stop before the last
    return message


# -- issue references ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("owner/repo#7", IssueRef("owner", "repo", 7)),
    ("  karpathy/auto-research.v2#123 ", IssueRef("karpathy", "auto-research.v2", 123)),
    ("https://github.com/owner/repo/issues/7", IssueRef("owner", "repo", 7, web="https://github.com")),
    ("https://github.com/owner/repo/issues/7/#issuecomment-99", IssueRef("owner", "repo", 7, web="https://github.com")),
    ("https://GHE.example.com:8443/team/repo/issues/12", IssueRef("team", "repo", 12, web="https://ghe.example.com:8443")),
])
def test_parse_issue_spec_accepts_short_and_url_forms(spec: str, expected: IssueRef):
    ref = parse_issue_spec(spec)
    assert ref == expected
    assert str(ref) == f"{expected.owner}/{expected.repo}#{expected.number}"


@pytest.mark.parametrize("spec", ["", "owner/repo", "owner/repo#", "owner/repo#0", "owner/repo#x", "repo#7",
                                  "owner/repo/7", "owner/..#7", "owner/repo#7 please",
                                  "https://github.com/owner/repo/pull/7", "https://github.com/owner/repo/issues/",
                                  "https://github.com/owner/repo/issues/7/comments", "ftp://github.com/owner/repo/issues/7",
                                  "github.com/owner/repo/issues/7"])
def test_parse_issue_spec_refuses_anything_else_in_one_sentence(spec: str):
    with pytest.raises(GitHubBacklogError) as raised:
        parse_issue_spec(spec)
    assert isinstance(raised.value, UserError)
    message = str(raised.value)
    assert message == (f"'{spec}' is not a GitHub issue; give it as OWNER/REPO#N (e.g. karpathy/autoresearch#7) "
                       f"or https://github.com/OWNER/REPO/issues/N.")


def test_api_url_is_the_given_one_else_the_issue_urls_host_else_the_environment(monkeypatch: pytest.MonkeyPatch):
    short = parse_issue_spec(ISSUE)
    assert resolve_api_url(short) == "https://api.github.com"
    assert resolve_api_url(short, "https://ghe.example.com/api/v3/") == "https://ghe.example.com/api/v3"
    monkeypatch.setenv("GITHUB_API_URL", "https://actions.example.com/api/v3/")
    assert resolve_api_url(short) == "https://actions.example.com/api/v3"
    assert resolve_api_url(parse_issue_spec("https://github.com/o/r/issues/1")) == "https://api.github.com"
    assert resolve_api_url(parse_issue_spec("https://ghe.example.com/o/r/issues/1")) == "https://ghe.example.com/api/v3"
    with pytest.raises(GitHubBacklogError, match="'localhost:8080' is not an http"):
        resolve_api_url(short, "localhost:8080")


# -- a successful fetch -------------------------------------------------------------------------

def test_fetch_parses_the_issue_and_caches_its_body_and_metadata(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG))
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    fetched = fetch(github, cache)

    markdown, meta_file = cached_files(cache)
    assert fetched.path == markdown
    assert fetched.ref == IssueRef("owner", "repo", 7)
    assert (fetched.note, fetched.title, fetched.html_url) == (
        None, "Backlog for the week", "https://github.com/owner/repo/issues/7")
    assert markdown.read_bytes() == BACKLOG.encode()  # exactly the body, CRLF included
    meta = json.loads(meta_file.read_text())
    fetched_at = dt.datetime.strptime(meta.pop("fetched_at"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert before <= fetched_at <= dt.datetime.now(dt.timezone.utc)
    assert meta == {"etag": '"v1"', "title": "Backlog for the week", "html_url": "https://github.com/owner/repo/issues/7",
                    "updated_at": "2026-05-01T10:00:00Z", "api_url": github.url}
    assert sorted(p.name for p in markdown.parent.iterdir()) == ["7.json", "7.md"]  # no temp file left

    items = load_backlog(fetched.path)
    assert [item.id for item in items] == EXPECTED_ORDER
    by_id = {item.id: item for item in items}
    assert [(a.name, a.value) for a in by_id["NS-1"].edits] == [("MUON_NS_STEPS", "3")]
    assert [(a.name, a.value) for a in by_id["MM-1"].edits] == [("MUON_MOMENTUM_START", "0.9")]
    assert by_id["MM-2"].edits == ()
    assert by_id["NS-2"].description == "Newton-Schulz: Seven iterations"
    assert by_id["MM-1"].extra == {"Rationale": "a shorter climb"}


def test_the_request_names_the_issue_and_sends_githubs_headers(github: GitHubStub, cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    github.play(issue(BACKLOG), issue(BACKLOG), issue(BACKLOG))

    fetch(github, cache / "a", token="tok-123")
    fetch(github, cache / "b")
    monkeypatch.setenv("GITHUB_TOKEN", "from-env")
    fetch(github, cache / "c")

    assert [seen.path for seen in github.requests] == [ISSUE_PATH] * 3
    with_token, without, from_env = (seen.headers for seen in github.requests)
    assert with_token["authorization"] == "Bearer tok-123"
    assert "authorization" not in without
    assert from_env["authorization"] == "Bearer from-env"
    for headers in (with_token, without, from_env):
        assert headers["accept"] == "application/vnd.github+json"
        assert headers["x-github-api-version"] == "2022-11-28"
        assert headers["user-agent"].startswith("autoresearch-harness")
        assert "if-none-match" not in headers  # nothing cached yet


def test_api_url_from_the_environment_with_a_trailing_slash(github: GitHubStub, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GITHUB_API_URL", github.url + "/")
    github.play(issue(BACKLOG))

    fetched = fetch_issue_backlog(ISSUE, cache_dir=cache, timeout=5)

    assert [seen.path for seen in github.requests] == [ISSUE_PATH]
    assert json.loads(cached_files(cache)[1].read_text())["api_url"] == github.url
    assert fetched.path == cached_files(cache)[0]


def test_the_url_form_reads_the_same_issue(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG), issue(BACKLOG))

    fetched = fetch(github, cache, spec="https://github.com/owner/repo/issues/7")
    enterprise = fetch_issue_backlog(f"{github.url}/owner/repo/issues/7", cache_dir=cache / "ghe", timeout=5)

    assert fetched.ref == IssueRef("owner", "repo", 7, web="https://github.com")
    assert [item.id for item in load_backlog(fetched.path)] == EXPECTED_ORDER
    # An issue URL on another host is read from that host's GitHub Enterprise API.
    assert [seen.path for seen in github.requests] == [ISSUE_PATH, "/api/v3" + ISSUE_PATH]
    assert enterprise.path == cache / "ghe" / "127.0.0.1" / "owner" / "repo" / "7.md"


def test_an_unchanged_issue_is_a_304_that_reuses_the_cache_without_rewriting_it(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG, etag='"v1"'), Answer(304, headers={"ETag": '"v1"'}))
    first = fetch(github, cache)
    before = snapshot(cache)

    second = fetch(github, cache)

    assert github.requests[1].headers["if-none-match"] == '"v1"'
    assert second == first  # same path, title and URL; no note
    assert snapshot(cache) == before

    edited = BACKLOG.replace("| NS-2 | Seven iterations | HIGH |", "| NS-2 | Seven iterations | LOW |")
    github.play(issue(edited, etag='"v2"'))
    third = fetch(github, cache)

    assert github.requests[2].headers["if-none-match"] == '"v1"'
    assert third.path.read_bytes() == edited.encode()
    assert json.loads(cached_files(cache)[1].read_text())["etag"] == '"v2"'
    assert [item.id for item in load_backlog(third.path)] == ["NS-1", "MM-2", "MM-1", "NS-2"]


# -- errors that always stop --------------------------------------------------------------------

def test_a_missing_issue_says_to_check_it_and_never_falls_back(github: GitHubStub, cache: Path):
    github.play(error(404, "Not Found"))
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache)
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} has no issue owner/repo#7 (HTTP 404: Not Found); check the owner, repository "
        f"and issue number, and for a private repository set GITHUB_TOKEN to a token that can read it.")
    assert not cache.exists()

    github.play(issue(BACKLOG), error(404, "Not Found"), error(410, "This issue was deleted"))
    fetch(github, cache)
    before = snapshot(cache)
    with pytest.raises(GitHubBacklogError, match=r"has no issue owner/repo#7 \(HTTP 404: Not Found\)"):
        fetch(github, cache, token="tok")
    with pytest.raises(GitHubBacklogError, match=r"\(HTTP 410: This issue was deleted\).*make sure GITHUB_TOKEN can read it"):
        fetch(github, cache, token="tok")
    assert snapshot(cache) == before


def test_a_refused_token_says_to_fix_it_even_with_a_cached_copy(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG), error(401, "Bad credentials"))
    fetch(github, cache)
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache, token="expired")
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} refused the token in GITHUB_TOKEN when reading owner/repo#7 "
        f"(HTTP 401: Bad credentials); fix GITHUB_TOKEN, or unset it to read a public issue.")


def test_another_403_states_githubs_message_and_never_falls_back(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG), error(403, "Resource not accessible by integration"))
    fetch(github, cache)
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache, token="tok")
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} refused to show owner/repo#7 (HTTP 403: Resource not accessible by integration); "
        f"check that GITHUB_TOKEN may read the repository, or pass the backlog as a file with --backlog FILE.")


def test_another_4xx_states_the_status_and_githubs_message(github: GitHubStub, cache: Path):
    github.play(error(422, "Validation Failed"))
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache)
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} answered HTTP 422 for owner/repo#7 (Validation Failed); check the issue, "
        f"GITHUB_TOKEN and --github-api-url, or pass the backlog as a file with --backlog FILE.")


# -- rate limits, no network, 5xx: the cached copy if there is one ------------------------------

def test_a_rate_limit_says_when_it_resets_and_how_to_avoid_it(github: GitHubStub, cache: Path, local_time_not_utc):
    github.play(error(403, "API rate limit exceeded for 10.0.0.1. (But here's the good news: Authenticated "
                           "requests get a higher rate limit.)",
                      X_RateLimit_Remaining="0", X_RateLimit_Reset=str(RESET_EPOCH)))
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache)
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} rate-limited the request for owner/repo#7 (HTTP 403: API rate limit exceeded for "
        f"10.0.0.1); wait until 2030-01-01 00:00:00 UTC, set GITHUB_TOKEN for a higher limit, or pass the backlog "
        f"as a file with --backlog FILE.")

    github.play(error(403, "API rate limit exceeded for user ID 1", X_RateLimit_Remaining="0",
                      X_RateLimit_Reset=str(RESET_EPOCH)))
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache, token="tok")
    assert "2030-01-01 00:00:00 UTC" in str(raised.value)
    assert "GITHUB_TOKEN" not in str(raised.value)  # a token is already set


def test_a_429_with_retry_after_and_a_secondary_limit_without_headers(github: GitHubStub, cache: Path):
    github.play(error(429, "Too Many Requests", Retry_After="120"))
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache)
    message = one_sentence(str(raised.value))
    assert "rate-limited the request for owner/repo#7 (HTTP 429: Too Many Requests); wait until " in message
    assert " UTC (120 s), set GITHUB_TOKEN for a higher limit, or pass the backlog as a file" in message
    until = dt.datetime.strptime(message.split("wait until ")[1].split(" UTC")[0], "%Y-%m-%d %H:%M:%S")
    expected = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(seconds=120)
    assert abs((until - expected).total_seconds()) < 10

    github.play(error(403, "You have exceeded a secondary rate limit. Please wait a few minutes."))
    with pytest.raises(GitHubBacklogError, match=r"\(HTTP 403: You have exceeded a secondary rate limit\); "
                                                 r"wait a few minutes, set GITHUB_TOKEN"):
        fetch(github, cache)


def test_a_rate_limit_with_a_cached_copy_returns_it_with_a_note(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG), error(403, "API rate limit exceeded", X_RateLimit_Remaining="0",
                               X_RateLimit_Reset=str(RESET_EPOCH)))
    first = fetch(github, cache)
    before = snapshot(cache)
    fetched_at = json.loads(cached_files(cache)[1].read_text())["fetched_at"]

    again = fetch(github, cache)

    assert (again.path, again.title, again.html_url) == (first.path, first.title, first.html_url)
    assert one_sentence(again.note) == (
        f"using the copy of owner/repo#7 cached at {fetched_at} because GitHub at {github.url} rate-limited the "
        f"request (HTTP 403; wait until 2030-01-01 00:00:00 UTC); it may be out of date.")
    assert snapshot(cache) == before
    assert [item.id for item in load_backlog(again.path)] == EXPECTED_ORDER


def test_no_network_without_and_with_a_cached_copy(github: GitHubStub, cache: Path):
    nowhere = closed_port_url()
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(nowhere, cache)
    assert one_sentence(str(raised.value)) == (
        f"cannot reach the GitHub API at {nowhere} to read owner/repo#7 (connection refused); check the network "
        f"or --github-api-url, or pass the backlog as a file with --backlog FILE.")

    github.play(issue(BACKLOG))
    fetch(github, cache)  # the same host (127.0.0.1), so the same cache
    fetched_at = json.loads(cached_files(cache)[1].read_text())["fetched_at"]
    offline = fetch(nowhere, cache)

    assert offline.path == cached_files(cache)[0]
    assert offline.title == "Backlog for the week"
    assert offline.note == (f"using the copy of owner/repo#7 cached at {fetched_at} because the GitHub API at "
                            f"{nowhere} cannot be reached (connection refused); it may be out of date.")


def test_a_server_error_falls_back_to_the_cache_or_says_so(github: GitHubStub, cache: Path):
    github.play(error(502, "Server Error"))
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache)
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} failed with HTTP 502 when reading owner/repo#7 (Server Error) and no copy is "
        f"cached; try again later, or pass the backlog as a file with --backlog FILE.")

    github.play(issue(BACKLOG), Answer(500, raw=b"<html>oops</html>", headers={"Content-Type": "text/html"}))
    fetch(github, cache)
    before = snapshot(cache)
    fallback = fetch(github, cache)
    assert f"because GitHub at {github.url} failed with HTTP 500; it may be out of date." in fallback.note
    assert fallback.path == cached_files(cache)[0]
    assert snapshot(cache) == before


# -- answers that are not a backlog --------------------------------------------------------------

def test_an_issue_without_a_description_or_without_json(github: GitHubStub, cache: Path):
    github.play(issue(body=None), issue(body="  \r\n"),
                Answer(200, raw=b"<!DOCTYPE html><html></html>", headers={"Content-Type": "text/html; charset=utf-8"}))
    for _ in range(2):
        with pytest.raises(GitHubBacklogError) as raised:
            fetch(github, cache)
        assert one_sentence(str(raised.value)) == (
            f"the issue owner/repo#7 at {github.url} has an empty description; write the backlog tables into the "
            f"issue's description, or pass the backlog as a file with --backlog FILE.")
    with pytest.raises(GitHubBacklogError) as raised:
        fetch(github, cache)
    assert one_sentence(str(raised.value)) == (
        f"GitHub at {github.url} answered owner/repo#7 with something that is not JSON (text/html); point "
        f"--github-api-url at the REST API (https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise).")
    assert not cache.exists()


def test_a_body_without_an_item_table_is_a_backlog_error_and_keeps_the_good_copy(github: GitHubStub, cache: Path):
    github.play(issue(BACKLOG), issue(body="We should try a few things:\n\n- NS-1 fewer iterations\n", etag='"v2"'))
    fetch(github, cache)
    before = snapshot(cache)

    with pytest.raises(BacklogError) as raised:
        fetch(github, cache)

    assert not isinstance(raised.value, GitHubBacklogError)
    assert str(raised.value).startswith("owner/repo#7 holds no backlog items: no table whose first column is ID")
    assert snapshot(cache) == before
    assert sorted(p.name for p in cached_files(cache)[0].parent.iterdir()) == ["7.json", "7.md"]


# -- the loop's flags ---------------------------------------------------------------------------

def test_loop_reports_a_missing_issue_in_one_line_and_exit_2(github: GitHubStub, tmp_path: Path, run_python):
    github.play(error(404, "Not Found"))

    result = run_python("agent/loop.py", "--backlog-issue", ISSUE, "--github-api-url", github.url,
                        env={"AUTORESEARCH_CACHE": str(tmp_path)}, timeout=120)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"loop: GitHub at {github.url} has no issue owner/repo#7 (HTTP 404: Not Found); check the owner, repository "
        f"and issue number, and for a private repository set GITHUB_TOKEN to a token that can read it.")
    assert [seen.path for seen in github.requests] == [ISSUE_PATH]
    assert not (tmp_path / "backlogs").exists()


def test_build_config_reads_the_backlog_from_the_issue(github: GitHubStub, capsys):
    github.play(issue(BACKLOG), error(503, "Service Unavailable"))
    args = parse_args(["--preset", "cpu", "--backlog-issue", ISSUE, "--github-api-url", github.url])

    config = build_config(args)

    assert config.backlog == Path(prepare.CACHE_DIR) / "backlogs" / "127.0.0.1" / "owner" / "repo" / "7.md"
    items = load_backlog(config.backlog)
    assert [item.id for item in items] == EXPECTED_ORDER
    assert [(a.name, a.value) for a in items[0].edits] == [("MUON_NS_STEPS", "3")]
    assert capsys.readouterr().err == ""

    again = build_config(args)  # GitHub is down: the cached copy, and a note on stderr
    assert again.backlog == config.backlog
    err = capsys.readouterr().err
    assert err.startswith("loop: using the copy of owner/repo#7 cached at ")
    assert err.rstrip().endswith(f"because GitHub at {github.url} failed with HTTP 503; it may be out of date.")


def test_backlog_file_stays_the_default_and_excludes_backlog_issue(capsys):
    config = build_config(parse_args(["--preset", "cpu"]))
    assert config.backlog == REPO_ROOT / "agent" / "backlog.md"

    with pytest.raises(SystemExit) as raised:
        parse_args(["--backlog", "b.md", "--backlog-issue", ISSUE])
    assert raised.value.code == 2
    assert "argument --backlog-issue: not allowed with argument --backlog" in capsys.readouterr().err


def test_the_loop_and_the_report_read_the_flags_through_one_function(github: GitHubStub, tmp_path: Path, capsys):
    backlog = tmp_path / "backlog.md"
    backlog.write_text(BACKLOG)

    from_file = backlog_from_flags(backlog, None, github.url, "report")

    assert (from_file.path, [item.id for item in from_file.items]) == (backlog, EXPECTED_ORDER)
    assert github.requests == []  # a file backlog never asks GitHub, whatever --github-api-url says

    github.play(issue(BACKLOG.replace("| NS-2 | Seven iterations | HIGH |", "| NS-2 | Seven iterations | LOW |")),
                error(502, "Server Error"))
    fetched = backlog_from_flags(backlog, ISSUE, github.url, "report")
    assert fetched.path == Path(prepare.CACHE_DIR) / "backlogs" / "127.0.0.1" / "owner" / "repo" / "7.md"
    assert [item.id for item in fetched.items] == ["NS-1", "MM-2", "MM-1", "NS-2"]  # the issue's, not the file's
    assert capsys.readouterr().err == ""
    offline = backlog_from_flags(backlog, ISSUE, github.url, "report")
    assert offline == fetched
    assert capsys.readouterr().err.startswith("report: using the copy of owner/repo#7 cached at ")


@pytest.mark.parametrize("reads_the_backlog", [
    "from agent import loop; loop.build_config(loop.parse_args(['--preset', 'cpu', '--backlog', backlog]))",
    "from agent import report; report.main(['--ledger', ledger, '--backlog', backlog, '--backlog-status'])",
], ids=["loop", "report"])
def test_requests_is_imported_only_when_an_issue_is_read(reads_the_backlog: str, tmp_path: Path, run_python):
    (tmp_path / "backlog.md").write_text(BACKLOG)
    (tmp_path / "experiments.tsv").write_text("")
    script = (f"import sys; backlog, ledger = sys.argv[1:]; {reads_the_backlog}; "
              f"print(sorted({{'requests', 'agent.github_backlog'}} & set(sys.modules)))")

    result = run_python("-c", script, str(tmp_path / "backlog.md"), str(tmp_path / "experiments.tsv"), timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
