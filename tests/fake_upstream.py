"""A scripted OpenAI-compatible server on loopback: stands in for a vLLM or llama-server upstream where a test needs
to control what it does (die mid-reply, hold replies, fail its health check). Test infrastructure only.

It streams `words` as chat-completion chunks, then a finish and [DONE]. `die_after`: the connection is cut after
that many chunks (a killed process). `gate`: every reply waits for it before its first chunk (headers go out
first, so the caller's submit returns). `health`: the status /health answers; `hang_health` holds /health open
until the server stops. Every request body is kept in `requests`, in arrival order. `tokenize`: it answers
llama-server's POST /tokenize (so the engine takes it for a llama.cpp server, which enforces a `grammar`);
without it, it is an upstream of unknown kind (token counts estimated). `script`: a function that writes the
whole answer itself, raw, through a ScriptedReply (a hostile or broken upstream: any status, body or pace).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeUpstream:
    def __init__(self, *, words=("Hello", " there", "."), die_after: int | None = None, tokenize: bool = True,
                 script=None):
        self.words = tuple(words)
        self.script = script
        self.tokenize_body = None  # text -> raw JSON bytes answered by /tokenize for it (None: a fair answer)
        self.headers_seen: list[dict] = []
        self.tokenize = tokenize
        self.die_after = die_after
        self.gate = threading.Event()
        self.gate.set()
        self.health = 200
        self.hang_health = False
        self.requests: list[dict] = []
        self._stopped = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path != "/health":
                    return self._answer(404, {"error": {"message": "not found"}})
                if fake.hang_health:
                    fake._stopped.wait(60)
                    return
                self._answer(fake.health, {"status": "ok" if fake.health == 200 else "unavailable"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                fake.headers_seen.append(dict(self.headers))
                if self.path == "/tokenize" and fake.tokenize and isinstance(body.get("content"), str):
                    raw = fake.tokenize_body(body["content"]) if fake.tokenize_body is not None else None
                    if raw is not None:
                        return self._answer_raw(raw)
                    return self._answer(200, {"tokens": list(range(len(body["content"]) // 4 + 1))})
                if self.path != "/v1/chat/completions":
                    return self._answer(404, {"error": {"message": "not found"}})
                fake.requests.append(body)
                if fake.script is not None:
                    try:
                        return fake.script(ScriptedReply(self, fake._stopped))
                    except OSError:  # the engine closed the connection: what a script waits for
                        return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                self.wfile.flush()
                fake.gate.wait(60)
                for index, word in enumerate(fake.words):
                    if fake.die_after is not None and index == fake.die_after:
                        self.connection.shutdown(socket.SHUT_RDWR)  # cut, as a killed process's socket
                        return
                    self._event({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                self._event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(fake.words)}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, data: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
                self.wfile.flush()

            def _answer(self, status: int, data: dict) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _answer_raw(self, payload: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:  # the engine stopped reading: what a hostile answer waits for
                    pass

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()


class ScriptedReply:
    """An upstream's answer written raw by a test's script. `stopped` is set when the fake upstream stops."""

    def __init__(self, handler: BaseHTTPRequestHandler, stopped: threading.Event):
        self._handler = handler
        self.stopped = stopped

    def head(self, content_type: str = "text/event-stream", status: int = 200) -> None:
        self._handler.send_response(status)
        self._handler.send_header("Content-Type", content_type)
        self._handler.end_headers()  # HTTP/1.0: the body ends when the connection closes
        self._handler.wfile.flush()

    def raw(self, data: bytes) -> None:
        self._handler.wfile.write(data)
        self._handler.wfile.flush()

    def event(self, data) -> None:
        """One SSE event: a dict as JSON, or bytes as they are."""
        self.raw(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")

    def delta(self, content) -> None:
        self.event({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})

    def finish(self, *, usage=None) -> None:
        """A finish, the usage (a dict, or raw JSON bytes), and [DONE]."""
        self.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.event(usage if isinstance(usage, bytes) else {"choices": [], "usage": usage or {"prompt_tokens": 5,
                                                                                          "completion_tokens": 1}})
        self.raw(b"data: [DONE]\n\n")

    def every(self, seconds: float, data: bytes, *, for_seconds: float) -> None:
        """Write `data` every `seconds` for `for_seconds` (or until the fake stops, or the engine leaves)."""
        until = time.monotonic() + for_seconds
        while time.monotonic() < until and not self.stopped.is_set():
            self.raw(data)
            time.sleep(seconds)
