"""Message ids follow creation (the tree and the Responses API sort by them) without being a sequence: with one,
a tenant's two ids told it how many messages everyone else wrote in between."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from chat.models import Conversation, Message
from tests.factories import make_character, make_user

BEFORE = ("chat", "0009_invitation")
AFTER = ("chat", "0010_message_ids_count_nothing")


def conversation_of(username: str) -> Conversation:
    return Conversation.objects.create(character=make_character(f"c-{username}"), owner=make_user(username))


@pytest.mark.django_db
def test_ids_follow_creation_but_do_not_count_other_tenants_messages():
    mine, theirs = conversation_of("mine"), conversation_of("theirs")
    first = Message.objects.create(conversation=mine, role="user", content="a").pk
    others = [Message.objects.create(conversation=theirs, role="user", content=str(n)).pk for n in range(100)]
    second = Message.objects.create(conversation=mine, role="user", content="b").pk
    ids = [first, *others, second]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert second - first != len(others) + 1  # what a sequence would have said
    assert max(ids) < 2**53  # exact in JavaScript


@pytest.mark.django_db(transaction=True)
def test_a_conversation_keeps_its_order_whatever_the_clock_of_the_host_that_wrote_before():
    conversation = conversation_of("owner")
    ahead = Message.objects.create(conversation=conversation, role="user", content="from a host 10 s ahead",
                                   id=Message().id + (10_000 << 12))
    later = Message.objects.create(conversation=conversation, role="assistant", content="here", parent=ahead)
    assert later.id > ahead.id


@pytest.mark.django_db(transaction=True)
def test_a_taken_id_is_drawn_again_and_the_callers_transaction_goes_on():
    from django.db import transaction

    taken = Message.objects.create(conversation=conversation_of("first"), role="user", content="a")
    other = conversation_of("second")
    with transaction.atomic():
        clash = Message(conversation=other, role="user", content="b", id=taken.id)  # as another process might
        clash.save()
        Message.objects.create(conversation=other, role="assistant", content="c", parent=clash)
    assert clash.id != taken.id and other.messages.count() == 2


def test_stored_messages_keep_their_ids_and_links_through_the_migration(transactional_db):
    executor = MigrationExecutor(connection)
    executor.migrate([BEFORE])
    try:
        content = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "chat"]
        old = executor.loader.project_state([BEFORE, *content]).apps
        user = old.get_model("auth", "User").objects.create(username="before")
        character = old.get_model("characters", "Character").objects.create(name="Old", slug="old", description="x")
        conversation = old.get_model("chat", "Conversation").objects.create(character=character, owner=user)
        OldMessage = old.get_model("chat", "Message")
        question = OldMessage.objects.create(conversation=conversation, role="user", content="q")
        answer = OldMessage.objects.create(conversation=conversation, role="assistant", content="a", parent=question)
        conversation.active = answer
        conversation.save()
        executor = MigrationExecutor(connection)
        executor.migrate([AFTER])
        executor.loader.build_graph()
        new = executor.loader.project_state([AFTER, *content]).apps
        NewMessage = new.get_model("chat", "Message")
        kept = NewMessage.objects.get(pk=answer.pk)
        assert kept.parent_id == question.pk and kept.content == "a"
        assert new.get_model("chat", "Conversation").objects.get(pk=conversation.pk).active_id == answer.pk
        follow_up = NewMessage.objects.create(conversation_id=conversation.pk, role="user", content="f", parent=kept)
        assert follow_up.pk > answer.pk
    finally:  # the tests after this one need the whole schema
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
