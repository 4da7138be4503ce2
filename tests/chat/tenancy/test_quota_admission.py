"""What a request takes from its key's quotas when admitted, through the API with a tiny model: a background
job holds its slots from submission until it ends, `n` choices take n slots (chat completions and a tree's
regenerate), and a request's most tokens (prompt + max_tokens × n) must fit what is left of a budget, reserved
until it ends (day budgets here: a minute could end between two lines of a test)."""


import pytest
from django.core.cache import cache

from chat.models import Conversation
from chat.tenancy.quotas import concurrency_key, tokens_charge, tokens_spent
from tests.factories import make_api_client, make_character, serve_tiny_model, write_tiny_gguf

pytestmark = pytest.mark.django_db
NO_CACHE = {"HTTP_CACHE_CONTROL": "no-cache"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("quota") / "tiny.gguf")


@pytest.fixture(autouse=True)
def tiny_site(settings, tiny_model):
    serve_tiny_model(settings, tiny_model, context_length=1024)
    cache.clear()
    make_character("mira")
    yield
    cache.clear()


def limited_client(name: str, **limits):
    client = make_api_client(name)
    for field, value in limits.items():
        setattr(client.key, field, value)
    client.key.save()
    return client


def ask(**fields) -> dict:
    return {"character": "mira", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, **fields}


def assert_refused(response, code: str):
    assert response.status_code == 429, response.content
    assert response["Retry-After"] == "1"
    assert response.json()["error"]["code"] == code and response.json()["error"]["type"] == "rate_limit_error"


def test_a_queued_background_job_holds_its_keys_slot_until_it_ends():
    # The test's transaction never commits, so no worker picks the job up: it stays queued.
    client = limited_client("jobs", max_concurrent=1)
    first = client.post("/v1/chat/completions", ask(background=True), format="json")
    assert first.status_code == 202, first.content
    assert_refused(client.post("/v1/chat/completions", ask(background=True), format="json"),
                   "concurrency_limit_exceeded")
    assert_refused(client.post("/v1/chat/completions", ask(stream=True), format="json", **NO_CACHE),
                   "concurrency_limit_exceeded")  # counted together with running streams
    assert (cache.get(concurrency_key(f"key:{client.key.pk}")) or 0) == 0  # the queued job holds it, not the cache
    assert client.delete(first.json()["url"]).status_code == 200  # cancelled: its slot is free again
    assert client.post("/v1/chat/completions", ask(background=True), format="json").status_code == 202


def test_a_job_of_another_key_takes_none_of_this_keys_slots():
    limited_client("other-jobs", max_concurrent=1).post("/v1/chat/completions", ask(background=True), format="json")
    client = limited_client("own-jobs", max_concurrent=1)
    assert client.post("/v1/chat/completions", ask(background=True), format="json").status_code == 202


@pytest.mark.django_db(transaction=True)  # choices are stored by threads of their own
def test_n_choices_take_n_slots_in_chat_completions_and_a_trees_regenerate():
    client = limited_client("choices", max_concurrent=2)
    assert_refused(client.post("/v1/chat/completions", ask(n=4), format="json", **NO_CACHE),
                   "concurrency_limit_exceeded")
    done = client.post("/v1/chat/completions", ask(n=2), format="json", **NO_CACHE)
    assert done.status_code == 200 and len(done.json()["choices"]) == 2
    assert cache.get(concurrency_key(f"key:{client.key.pk}")) == 0  # every choice gave its slot back
    conversation = Conversation.objects.get(pk=done.json()["conversation"])
    leaf = conversation.messages.order_by("id").last()
    regenerate = f"/v1/conversations/{conversation.pk}/messages/{leaf.pk}/regenerate/"
    assert_refused(client.post(regenerate, {"max_tokens": 3, "n": 4}, format="json"), "concurrency_limit_exceeded")


def test_a_request_whose_most_tokens_do_not_fit_what_is_left_of_the_budget_is_refused():
    client = limited_client("budget", tokens_per_day=300)
    identity = f"key:{client.key.pk}"
    tokens_charge(identity, 1)  # something spent today: a request must fit the rest
    response = client.post("/v1/chat/completions", ask(max_tokens=400), format="json", **NO_CACHE)
    assert response.status_code == 429 and response.json()["error"]["code"] == "token_quota_exceeded"
    assert 0 < int(response["Retry-After"]) <= 86400
    assert_fits = client.post("/v1/chat/completions", ask(max_tokens=4), format="json", **NO_CACHE)
    assert assert_fits.status_code == 200, assert_fits.content
    usage = assert_fits.json()["usage"]
    # The reservation (prompt + 4) was replaced by what the reply used.
    assert tokens_spent(identity, "day") == 1 + usage["prompt_tokens"] + usage["completion_tokens"]
    refused = client.post("/v1/chat/completions", ask(max_tokens=100, n=3), format="json", **NO_CACHE)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "token_quota_exceeded"  # 100 × 3


def test_a_queued_job_reserves_its_tokens_until_it_is_cancelled():
    client = limited_client("job-budget", tokens_per_day=300)
    identity = f"key:{client.key.pk}"
    first = client.post("/v1/chat/completions", ask(background=True, max_tokens=100), format="json")
    assert first.status_code == 202, first.content
    reserved = tokens_spent(identity, "day")
    assert reserved > 100  # its prompt and max_tokens, before any worker ran it
    second = client.post("/v1/chat/completions", ask(background=True, max_tokens=250), format="json")
    assert second.status_code == 429 and second.json()["error"]["code"] == "token_quota_exceeded"
    assert tokens_spent(identity, "day") == reserved  # the refusal reserved nothing
    assert client.delete(first.json()["url"]).status_code == 200
    assert tokens_spent(identity, "day") == 0  # cancelled while queued: given back
    assert client.post("/v1/chat/completions", ask(background=True, max_tokens=250), format="json").status_code == 202


def test_a_job_run_by_its_worker_settles_its_reservation_to_what_it_used(django_capture_on_commit_callbacks):
    client = limited_client("job-run", tokens_per_day=1000)
    with django_capture_on_commit_callbacks(execute=True):  # no broker: the job runs inline, as committed
        response = client.post("/v1/chat/completions", ask(background=True, max_tokens=200), format="json")
    assert response.status_code == 202, response.content
    job = client.get(response.json()["url"]).json()
    assert job["status"] == "done", job
    usage = job["result"]["usage"]
    assert tokens_spent(f"key:{client.key.pk}", "day") == usage["prompt_tokens"] + usage["completion_tokens"]
