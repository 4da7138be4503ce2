"""/tokenize for a remote model (backend openai_compatible) whose upstream has no tokenize endpoint, or while no
upstream answers: the engine then counts tokens by an estimate whose ids are placeholders, so /tokenize refuses
(400, 503) instead of inventing ids."""

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chat.engine import ModelSpec
from tests.factories import make_api_client
from tests.live import free_port

pytestmark = pytest.mark.django_db


class NoTokenizeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible server without any tokenize endpoint (as some hosted APIs are): healthy, and 404 for
    every POST this test makes."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer(200 if self.path == "/health" else 404, {"status": "ok"})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(404, {"error": {"message": "Not found"}})

    def _answer(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream_without_tokenize():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoTokenizeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def serve_remote_model(settings, upstream: str) -> None:
    remote = ModelSpec("remote", "", backend="openai_compatible", base_urls=(upstream,), connect_timeout=2)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=(remote,), default_model="remote")
    settings.API_RATE_LIMIT = ""


@pytest.fixture
def remote_site(settings, upstream_without_tokenize):
    serve_remote_model(settings, upstream_without_tokenize)


def test_tokenize_refuses_when_the_upstream_cannot_tell_its_token_ids(remote_site):
    client = make_api_client("ann")
    for body in ({"content": "Hello there, sailor."}, {"content": "Hello", "with_pieces": True, "model": "remote"}):
        response = client.post("/tokenize", body, format="json")
        assert response.status_code == 400, response.content
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "no tokenize endpoint" in error["message"]
    detokenized = client.post("/detokenize", {"tokens": [1, 2]}, format="json")
    assert detokenized.status_code == 400 and "detokenize" in detokenized.json()["error"]["message"]


def test_tokenize_is_unavailable_while_no_upstream_answers(settings):
    serve_remote_model(settings, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    response = make_api_client("ann").post("/tokenize", {"content": "Hello"}, format="json")
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "model_unavailable"


def test_tokenize_is_unavailable_when_the_upstream_stops_answering_after_it_did(settings):
    """Once its dialect was known, an upstream that stopped answering made /tokenize answer an estimate's
    placeholder ids (zeros) with a 200."""
    from tests.fake_upstream import FakeUpstream

    fake = FakeUpstream()
    serve_remote_model(settings, fake.url)
    client = make_api_client("ann")
    try:
        assert client.post("/tokenize", {"content": "Hello there"}, format="json").status_code == 200
    finally:
        fake.stop()
    response = client.post("/tokenize", {"content": "Goodbye now"}, format="json")
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "model_unavailable"
