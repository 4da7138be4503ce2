"""One live daphne server with the real SmolLM2 model for the API tests of this folder."""

from dataclasses import dataclass

import openai
import pytest

from tests.live import LiveServer, prepare_database

KEYS = {"alice": ["alice", "alice-stream"], "bob": ["bob"], "carol": ["carol-revoked"], "dave": ["dave-limited"],
        "lena": ["langchain"]}
# High enough that the other tests of a fast run, all on a few keys, never reach it within a minute.
RATE_LIMIT_PER_MINUTE = 600


@dataclass
class LiveApi:
    server: LiveServer
    keys: dict

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def client(self, key_name: str = "alice", **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.keys[key_name], max_retries=0, timeout=120,
                             **options)


@pytest.fixture(scope="session")
def live_api(tmp_path_factory, smollm2_path):
    server = LiveServer(workdir=tmp_path_factory.mktemp("live-api"),
                        env={"API_RATE_LIMIT": f"{RATE_LIMIT_PER_MINUTE}/min", "API_MAX_REQUEST_BYTES": "200000",
                             "LOG_LEVEL": "INFO"})
    keys = prepare_database(server, KEYS)
    server.start()
    try:
        yield LiveApi(server=server, keys=keys)
    finally:
        server.stop()
