"""A local stand-in of the Anthropic Messages HTTP API: the real SDK talks to it over loopback.

It serves `POST /v1/messages` (non-streaming) on 127.0.0.1, records every request, and answers from
a script: each entry is a Reply, a function of the request body that returns one, or an ApiError.
Script a whole conversation that edits train.py:

    with FakeAnthropic() as server:
        server.play(view("train.py"), str_replace("train.py", "DEPTH = 4", "DEPTH = 6"), finish("depth 6"))
        client = server.client()            # or set server.environment() for a subprocess
        ...
        server.tool_results(1)              # the tool_result blocks the second request carried
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic

EDITOR = "str_replace_based_edit_tool"


@dataclass(frozen=True)
class Reply:
    """One assistant message; tool_use blocks without an id get one from the server."""

    content: list[dict[str, object]]
    stop_reason: str = "end_turn"
    usage: Mapping[str, int] = field(default_factory=lambda: token_usage())


@dataclass(frozen=True)
class ApiError:
    """An error response, e.g. ApiError(529, "overloaded_error", "Overloaded")."""

    status: int
    error_type: str
    message: str


Entry = Reply | ApiError | Callable[[dict], Reply]
_EXHAUSTED = ApiError(400, "invalid_request_error", "the fake's script is exhausted")


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict

    @property
    def api_key(self) -> str | None:
        """The key the client sent: SDK 2.x sends it as a bearer token, older ones as x-api-key."""
        bearer = self.headers.get("authorization", "")
        return bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else self.headers.get("x-api-key")


def token_usage(
    input_tokens: int = 100, output_tokens: int = 20, cache_creation: int = 0, cache_read: int = 0
) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
    }


def tool_call(
    name: str, tool_input: dict[str, object], *, text: str | None = None, tokens: Mapping[str, int] | None = None
) -> Reply:
    """A reply that calls one tool, optionally after a text block."""
    content: list[dict[str, object]] = [{"type": "text", "text": text}] if text else []
    content.append({"type": "tool_use", "name": name, "input": tool_input})
    return Reply(content, "tool_use", tokens or token_usage())


def editor(command: str, *, tokens: Mapping[str, int] | None = None, **params: object) -> Reply:
    return tool_call(EDITOR, {"command": command, **params}, tokens=tokens)


def view(path: str, view_range: list[int] | None = None, **kwargs: object) -> Reply:
    params = {"path": path} if view_range is None else {"path": path, "view_range": view_range}
    return editor("view", **params, **kwargs)


def str_replace(path: str, old_str: str, new_str: str, **kwargs: object) -> Reply:
    return editor("str_replace", path=path, old_str=old_str, new_str=new_str, **kwargs)


def insert(path: str, insert_line: int, insert_text: str, **kwargs: object) -> Reply:
    return editor("insert", path=path, insert_line=insert_line, insert_text=insert_text, **kwargs)


def finish(description: str, *, tokens: Mapping[str, int] | None = None) -> Reply:
    return tool_call("finish", {"description": description}, tokens=tokens)


def end_turn(text: str, *, tokens: Mapping[str, int] | None = None) -> Reply:
    return Reply([{"type": "text", "text": text}], "end_turn", tokens or token_usage())


class FakeAnthropic:
    """The fake Messages API server; use as a context manager (or the `fake_anthropic` fixture)."""

    def __init__(self, *entries: Entry):
        self.requests: list[RecordedRequest] = []
        self._script: list[Entry] = list(entries)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._clients: list[anthropic.Anthropic] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for client in self._clients:
            client.close()
        self._server.shutdown()
        self._server.server_close()

    def play(self, *entries: Entry) -> None:
        """Queue entries; each request takes the next one."""
        with self._lock:
            self._script.extend(entries)

    @property
    def pending(self) -> int:
        """Entries not played yet."""
        return len(self._script)

    def client(self, max_retries: int = 0, api_key: str = "test-key") -> anthropic.Anthropic:
        client = anthropic.Anthropic(api_key=api_key, base_url=self.url, max_retries=max_retries)
        self._clients.append(client)
        return client

    def environment(self, api_key: str = "test-key") -> dict[str, str]:
        """Variables that point the SDK (in this process or a child) at this server."""
        return {"ANTHROPIC_BASE_URL": self.url, "ANTHROPIC_API_KEY": api_key}

    def tool_results(self, index: int) -> list[dict]:
        """The tool_result blocks in the last message of request `index`."""
        content = self.requests[index].body["messages"][-1]["content"]
        return [block for block in content if isinstance(block, dict) and block.get("type") == "tool_result"]

    def _answer(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            entry = self._script.pop(0) if self._script else _EXHAUSTED
        if isinstance(entry, ApiError):
            error = {"type": entry.error_type, "message": entry.message}
            return entry.status, {"type": "error", "error": error, "request_id": "req_fake"}
        reply = entry(body) if callable(entry) else entry
        content = [
            {"id": f"toolu_fake_{next(self._ids):04d}", **block} if block["type"] == "tool_use" else block
            for block in reply.content
        ]
        return 200, {
            "id": f"msg_fake_{next(self._ids):04d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-fake"),
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": None,
            "usage": {**token_usage(0, 0), **reply.usage},
        }


def _handler(fake: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class MessagesHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            body = json.loads(raw or b"{}")
            with fake._lock:
                headers = {name.lower(): value for name, value in self.headers.items()}
                fake.requests.append(RecordedRequest(self.path, headers, body))
            if self.path.split("?")[0] != "/v1/messages":
                error = {"type": "not_found_error", "message": f"no route {self.path}"}
                status, payload = 404, {"type": "error", "error": error}
            else:
                status, payload = fake._answer(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", "req_fake")
            # The SDK waits retry-after-ms before retrying; 1 ms keeps retry tests fast.
            self.send_header("retry-after-ms", "1")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return MessagesHandler
