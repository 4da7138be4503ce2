"""A group chat over the WebSocket: ws/chat/<group>/ names the speaker in the start and end events."""

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from tests.chat.test_websocket import ORIGIN, communicator, receive_until_end
from tests.factories import make_api_client, make_character

pytestmark = [pytest.mark.smollm2, pytest.mark.django_db(transaction=True)]


def make_crew():
    from characters.models import CharacterGroup, GroupMember

    ada = make_character("ada", name="Ada", description="Ada keeps the lighthouse.")
    bob = make_character("bob", name="Bob", description="Bob fishes the bay.")
    group = CharacterGroup.objects.create(name="Crew", slug="crew")
    GroupMember.objects.create(group=group, character=ada, position=0)
    GroupMember.objects.create(group=group, character=bob, position=1)
    return make_api_client("ws-group", key_name="ws").raw_key


async def test_the_named_member_replies_and_the_next_message_goes_to_the_named_other(smollm2_path):
    raw_key = await sync_to_async(make_crew)()
    comm = communicator("/ws/chat/crew/", headers=[ORIGIN, (b"authorization", f"Bearer {raw_key}".encode())])
    connected, _ = await comm.connect()
    assert connected
    await comm.send_json_to({"type": "message", "content": "Bob, any fish?", "max_tokens": 8, "temperature": 0.5})
    first = await receive_until_end(comm)
    assert first[0]["type"] == "start" and first[0]["speaker"]["slug"] == "bob", first
    assert first[-1]["type"] == "end" and first[-1]["speaker"]["name"] == "Bob"
    await comm.send_json_to({"type": "message", "content": "Ada, the lamp?", "max_tokens": 8, "temperature": 0.5})
    second = await receive_until_end(comm)
    assert second[-1]["speaker"]["slug"] == "ada" and second[-1]["conversation"] == first[-1]["conversation"]
    await comm.disconnect()
    speakers = await sync_to_async(lambda: list(Message.objects.filter(role="assistant").order_by("id")
                                                .values_list("speaker__slug", flat=True)))()
    assert speakers == ["bob", "ada"]
