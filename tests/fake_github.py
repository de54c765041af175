"""A local stand-in of GitHub's REST API for the issue endpoint: a ThreadingHTTPServer on 127.0.0.1 that
records each request's path and headers and plays programmed answers; the real `requests` talks to it."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Answer:
    status: int = 200
    payload: object = None          # sent as JSON unless raw is given
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]  # lower-case names


def issue(body: str | None, etag: str = '"v1"', title: str = "Backlog for the week") -> Answer:
    payload = {"number": 7, "title": title, "body": body, "html_url": "https://github.com/owner/repo/issues/7",
               "updated_at": "2026-05-01T10:00:00Z", "state": "open"}
    return Answer(200, payload, {"ETag": etag})


def error(status: int, message: str, **headers: str) -> Answer:
    return Answer(status, {"message": message, "documentation_url": "https://docs.github.com/rest"},
                  {name.replace("_", "-"): value for name, value in headers.items()})


class GitHubStub:
    """Serves GET requests from a queue of Answers and records each request's path and headers."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def play(self, *answers: Answer) -> None:
        with self._lock:
            self._answers.extend(answers)

    def __enter__(self) -> GitHubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, seen: Seen) -> Answer:
        with self._lock:
            self.requests.append(seen)
            if self._answers:
                return self._answers.pop(0)
        return error(418, "the stub has no answer programmed")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = stub._next(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
                data = b"" if answer.status == 304 else (
                    answer.raw if answer.raw is not None else json.dumps(answer.payload).encode())
                self.send_response(answer.status)
                headers = {"Content-Type": "application/json; charset=utf-8", **answer.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                if answer.status != 304:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
