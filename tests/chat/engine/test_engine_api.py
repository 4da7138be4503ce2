"""The engine's limits as the API shows them: 503 + Retry-After, /ready after a crash, clients that leave."""

import asyncio
import dataclasses
import time

import httpx
import pytest
from django.http import JsonResponse
from rest_framework.test import APIClient

from chat.engine import GenerationFailed, ModelRegistry, ModelSpec, SamplingParams
from chat.engine.faults import Faults
from chat.engines import get_engine
from chat.api.views import cancelling_abandoned_generations
from tests.factories import import_demo_resources, make_api_client
from tests.live import LiveServer, prepare_database

from .conftest import TINY_CONTEXT

LONG = SamplingParams(max_tokens=400, temperature=0)
ASK = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
NO_CACHE = {"HTTP_CACHE_CONTROL": "no-cache"}


@pytest.fixture
def api():
    import_demo_resources()
    return make_api_client("engine-api", key_name="engine-api")


def with_model_options(settings, **options):
    models = tuple(dataclasses.replace(model, **options) for model in settings.LLMSITE.models)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)  # the registry reloads


@pytest.mark.smollm2
@pytest.mark.django_db
def test_a_full_queue_answers_503_with_retry_after(api, settings):
    with_model_options(settings, parallel=1, max_queue=1)
    engine = get_engine()
    running = engine.submit(engine.render_chat([{"role": "user", "content": "Tell a long story."}]), LONG)
    stream = iter(running)
    next(stream)  # holds the only slot
    queued = engine.submit("Hello", SamplingParams(max_tokens=4))  # takes the only queue place
    try:
        response = api.post("/v1/chat/completions", ASK, format="json", **NO_CACHE)
        assert response.status_code == 503
        assert int(response["Retry-After"]) >= 1
        error = response.json()["error"]
        assert error["code"] == "engine_overloaded" and error["type"] == "service_unavailable"
        assert "queue" in error["message"]
        metrics = api.get("/metrics").content.decode()
        assert 'llmsite_scheduler_rejected_total{model="smollm2-135m-instruct",reason="queue_full"} 1.0' in metrics
    finally:
        running.cancel()
        queued.cancel()
        list(stream)


@pytest.mark.smollm2
@pytest.mark.django_db
def test_a_dead_scheduler_makes_ready_503_and_the_next_request_succeeds(api, settings, monkeypatch):
    with_model_options(settings)  # a registry of this test's own
    engine = get_engine()

    def crash(newcomers):
        raise RuntimeError("a bug in the scheduler loop")

    monkeypatch.setattr(engine._scheduler, "_advance", crash)
    with pytest.raises(GenerationFailed):
        engine.generate("Hello", SamplingParams(max_tokens=4))
    ready = APIClient().get("/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["model"]["error"] == "the model's scheduler stopped or stalled; the next request reloads it"
    assert api.post("/v1/chat/completions", ASK, format="json", **NO_CACHE).status_code == 200
    assert get_engine() is not engine and get_engine().alive
    assert APIClient().get("/ready").status_code == 200


@pytest.fixture(scope="module")
def endless_path(tmp_path_factory, write_tiny_gguf):
    # A model that never writes an end token: a reply runs to max_tokens.
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-endless.gguf", seed=0, never_ends=True)


@pytest.mark.django_db
def test_a_stream_that_times_out_in_the_queue_is_answered_503_before_it_starts(api, settings, endless_path):
    with_model_options(settings, path=str(endless_path), context_length=TINY_CONTEXT, parallel=1, queue_timeout=0.3)
    engine = get_engine()
    engine.faults = Faults(step=lambda step: time.sleep(0.01))  # the 400 tokens outlast queue_timeout on any CPU
    running = engine.submit("hello world", LONG)  # holds the only slot for 400 tokens
    try:
        response = api.post("/v1/chat/completions", {**ASK, "stream": True}, format="json", **NO_CACHE)
        assert response.status_code == 503
        assert not response.streaming  # a JSON error in the one shape, not an event stream that began with 200
        assert int(response["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "engine_overloaded"
        assert "waited too long" in response.json()["error"]["message"]
    finally:
        engine.faults = None
        running.cancel()
        list(running)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_stream_refused_in_the_queue_leaves_its_conversation_free(api, settings, endless_path, path):
    """The lease a streamed reply takes is released by its stream's generator, which a refused stream never runs:
    the conversation answered 409 conversation_busy for the lease's whole life (10 minutes)."""
    with_model_options(settings, path=str(endless_path), context_length=2048, parallel=1, queue_timeout=0.3)
    if path == "/v1/chat/completions":
        ask = {**ASK, "character": "byte", "max_tokens": 2}
        ask["conversation"] = api.post(path, ask, format="json", **NO_CACHE).json()["conversation"]
    else:
        ask = {"input": "Say hello.", "character": "byte", "max_output_tokens": 2}
        ask["previous_response_id"] = api.post(path, ask, format="json", **NO_CACHE).json()["id"]
    engine = get_engine()
    engine.faults = Faults(step=lambda step: time.sleep(0.01))
    running = engine.submit("hello world", LONG)  # holds the only slot past queue_timeout
    try:
        refused = api.post(path, {**ask, "stream": True}, format="json", **NO_CACHE)
        assert refused.status_code == 503
    finally:
        engine.faults = None
        running.cancel()
        list(running)
    again = api.post(path, ask, format="json", **NO_CACHE)
    assert again.status_code == 200, again.json()


@pytest.mark.django_db
def test_another_tenant_holding_every_slot_with_long_replies_does_not_make_a_request_wait_out_the_queue(
        api, settings, endless_path):
    """Fair admission shared only freed slots: a tenant whose replies outlast queue_timeout kept every other
    tenant at 503. Now one of its sequences is suspended for the waiting request (preemption)."""
    with_model_options(settings, path=str(endless_path), context_length=TINY_CONTEXT, parallel=2, queue_timeout=5)
    engine = get_engine()
    engine.faults = Faults(step=lambda step: time.sleep(0.02))  # 400 tokens: about 8 s, past queue_timeout
    hogs = [engine.submit("hello world", LONG, owner="another-tenant") for _ in range(2)]
    streams = [iter(hog) for hog in hogs]
    for stream in streams:
        next(stream)  # both slots are theirs
    try:
        response = api.post("/v1/chat/completions", ASK, format="json", **NO_CACHE)
        assert response.status_code == 200, response.json()
        assert engine.stats()["preemptions"] >= 1
    finally:
        engine.faults = None
        for hog in hogs:
            hog.cancel()
        for stream in streams:
            list(stream)


# -- the view wrapper that cancels abandoned generations -----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, write_tiny_gguf):
    # A model that never writes an end token: its reply is still running when the client leaves.
    path = write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-endless.gguf", seed=0, never_ends=True)
    registry = ModelRegistry([ModelSpec("tiny-abandon", str(path), context_length=TINY_CONTEXT, parallel=2)])
    yield registry.get()
    registry.close()


async def test_a_client_leaving_a_blocking_view_cancels_its_generation(tiny):
    started = []

    def blocking_view(request):  # like a non-streamed completion: waits for the whole reply
        generation = tiny.submit("hello world what", LONG)
        started.append(generation)
        list(generation)
        return JsonResponse({"finish_reason": generation.result.finish_reason})

    task = asyncio.ensure_future(cancelling_abandoned_generations(blocking_view)(None))
    while not started:
        await asyncio.sleep(0.01)
    task.cancel()  # what Django's ASGI handler does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    generation = started[0]
    while not generation.done:
        await asyncio.sleep(0.01)
    assert generation.result.finish_reason == "cancelled"
    assert generation.result.completion_tokens < LONG.max_tokens


async def test_a_request_cancelled_before_its_response_was_sent_cancels_its_generation(tiny):
    started, returned = [], asyncio.Event()

    def streaming_view(request):  # submits, then leaves the reading to a response never sent
        started.append(tiny.submit("hello world what", LONG))
        return JsonResponse({})

    async def request_task():  # the view returned; a middleware after it is still running when the client leaves
        response = await cancelling_abandoned_generations(streaming_view)(None)
        returned.set()
        await asyncio.sleep(3600)
        return response

    task = asyncio.ensure_future(request_task())
    await returned.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    generation = started[0]
    while not generation.done:
        await asyncio.sleep(0.01)
    assert generation.result.finish_reason == "cancelled"


async def test_closing_the_response_cancels_its_generation(tiny):
    started = []

    def streaming_view(request):
        started.append(tiny.submit("hello world what", LONG))
        return JsonResponse({})

    response = await cancelling_abandoned_generations(streaming_view)(None)
    response.close()  # what Django does once the response was sent, or the client left mid-stream
    generation = started[0]
    while not generation.done:
        await asyncio.sleep(0.01)
    assert generation.result.finish_reason == "cancelled"


# -- through a real server -----------------------------------------------------------------------


def active_sequences(server: LiveServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    line = next((ln for ln in text.splitlines() if ln.startswith("llmsite_scheduler_active_sequences{")), "x 0")
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.smollm2
def test_a_non_streamed_client_that_disconnects_frees_its_sequence(tmp_path, smollm2_path):
    server = LiveServer(workdir=tmp_path, env={"API_RATE_LIMIT": ""})
    keys = prepare_database(server, {"fay": ["fay"]})
    server.start()
    try:
        headers = {"Authorization": f"Bearer {keys['fay']}", "Cache-Control": "no-cache"}
        # The schema asks for 400 numbers: the reply cannot end within the client's one-second patience, whatever
        # SmolLM2 would answer unconstrained on this CPU.
        numbers = {"type": "object", "required": ["numbers"],
                   "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 400}}}
        body = {"messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
                "max_tokens": 1500, "temperature": 0, "character": "captain-mira",
                "response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": numbers}}}
        warm_up = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}  # loads the model
        assert httpx.post(server.url + "/v1/chat/completions", json=warm_up, headers=headers, timeout=120).status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(60, read=1))
        deadline = time.monotonic() + 120
        while active_sequences(server) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert active_sequences(server) == 0
        # A reply that ran to its end would have been stored; a cancelled one is not.
        conversations = httpx.get(server.url + "/v1/conversations/", headers=headers).json()
        assert conversations["count"] == 0
    finally:
        server.stop()
