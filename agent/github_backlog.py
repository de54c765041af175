"""The experiment backlog read from a GitHub issue's description (--backlog-issue), with a local copy for bad days.

The body is parsed as a backlog, and only then cached at `<prepare.py's cache>/backlogs/<api host>/<owner>/<repo>/
<number>.md` beside `<number>.json` (ETag, fetch time, title, URLs); the ETag makes an unchanged issue a 304, free of
the rate limit. A rate limit, no network or a 5xx falls back to the copy with a note (FAILURES says which and how).
The API is --github-api-url, else the issue URL's host, else GITHUB_API_URL; GITHUB_TOKEN is sent when set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

import prepare  # the data cache's location rule, kept in one place
from agent.backlog import parse_backlog
from agent.stops import UserError

DEFAULT_API_URL = "https://api.github.com"
HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
           "User-Agent": "autoresearch-harness (agent/github_backlog.py)"}
_OWNER_REPO = r"([A-Za-z0-9][A-Za-z0-9_.-]*)/([A-Za-z0-9._-]+)"
_SHORT_SPEC = re.compile(rf"{_OWNER_REPO}#([1-9][0-9]*)")
_URL_PATH = re.compile(rf"/*{_OWNER_REPO}/issues/([1-9][0-9]*)/*")
_SHOWN, _STAMP = "%Y-%m-%d %H:%M:%S UTC", "%Y-%m-%dT%H:%M:%SZ"  # a time in a sentence, and in the metadata

# Each failure: why the cached copy stands in (None: it never does), and the error when it cannot.
FAILURES = {
    "missing": (None, "GitHub at {api} has no issue {ref} (HTTP {status}: {message}); check the owner, repository and "
                      "issue number, and {token_fix}."),
    "bad token": (None, "GitHub at {api} refused the token in GITHUB_TOKEN when reading {ref} (HTTP 401: {message}); "
                        "fix GITHUB_TOKEN, or unset it to read a public issue."),
    "forbidden": (None, "GitHub at {api} refused to show {ref} (HTTP 403: {message}); check that GITHUB_TOKEN may read "
                        "the repository, or {file}."),
    "rate limit": ("GitHub at {api} rate-limited the request (HTTP {status}; {wait})", "GitHub at {api} rate-limited "
                   "the request for {ref} (HTTP {status}: {message}); {wait}{token_hint}, or {file}."),
    "server": ("GitHub at {api} failed with HTTP {status}", "GitHub at {api} failed with HTTP {status} when reading "
               "{ref} ({message}) and no copy is cached; try again later, or {file}."),
    "other": (None, "GitHub at {api} answered HTTP {status} for {ref} ({message}); check the issue, GITHUB_TOKEN and "
                    "--github-api-url, or {file}."),
    "unreachable": ("the GitHub API at {api} cannot be reached ({reason})", "cannot reach the GitHub API at {api} to "
                    "read {ref} ({reason}); check the network or --github-api-url, or {file}."),
    "request": (None, "reading {ref} from the GitHub API at {api} failed ({reason}); check --github-api-url, "
                      "or {file}."),
    "not json": (None, "GitHub at {api} answered {ref} with something that is not JSON ({kind}); point --github-api-url"
                       " at the REST API (https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise)."),
    "empty": (None, "the issue {ref} at {api} has an empty description; write the backlog tables into the issue's "
                    "description, or {file}."),
}
STATUS_FAILURES = {401: "bad token", 403: "forbidden", 404: "missing", 410: "missing", 429: "rate limit"}
# The advice that depends on whether GITHUB_TOKEN is set.
TOKEN_ADVICE = {True: {"token_fix": "make sure GITHUB_TOKEN can read it", "token_hint": ""},
                False: {"token_fix": "for a private repository set GITHUB_TOKEN to a token that can read it",
                        "token_hint": ", set GITHUB_TOKEN for a higher limit"}}
NETWORK_REASONS = {"refused": "connection refused", "unreachable": "network unreachable", **dict.fromkeys((
    "name or service not known", "nodename nor servname", "getaddrinfo failed", "temporary failure in name resolution",
    "no address associated"), "host name not found")}  # what a failed connection's text says, in a few words


class GitHubBacklogError(UserError):
    """The backlog issue cannot be read from GitHub; the message says what to do, in one sentence."""


@dataclass(frozen=True)
class IssueRef:
    """One GitHub issue; `web` is the scheme and host of its URL when it was given as one."""

    owner: str
    repo: str
    number: int
    web: str | None = None  # e.g. "https://github.example.com"; None for OWNER/REPO#N

    def __str__(self) -> str:
        return f"{self.owner}/{self.repo}#{self.number}"


@dataclass(frozen=True)
class FetchedBacklog:
    """The issue's body, cached as markdown at `path`; `note` is set when a cached copy had to be used."""

    path: Path
    ref: IssueRef
    note: str | None
    title: str
    html_url: str


def parse_issue_spec(spec: str) -> IssueRef:
    """`OWNER/REPO#N` or `https://HOST/OWNER/REPO/issues/N` (any host: GitHub Enterprise too)."""
    parts = urlsplit(spec.strip())
    url = parts.scheme in ("http", "https") and parts.netloc and _URL_PATH.fullmatch(parts.path)
    found = _SHORT_SPEC.fullmatch(spec.strip()) or url
    if not found or found.group(2) in (".", ".."):
        raise GitHubBacklogError(f"'{spec}' is not a GitHub issue; give it as OWNER/REPO#N (e.g. "
                                 f"karpathy/autoresearch#7) or https://github.com/OWNER/REPO/issues/N.")
    return IssueRef(found[1], found[2], int(found[3]), f"{parts.scheme}://{parts.netloc.lower()}" if url else None)


def resolve_api_url(ref: IssueRef, api_url: str | None = None) -> str:
    """The REST API to ask: the one given, else the issue URL's host, else GITHUB_API_URL, else api.github.com."""
    on_github = ref.web and urlsplit(ref.web).hostname in ("github.com", "www.github.com")
    from_web = ref.web and (DEFAULT_API_URL if on_github else f"{ref.web}/api/v3")
    chosen = (api_url or from_web or os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL).strip().rstrip("/")
    if urlsplit(chosen).scheme not in ("http", "https") or not urlsplit(chosen).hostname:
        raise GitHubBacklogError(f"the GitHub API URL '{chosen}' is not an http(s) URL; give one like "
                                 f"https://api.github.com or, for GitHub Enterprise, https://HOST/api/v3.")
    return chosen


def fetch_issue_backlog(spec: str, *, api_url: str | None = None, token: str | None = None,
                        cache_dir: Path | None = None, timeout: float = 30.0) -> FetchedBacklog:
    """Fetch, check and cache the backlog in an issue's description; see the module docstring."""
    ref, token = parse_issue_spec(spec), (os.environ.get("GITHUB_TOKEN", "") if token is None else token).strip()
    api = resolve_api_url(ref, api_url)
    cache = Path(cache_dir or Path(prepare.CACHE_DIR) / "backlogs")
    folder = cache / (urlsplit(api).hostname or "unknown-host").lower() / ref.owner / ref.repo
    markdown, meta_file = folder / f"{ref.number}.md", folder / f"{ref.number}.json"
    cached = None  # the cached copy's metadata, or None when no copy is cached
    if markdown.is_file():
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(meta_file.read_text(encoding="utf-8"))
        mtime = dt.datetime.fromtimestamp(markdown.stat().st_mtime, dt.timezone.utc)
        cached = cached if isinstance(cached, dict) else {"fetched_at": f"{mtime:{_STAMP}}"}  # its time, when lost
    words = {"api": api, "ref": ref, "file": "pass the backlog as a file with --backlog FILE",
             **TOKEN_ADVICE[bool(token)]}

    def result(meta: dict, note: str | None = None) -> FetchedBacklog:
        return FetchedBacklog(markdown, ref, note, str(meta.get("title") or ""), str(meta.get("html_url") or ""))

    def fail(failure: str, **details: object) -> FetchedBacklog:
        why, error = FAILURES[failure]
        if why is None or cached is None:
            raise GitHubBacklogError(error.format(**words, **details))
        return result(cached, f"using the copy of {ref} cached at {cached.get('fetched_at') or 'an unknown time'} "
                              f"because {why.format(**words, **details)}; it may be out of date.")

    headers = {**HEADERS, **({"Authorization": f"Bearer {token}"} if token else {}),
               **({"If-None-Match": cached["etag"]} if cached and cached.get("etag") else {})}
    try:
        response = requests.get(f"{api}/repos/{ref.owner}/{ref.repo}/issues/{ref.number}", headers=headers,
                                timeout=timeout)
    except requests.Timeout:
        return fail("unreachable", reason=f"no answer within {timeout:g} s")
    except requests.ConnectionError as exc:
        reason = "the TLS handshake failed" if isinstance(exc, requests.exceptions.SSLError) else next(
            (why for phrase, why in NETWORK_REASONS.items() if phrase in str(exc).lower()), _short(str(exc), 80))
        return fail("unreachable", reason=reason or type(exc).__name__)
    except requests.RequestException as exc:
        return fail("request", reason=f"{type(exc).__name__}: {_short(str(exc))}")
    status, message = response.status_code, _github_message(response)
    if status == 304 and cached is not None:
        return result(cached)
    if status != 200:
        limited = status == 403 and (response.headers.get("X-RateLimit-Remaining") == "0"
                                     or "Retry-After" in response.headers or "rate limit" in message.lower())
        failure = "rate limit" if limited else STATUS_FAILURES.get(status, "server" if status >= 500 else "other")
        return fail(failure, status=status, message=message, wait=_wait_hint(response))
    try:
        issue = response.json()
    except ValueError:
        return fail("not json", kind=response.headers.get("Content-Type", "no content type").split(";")[0])
    body = issue.get("body") if isinstance(issue, dict) else None
    if not isinstance(body, str) or not body.strip():
        return fail("empty")
    parse_backlog(body, source=str(ref))  # a BacklogError says what to fix; the cache stays as it was
    meta = {"etag": response.headers.get("ETag"), "fetched_at": f"{dt.datetime.now(dt.timezone.utc):{_STAMP}}",
            "title": str(issue.get("title") or ""), "html_url": str(issue.get("html_url") or ""),
            "updated_at": issue.get("updated_at"), "api_url": api}
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(markdown, body.encode("utf-8"))  # the body first: an ETag never describes an older one
    _write_atomic(meta_file, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return result(meta)


def _github_message(response: requests.Response) -> str:
    """The first sentence of GitHub's JSON message (ours stays one sentence), else the HTTP reason."""
    with contextlib.suppress(ValueError):
        if isinstance(payload := response.json(), dict) and payload.get("message"):
            return _short(re.split(r"(?<=[.!?])\s", str(payload["message"]).strip())[0].rstrip("."))
    return response.reason or "no message"


def _wait_hint(response: requests.Response) -> str:
    """'wait until …' from Retry-After (seconds or a date), else X-RateLimit-Reset (epoch seconds)."""
    retry_after, reset = (response.headers.get(name, "").strip() for name in ("Retry-After", "X-RateLimit-Reset"))
    if retry_after.isdigit():
        until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=int(retry_after))
        return f"wait until {until:{_SHOWN}} ({int(retry_after)} s)"
    with contextlib.suppress(TypeError, ValueError):  # no readable date: the reset time, or the generic hint
        return f"wait until {email.utils.parsedate_to_datetime(retry_after).astimezone(dt.timezone.utc):{_SHOWN}}"
    if reset.isdigit():
        return f"wait until {dt.datetime.fromtimestamp(int(reset), dt.timezone.utc):{_SHOWN}}"
    return "wait a few minutes"


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it: a reader sees the old file or the new, never half."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
