"""World Info timed effects live with the stored conversation: a sticky scenario fired by a keyword stays in the
next replies' prompts without the keyword, then cools down; the state is keyed by message count."""

import pytest

from chat.models import Conversation, Message
from tests.factories import make_api_client, make_character, make_scenario

pytestmark = [pytest.mark.django_db, pytest.mark.smollm2]

URL = "/v1/chat/completions"


def ask(client, text, conversation=None):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0.5,
            "character": "ada", **({"conversation": conversation} if conversation else {})}
    response = client.post(URL, body, format="json", HTTP_CACHE_CONTROL="no-cache")
    assert response.status_code == 200, response.content
    return response.json()


def test_sticky_then_cooldown_across_stored_turns(smollm2_path, settings):
    settings.SCENARIO_SCAN_DEPTH = 1
    settings.SCENARIO_BM25_THRESHOLD = 2.0  # no text-relevance fallback: only keys and timed effects
    ada = make_character("ada", name="Ada", description="Ada keeps the lighthouse.")
    make_scenario("Storm", character=ada, keywords="storm", content="A storm rages.", sticky=2, cooldown=2)
    client = make_api_client("sam")
    fired = []
    first = ask(client, "A storm is coming.")  # message 1: fires; sticky through message 3
    conversation = first["conversation"]
    fired.append([s["title"] for s in first["scenarios"]])
    for text in ["Tea?", "More tea?", "The storm again?"]:  # messages 3 (sticky), 5 (cooling), 7 (fires again)
        fired.append([s["title"] for s in ask(client, text, conversation)["scenarios"]])
    assert fired == [["Storm"], ["Storm"], [], ["Storm"]]
    storm_id = str(ada.scenarios.get().pk)
    state = Message.objects.get(pk=Conversation.objects.get(pk=conversation).active_id).world_info_state
    assert state == {storm_id: {"at": 7, "sticky_until": 9, "cooldown_until": 11}}
