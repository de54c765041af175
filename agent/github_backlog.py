"""The experiment backlog read straight from a GitHub issue, with a local copy for bad days.

    fetched = fetch_issue_backlog("karpathy/autoresearch#7")   # or https://github.com/karpathy/autoresearch/issues/7
    items = load_backlog(fetched.path)                           # the cached markdown, like any --backlog file

The issue's description (its `body`, markdown) is fetched from GitHub's REST API, parsed with
agent.backlog.parse_backlog, and only then written to
`<AUTORESEARCH_CACHE or ~/.cache/autoresearch>/backlogs/<api host>/<owner>/<repo>/<number>.md`
with a sibling `<number>.json` (ETag, fetch time, title, URLs), so a bad edit of the issue never
replaces a good copy. The next fetch sends the ETag: an unchanged issue costs a 304, which does not
count against GitHub's rate limit. When GitHub rate-limits the request, cannot be reached, or fails
with a 5xx, the cached copy is used and `note` says so; a missing issue (404/410) or a refused token
(401) is always an error, since a stale copy would hide it.

The API URL is, in order: the one given (--github-api-url); for an issue given as a URL, that URL's
host (https://api.github.com for github.com, https://HOST/api/v3 for GitHub Enterprise); the
GITHUB_API_URL variable (GitHub Actions sets it); https://api.github.com. GITHUB_TOKEN, when set,
is sent as a bearer token (private repositories, a higher rate limit).
"""

from __future__ import annotations

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
    short = _SHORT_SPEC.fullmatch(text)
    if short:
        return _checked(IssueRef(short.group(1), short.group(2), int(short.group(3))), spec)
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.netloc:
        segments = parts.path.strip("/").split("/")
        if (len(segments) == 4 and segments[2] == "issues" and re.fullmatch(_OWNER, segments[0])
                and re.fullmatch(_REPO, segments[1]) and re.fullmatch(_NUMBER, segments[3])):
            ref = IssueRef(segments[0], segments[1], int(segments[3]), web=f"{parts.scheme}://{parts.netloc.lower()}")
            return _checked(ref, spec)
    raise GitHubBacklogError(f"'{spec}' is not a GitHub issue; give it as {ACCEPTED_FORMS}.")


def _checked(ref: IssueRef, spec: str) -> IssueRef:
    if ref.repo in (".", ".."):
        raise GitHubBacklogError(f"'{spec}' is not a GitHub issue; give it as {ACCEPTED_FORMS}.")
    return ref


def resolve_api_url(ref: IssueRef, api_url: str | None = None) -> str:
    """The REST API to ask: the one given, else the issue URL's host, else GITHUB_API_URL, else api.github.com."""
    if api_url:
        chosen = api_url
    elif ref.web and urlsplit(ref.web).hostname in _GITHUB_WEB_HOSTS:
        chosen = DEFAULT_API_URL
    elif ref.web:
        chosen = f"{ref.web}/api/v3"
    else:
        chosen = os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL
    chosen = chosen.strip().rstrip("/")
    parts = urlsplit(chosen)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GitHubBacklogError(f"the GitHub API URL '{chosen}' is not an http(s) URL; give one like "
                                 f"https://api.github.com or, for GitHub Enterprise, https://HOST/api/v3.")
    return chosen


def default_cache_dir() -> Path:
    root = os.environ.get("AUTORESEARCH_CACHE") or os.path.join("~", ".cache", "autoresearch")
    return Path(os.path.expanduser(root)) / "backlogs"


def fetch_issue_backlog(spec: str, *, api_url: str | None = None, token: str | None = None,
                        cache_dir: Path | None = None, timeout: float = 30.0) -> FetchedBacklog:
    """Fetch, check and cache the backlog in an issue's description; see the module docstring."""
    ref = parse_issue_spec(spec)
    api = resolve_api_url(ref, api_url)
    token = (token if token is not None else os.environ.get("GITHUB_TOKEN", "")).strip() or None
    cache = _Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), api, ref)
    cached = cache.read()

    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
               "User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cached is not None and cached.get("etag"):
        headers["If-None-Match"] = cached["etag"]
    url = f"{api}/repos/{ref.owner}/{ref.repo}/issues/{ref.number}"

    try:
        response = requests.get(url, headers=headers, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        reason = _network_reason(exc, timeout)
        return _fall_back(cache, cached, ref, f"the GitHub API at {api} cannot be reached ({reason})",
                          f"cannot reach the GitHub API at {api} to read {ref} ({reason}); check the network or "
                          f"--github-api-url, or {_FILE_BACKLOG}.")
    except requests.RequestException as exc:
        raise GitHubBacklogError(f"reading {ref} from the GitHub API at {api} failed ({type(exc).__name__}: "
                                 f"{_short(str(exc))}); check --github-api-url, or {_FILE_BACKLOG}.") from None

    status = response.status_code
    if status == 304 and cached is not None:
        return cache.fetched(cached, note=None)
    if status == 200:
        return _accept(response, cache, ref, api)

    message = _github_message(response)
    if status in (404, 410):
        fix = ("make sure GITHUB_TOKEN can read it" if token
               else "for a private repository set GITHUB_TOKEN to a token that can read it")
        raise GitHubBacklogError(f"GitHub at {api} has no issue {ref} (HTTP {status}: {message}); check the owner, "
                                 f"repository and issue number, and {fix}.")
    if status == 401:
        raise GitHubBacklogError(f"GitHub at {api} refused the token in GITHUB_TOKEN when reading {ref} "
                                 f"(HTTP 401: {message}); fix GITHUB_TOKEN, or unset it to read a public issue.")
    if status in (403, 429) and _rate_limited(response, message):
        wait = _wait_hint(response)
        token_hint = "" if token else ", set GITHUB_TOKEN for a higher limit"
        return _fall_back(cache, cached, ref, f"GitHub at {api} rate-limited the request (HTTP {status}; {wait})",
                          f"GitHub at {api} rate-limited the request for {ref} (HTTP {status}: {message}); {wait}"
                          f"{token_hint}, or {_FILE_BACKLOG}.")
    if status == 403:
        raise GitHubBacklogError(f"GitHub at {api} refused to show {ref} (HTTP 403: {message}); check that "
                                 f"GITHUB_TOKEN may read the repository, or {_FILE_BACKLOG}.")
    if status >= 500:
        return _fall_back(cache, cached, ref, f"GitHub at {api} failed with HTTP {status}",
                          f"GitHub at {api} failed with HTTP {status} when reading {ref} ({message}) and no copy "
                          f"is cached; try again later, or {_FILE_BACKLOG}.")
    raise GitHubBacklogError(f"GitHub at {api} answered HTTP {status} for {ref} ({message}); check the issue, "
                             f"GITHUB_TOKEN and --github-api-url, or {_FILE_BACKLOG}.")


# -- the answer ---------------------------------------------------------------------------------

def _accept(response: requests.Response, cache: _Cache, ref: IssueRef, api: str) -> FetchedBacklog:
    """A 200: check the issue is JSON with a body that parses as a backlog, then cache it."""
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
    meta = {
        "etag": response.headers.get("ETag"),
        "fetched_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "title": str(issue.get("title") or ""),
        "html_url": str(issue.get("html_url") or ""),
        "updated_at": issue.get("updated_at"),
        "api_url": api,
    }
    cache.write(body, meta)
    return cache.fetched(meta, note=None)


def _fall_back(cache: _Cache, cached: dict | None, ref: IssueRef, why: str, error: str) -> FetchedBacklog:
    """The cached copy with a note saying why, or the error when there is none."""
    if cached is None:
        raise GitHubBacklogError(error)
    note = (f"using the copy of {ref} cached at {cached.get('fetched_at') or 'an unknown time'} because {why}; "
            f"it may be out of date.")
    return cache.fetched(cached, note=note)


def _github_message(response: requests.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and payload.get("message"):  # its first sentence: ours stays one
        return _short(re.split(r"(?<=[.!?])\s", str(payload["message"]).strip())[0].rstrip("."))
    return response.reason or "no message"


def _rate_limited(response: requests.Response, message: str) -> bool:
    return (response.status_code == 429 or response.headers.get("X-RateLimit-Remaining") == "0"
            or "Retry-After" in response.headers or "rate limit" in message.lower())


def _wait_hint(response: requests.Response) -> str:
    """'wait until …' from Retry-After (seconds or a date), else X-RateLimit-Reset (epoch seconds)."""
    now = dt.datetime.now(dt.timezone.utc)
    retry_after = response.headers.get("Retry-After", "").strip()
    if retry_after.isdigit():
        until = now + dt.timedelta(seconds=int(retry_after))
        return f"wait until {until:%Y-%m-%d %H:%M:%S} UTC ({int(retry_after)} s)"
    if retry_after:
        try:
            until = email.utils.parsedate_to_datetime(retry_after).astimezone(dt.timezone.utc)
            return f"wait until {until:%Y-%m-%d %H:%M:%S} UTC"
        except (TypeError, ValueError):
            pass
    reset = response.headers.get("X-RateLimit-Reset", "").strip()
    if reset.isdigit():
        until = dt.datetime.fromtimestamp(int(reset), dt.timezone.utc)
        return f"wait until {until:%Y-%m-%d %H:%M:%S} UTC"
    return "wait a few minutes"


def _network_reason(exc: Exception, timeout: float) -> str:
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, requests.exceptions.SSLError):
        return "the TLS handshake failed"
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if any(s in text for s in ("Name or service not known", "nodename nor servname", "getaddrinfo failed",
                               "Temporary failure in name resolution", "No address associated")):
        return "host name not found"
    if "unreachable" in text.lower():
        return "network unreachable"
    return _short(text, 80) or type(exc).__name__


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the cache ----------------------------------------------------------------------------------

class _Cache:
    """`<dir>/<api host>/<owner>/<repo>/<number>.md` (the body, exactly) and `<number>.json` (metadata)."""

    def __init__(self, root: Path, api: str, ref: IssueRef) -> None:
        host = (urlsplit(api).hostname or "unknown-host").lower()
        folder = root / host / ref.owner / ref.repo
        self.ref = ref
        self.markdown = folder / f"{ref.number}.md"
        self.meta = folder / f"{ref.number}.json"

    def read(self) -> dict | None:
        """The metadata of the cached copy, or None when no copy is cached."""
        if not self.markdown.is_file():
            return None
        try:
            meta = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):  # a copy without its metadata: no ETag, its file time as fetch time
            mtime = dt.datetime.fromtimestamp(self.markdown.stat().st_mtime, dt.timezone.utc)
            meta = {"etag": None, "fetched_at": mtime.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return meta

    def write(self, body: str, meta: dict) -> None:
        """The body first, then its metadata, each atomically: an ETag never describes an older body."""
        self.markdown.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.markdown, body.encode("utf-8"))
        _write_atomic(self.meta, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))

    def fetched(self, meta: dict, note: str | None) -> FetchedBacklog:
        return FetchedBacklog(path=self.markdown, ref=self.ref, note=note, title=str(meta.get("title") or ""),
                              html_url=str(meta.get("html_url") or ""))


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
