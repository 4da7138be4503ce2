"""A metered generation settles once when it ends, whichever way: slot released, tokens charged, one ledger
row with the outcome. Driven through a real engine Generation from the scheduler's side."""

import gc
import time

import pytest
from django.db import OperationalError
from django.core.cache import cache

from chat.engine import Completion
from chat.engine.errors import EngineError
from chat.engine.generation import Generation
from chat.models import UsageRecord
from chat.tenancy.metering import MeteredGeneration, meter_open
from chat.tenancy.owners import Tenant
from chat.tenancy.quotas import concurrency_key, tokens_spent
from tests.factories import make_api_client


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def tenant():
    cache.clear()
    client = make_api_client("metered")
    client.key.max_concurrent = 1
    client.key.save()
    yield Tenant(user=client.user, api_key=client.key)
    cache.clear()


def metered(tenant):
    generation = Generation("g")
    meter = meter_open(tenant=tenant, model="tiny", prompt_tokens=11)
    return generation, MeteredGeneration(generation, meter, count_tokens=words)


def slots_in_use(tenant) -> int:
    return cache.get(concurrency_key(tenant.quota_identity)) or 0


@pytest.mark.django_db
def test_a_finished_generation_is_recorded_with_the_completions_counts(tenant):
    generation, wrapped = metered(tenant)
    assert slots_in_use(tenant) == 1
    generation._push_text("hello there")
    generation._push_done(Completion(text="hello there", finish_reason="length", prompt_tokens=9, completion_tokens=4))
    assert "".join(wrapped) == "hello there"
    row = UsageRecord.objects.get()
    assert (row.outcome, row.prompt_tokens, row.completion_tokens, row.api_key, row.model) == (
        "length", 9, 4, tenant.api_key, "tiny")
    assert slots_in_use(tenant) == 0 and tokens_spent(tenant.quota_identity, "minute") == 13
    list(wrapped)  # iterating again settles nothing more
    assert UsageRecord.objects.count() == 1


@pytest.mark.django_db
def test_a_failed_generation_is_recorded_with_what_it_generated(tenant):
    generation, wrapped = metered(tenant)
    generation._push_text("one two three")
    generation._push_error(EngineError("the model went away"))
    with pytest.raises(EngineError):
        for _ in wrapped:
            pass
    row = UsageRecord.objects.get()
    assert (row.outcome, row.prompt_tokens, row.completion_tokens) == ("failed", 11, 3)
    assert slots_in_use(tenant) == 0


@pytest.mark.django_db(transaction=True)
async def test_an_async_reader_that_finishes_has_its_row_written_before_the_end(tenant):
    from asgiref.sync import sync_to_async

    generation, wrapped = await sync_to_async(metered)(tenant)
    generation._push_text("a b")
    generation._push_done(Completion(text="a b", finish_reason="stop", prompt_tokens=5, completion_tokens=2))
    assert [delta async for delta in wrapped] == ["a b"]
    assert await sync_to_async(lambda: list(UsageRecord.objects.values_list("outcome", "completion_tokens")))() == [
        ("completed", 2)]


@pytest.mark.django_db(transaction=True)
def test_a_generation_never_read_is_settled_as_cancelled_when_dropped(tenant):
    generation, wrapped = metered(tenant)
    generation._push_text("x y")
    del wrapped
    gc.collect()
    deadline = time.monotonic() + 10
    while not usage_recorded() and time.monotonic() < deadline:
        time.sleep(0.05)
    row = UsageRecord.objects.get()
    assert (row.outcome, row.completion_tokens) == ("cancelled", 0)
    assert slots_in_use(tenant) == 0


@pytest.mark.django_db
def test_a_request_refused_by_the_engine_gives_its_slot_back_without_a_row(tenant):
    meter = meter_open(tenant=tenant, model="tiny")
    meter.abandon()
    assert slots_in_use(tenant) == 0 and not UsageRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_generation_never_read_that_the_engine_failed_is_recorded_failed(tenant):
    generation, wrapped = metered(tenant)
    generation._push_error(EngineError("waited too long for a slot"))
    del wrapped
    gc.collect()
    deadline = time.monotonic() + 10
    while not usage_recorded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert UsageRecord.objects.get().outcome == "failed" and slots_in_use(tenant) == 0


def usage_recorded() -> bool:
    try:
        return UsageRecord.objects.exists()
    except OperationalError:  # the recording thread holds the in-memory test database's table lock: not yet
        return False
