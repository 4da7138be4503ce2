"""Faults against a live server: clients vanishing mid-stream, the model file removed and restored."""

import shutil
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live import LiveServer, prepare_database

pytestmark = pytest.mark.smollm2


def scheduler_gauge(server: LiveServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def test_clients_that_disconnect_mid_stream_free_their_sequences(tmp_path, smollm2_path):
    server = LiveServer(workdir=tmp_path, env={"API_RATE_LIMIT": ""})
    keys = prepare_database(server, {"dee": ["dee"]})
    server.start()
    try:
        headers = {"Authorization": f"Bearer {keys['dee']}"}
        body = {"messages": [{"role": "user", "content": "Tell me a very long story about ships."}],
                "max_tokens": 600, "temperature": 0.9, "seed": 11, "stream": True, "character": "captain-mira"}
        streams = [httpx.Client(timeout=60) for _ in range(4)]
        responses = []
        for client in streams:
            response = client.send(client.build_request("POST", server.url + "/v1/chat/completions", json=body,
                                                        headers=headers), stream=True)
            lines = response.iter_lines()
            assert response.status_code == 200
            for _ in range(6):  # the role chunk and a few tokens
                next(line for line in lines if line.startswith("data:"))
            responses.append(response)
        assert scheduler_gauge(server, "llmsite_scheduler_active_sequences") > 0
        for response, client in zip(responses, streams):
            response.close()
            client.close()
        deadline = time.monotonic() + 20
        while scheduler_gauge(server, "llmsite_scheduler_active_sequences") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_gauge(server, "llmsite_scheduler_active_sequences") == 0
        assert scheduler_gauge(server, "llmsite_scheduler_queued_sequences") == 0
        # Nothing was stored as a complete reply.
        conversations = httpx.get(server.url + "/v1/conversations/", headers=headers).json()
        assert conversations["count"] == 0
    finally:
        server.stop()


def test_model_file_removed_gives_503_and_recovers_when_restored(tmp_path, smollm2_path):
    model = tmp_path / "model.gguf"
    server = LiveServer(workdir=tmp_path, env={"LLMSITE_MODEL_PATH": str(model)})
    keys = prepare_database(server, {"eve": ["eve"]})
    server.start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['eve']}"}, timeout=60)
        ask = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        missing = client.post("/v1/chat/completions", json=ask)
        assert missing.status_code == 503
        assert missing.json()["error"]["code"] == "model_unavailable"
        assert "model.gguf" in missing.json()["error"]["message"] and str(tmp_path) not in missing.text
        assert httpx.get(server.url + "/ready").status_code == 503
        shutil.copyfile(smollm2_path, model)  # restored: the next request loads it
        assert client.post("/v1/chat/completions", json=ask).status_code == 200
        assert httpx.get(server.url + "/ready").status_code == 200
    finally:
        server.stop()
