"""What one user or editor writes is shown on another user's chat page as text, never as markup: a group chat's
participant opens a conversation whose title, messages, characters (name, description, greeting) and group carry
HTML. Headless Chromium against a live daphne server; no model is needed (nothing is generated)."""

import pytest

from tests.browser import chromium, log_in
from tests.live import LiveServer, prepare_database

HOSTILE = '<img src=x id=injected onerror="document.title=\'pwned\'"><script id=injected2>1</script>'

SETUP = f"""
from django.contrib.auth import get_user_model
from characters.models import Character, CharacterGroup, GroupMember
from chat.models import Conversation, Message
H = {HOSTILE!r}
users = get_user_model().objects
owner = users.create_user('owner', password='a-long-test-password')
reader = users.create_user('reader', password='a-long-test-password')
ada = Character.objects.create(name='Ada' + H, slug='ada', description=H, greeting='Hello ' + H)
crew = CharacterGroup.objects.create(name='Crew' + H, slug='crew', scenario=H)
GroupMember.objects.create(group=crew, character=ada, position=0)
talk = Conversation.objects.create(character=ada, group=crew, owner=owner, title='Title' + H)
talk.participants.add(reader)
first = Message.objects.create(conversation=talk, role='user', content='Owner says ' + H, author=owner)
reply = Message.objects.create(conversation=talk, role='assistant', content='Reply ' + H, speaker=ada, parent=first)
Conversation.objects.filter(pk=talk.pk).update(active=reply)
print(talk.pk)
"""


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    server = LiveServer(workdir=tmp_path_factory.mktemp("browser-hostile"))
    prepare_database(server, {})
    conversation = server.manage(SETUP).strip().splitlines()[-1]
    server.start()
    yield server, conversation
    server.stop()


def test_hostile_text_is_shown_as_text(hostile_server):
    from playwright.sync_api import expect

    server, conversation = hostile_server
    with chromium() as browser:
        page = browser.new_page()
        log_in(page, server.url + "/accounts/login/", "reader", "a-long-test-password")
        page.goto(f"{server.url}/?character=ada")
        expect(page.locator("#messages .message")).to_have_count(1)  # the greeting
        expect(page.locator("#messages .message .text")).to_have_text("Hello " + HOSTILE)
        page.goto(f"{server.url}/?character=crew&conversation={conversation}")
        expect(page.locator("#messages .message")).to_have_count(2)
        expect(page.locator("#messages .message.user .text")).to_have_text("Owner says " + HOSTILE)
        expect(page.locator("#messages .message.user .who")).to_have_text("owner")
        expect(page.locator("#messages .message.assistant .text")).to_have_text("Reply " + HOSTILE)
        expect(page.locator("#conversations li button").first).to_have_text("Title" + HOSTILE)
        expect(page.locator("#character-name")).to_have_text("Crew" + HOSTILE)
        expect(page.locator("#characters button[data-slug=ada]")).to_contain_text("Ada" + HOSTILE)
        assert page.locator("#injected, #injected2").count() == 0
        assert page.title() != "pwned"
        browser.close()
