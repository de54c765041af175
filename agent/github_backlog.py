"""The experiment backlog read straight from a GitHub issue (--backlog-issue), with a local copy for bad days.

The issue's description is fetched from GitHub's REST API, parsed as a backlog, and only then written
to `<prepare.py's cache>/backlogs/<api host>/<owner>/<repo>/<number>.md` beside `<number>.json` (ETag,
fetch time, title, URLs), so a bad edit of the issue never replaces a good copy. The next fetch sends
the ETag: an unchanged issue costs a 304, free of GitHub's rate limit. A rate limit, no network or a
5xx falls back to the copy with a note; a missing issue or a refused token is always an error. The API
is --github-api-url, else the issue URL's host (GitHub Enterprise: https://HOST/api/v3), else
GITHUB_API_URL, else https://api.github.com; GITHUB_TOKEN, when set, is sent as a bearer token.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from agent.backlog import parse_backlog
from agent.stops import UserError

DEFAULT_API_URL = "https://api.github.com"
USER_AGENT = "autoresearch-harness (agent/github_backlog.py)"
ACCEPTED_FORMS = "OWNER/REPO#N (e.g. karpathy/autoresearch#7) or https://github.com/OWNER/REPO/issues/N"
_GITHUB_WEB_HOSTS = ("github.com", "www.github.com")
_OWNER = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_REPO = r"[A-Za-z0-9._-]+"
_NUMBER = r"[1-9][0-9]*"
_SHORT_SPEC = re.compile(rf"({_OWNER})/({_REPO})#({_NUMBER})")
_FILE_BACKLOG = "pass the backlog as a file with --backlog FILE"


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
    text = spec.strip()
    short, parts = _SHORT_SPEC.fullmatch(text), urlsplit(text)
    segments = parts.path.strip("/").split("/")
    if short:
        ref = IssueRef(short.group(1), short.group(2), int(short.group(3)))
    elif (parts.scheme in ("http", "https") and parts.netloc and len(segments) == 4 and segments[2] == "issues"
          and re.fullmatch(_OWNER, segments[0]) and re.fullmatch(_REPO, segments[1])
          and re.fullmatch(_NUMBER, segments[3])):
        ref = IssueRef(segments[0], segments[1], int(segments[3]), web=f"{parts.scheme}://{parts.netloc.lower()}")
    else:
        ref = None
    if ref is None or ref.repo in (".", ".."):
        raise GitHubBacklogError(f"'{spec}' is not a GitHub issue; give it as {ACCEPTED_FORMS}.")
    return ref


def resolve_api_url(ref: IssueRef, api_url: str | None = None) -> str:
    """The REST API to ask: the one given, else the issue URL's host, else GITHUB_API_URL, else api.github.com."""
    if api_url:
        chosen = api_url
    elif ref.web:
        chosen = DEFAULT_API_URL if urlsplit(ref.web).hostname in _GITHUB_WEB_HOSTS else f"{ref.web}/api/v3"
    else:
        chosen = os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL
    chosen = chosen.strip().rstrip("/")
    parts = urlsplit(chosen)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GitHubBacklogError(f"the GitHub API URL '{chosen}' is not an http(s) URL; give one like "
                                 f"https://api.github.com or, for GitHub Enterprise, https://HOST/api/v3.")
    return chosen


def backlog_file(backlog: Path, issue: str | None, api_url: str | None, program: str) -> Path:
    """The backlog a command reads: the --backlog file, or --backlog-issue's checked copy (a fallback note on stderr)."""
    if not issue:
        return backlog
    fetched = fetch_issue_backlog(issue, api_url=api_url)
    if fetched.note:
        print(f"{program}: {fetched.note}", file=sys.stderr)
    return fetched.path


def fetch_issue_backlog(spec: str, *, api_url: str | None = None, token: str | None = None,
                        cache_dir: Path | None = None, timeout: float = 30.0) -> FetchedBacklog:
    """Fetch, check and cache the backlog in an issue's description; see the module docstring."""
    ref = parse_issue_spec(spec)
    api = resolve_api_url(ref, api_url)
    token = (token if token is not None else os.environ.get("GITHUB_TOKEN", "")).strip() or None
    if cache_dir is None:
        from prepare import CACHE_DIR  # the data cache's location rule, kept in one place

        cache_dir = Path(CACHE_DIR) / "backlogs"
    folder = Path(cache_dir) / (urlsplit(api).hostname or "unknown-host").lower() / ref.owner / ref.repo
    markdown, meta_file = folder / f"{ref.number}.md", folder / f"{ref.number}.json"
    cached = _read_meta(markdown, meta_file)

    def result(meta: dict, note: str | None = None) -> FetchedBacklog:
        return FetchedBacklog(markdown, ref, note, str(meta.get("title") or ""), str(meta.get("html_url") or ""))

    def fall_back(why: str, error: str) -> FetchedBacklog:
        if cached is None:
            raise GitHubBacklogError(error)
        return result(cached, f"using the copy of {ref} cached at {cached.get('fetched_at') or 'an unknown time'} "
                              f"because {why}; it may be out of date.")

    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28", "User-Agent": USER_AGENT,
               **({"Authorization": f"Bearer {token}"} if token else {}),
               **({"If-None-Match": cached["etag"]} if cached and cached.get("etag") else {})}
    try:
        response = requests.get(f"{api}/repos/{ref.owner}/{ref.repo}/issues/{ref.number}", headers=headers,
                                timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        reason = _network_reason(exc, timeout)
        return fall_back(f"the GitHub API at {api} cannot be reached ({reason})",
                         f"cannot reach the GitHub API at {api} to read {ref} ({reason}); check the network or "
                         f"--github-api-url, or {_FILE_BACKLOG}.")
    except requests.RequestException as exc:
        raise GitHubBacklogError(f"reading {ref} from the GitHub API at {api} failed ({type(exc).__name__}: "
                                 f"{_short(str(exc))}); check --github-api-url, or {_FILE_BACKLOG}.") from None

    status, message = response.status_code, _github_message(response)
    if status == 304 and cached is not None:
        return result(cached)
    if status == 200:
        meta = _accept(response, ref, api)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(markdown, meta.pop("body").encode("utf-8"))  # the body first: an ETag never describes an older one
        _write_atomic(meta_file, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        return result(meta)
    if status in (404, 410):
        fix = ("make sure GITHUB_TOKEN can read it" if token
               else "for a private repository set GITHUB_TOKEN to a token that can read it")
        raise GitHubBacklogError(f"GitHub at {api} has no issue {ref} (HTTP {status}: {message}); check the owner, "
                                 f"repository and issue number, and {fix}.")
    if status == 401:
        raise GitHubBacklogError(f"GitHub at {api} refused the token in GITHUB_TOKEN when reading {ref} "
                                 f"(HTTP 401: {message}); fix GITHUB_TOKEN, or unset it to read a public issue.")
    if status in (403, 429) and (status == 429 or response.headers.get("X-RateLimit-Remaining") == "0"
                                 or "Retry-After" in response.headers or "rate limit" in message.lower()):
        wait = _wait_hint(response)
        return fall_back(f"GitHub at {api} rate-limited the request (HTTP {status}; {wait})",
                         f"GitHub at {api} rate-limited the request for {ref} (HTTP {status}: {message}); {wait}"
                         f"{'' if token else ', set GITHUB_TOKEN for a higher limit'}, or {_FILE_BACKLOG}.")
    if status == 403:
        raise GitHubBacklogError(f"GitHub at {api} refused to show {ref} (HTTP 403: {message}); check that "
                                 f"GITHUB_TOKEN may read the repository, or {_FILE_BACKLOG}.")
    if status >= 500:
        return fall_back(f"GitHub at {api} failed with HTTP {status}",
                         f"GitHub at {api} failed with HTTP {status} when reading {ref} ({message}) and no copy "
                         f"is cached; try again later, or {_FILE_BACKLOG}.")
    raise GitHubBacklogError(f"GitHub at {api} answered HTTP {status} for {ref} ({message}); check the issue, "
                             f"GITHUB_TOKEN and --github-api-url, or {_FILE_BACKLOG}.")


def _accept(response: requests.Response, ref: IssueRef, api: str) -> dict:
    """A 200's issue, checked to be JSON with a body that parses as a backlog: its body and metadata."""
    try:
        issue = response.json()
    except ValueError:
        kind = response.headers.get("Content-Type", "no content type").split(";")[0]
        raise GitHubBacklogError(f"GitHub at {api} answered {ref} with something that is not JSON ({kind}); "
                                 f"point --github-api-url at the REST API (https://api.github.com, or "
                                 f"https://HOST/api/v3 for GitHub Enterprise).") from None
    body = issue.get("body") if isinstance(issue, dict) else None
    if not isinstance(body, str) or not body.strip():
        raise GitHubBacklogError(f"the issue {ref} at {api} has an empty description; write the backlog "
                                 f"tables into the issue's description, or {_FILE_BACKLOG}.")
    parse_backlog(body, source=str(ref))  # a BacklogError says what to fix; the cache stays as it was
    return {"body": body, "etag": response.headers.get("ETag"),
            "fetched_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "title": str(issue.get("title") or ""), "html_url": str(issue.get("html_url") or ""),
            "updated_at": issue.get("updated_at"), "api_url": api}


def _read_meta(markdown: Path, meta_file: Path) -> dict | None:
    """The cached copy's metadata; None when no copy is cached; its file time when the metadata is lost."""
    if not markdown.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict):
        return meta
    mtime = dt.datetime.fromtimestamp(markdown.stat().st_mtime, dt.timezone.utc)
    return {"etag": None, "fetched_at": mtime.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _github_message(response: requests.Response) -> str:
    """The first sentence of GitHub's JSON message (ours stays one sentence), else the HTTP reason."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and payload.get("message"):
        return _short(re.split(r"(?<=[.!?])\s", str(payload["message"]).strip())[0].rstrip("."))
    return response.reason or "no message"


def _wait_hint(response: requests.Response) -> str:
    """'wait until …' from Retry-After (seconds or a date), else X-RateLimit-Reset (epoch seconds)."""
    retry_after = response.headers.get("Retry-After", "").strip()
    reset = response.headers.get("X-RateLimit-Reset", "").strip()
    if retry_after.isdigit():
        until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=int(retry_after))
        return f"wait until {until:%Y-%m-%d %H:%M:%S} UTC ({int(retry_after)} s)"
    try:
        until = email.utils.parsedate_to_datetime(retry_after).astimezone(dt.timezone.utc) if retry_after else None
    except (TypeError, ValueError):
        until = None  # an unreadable Retry-After: the reset time, or the generic hint
    if until is not None:
        return f"wait until {until:%Y-%m-%d %H:%M:%S} UTC"
    if reset.isdigit():
        return f"wait until {dt.datetime.fromtimestamp(int(reset), dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    return "wait a few minutes"


# What a failed connection's text says, in a few words.
_NETWORK_REASONS = {"refused": "connection refused", "name or service not known": "host name not found",
                    "nodename nor servname": "host name not found", "getaddrinfo failed": "host name not found",
                    "temporary failure in name resolution": "host name not found",
                    "no address associated": "host name not found", "unreachable": "network unreachable"}


def _network_reason(exc: Exception, timeout: float) -> str:
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, requests.exceptions.SSLError):
        return "the TLS handshake failed"
    found = [reason for phrase, reason in _NETWORK_REASONS.items() if phrase in str(exc).lower()]
    return found[0] if found else _short(str(exc), 80) or type(exc).__name__


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write_atomic(path: Path, data: bytes) -> None:
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
