"""A group chat with two characters on the chat page, in headless Chromium against a live daphne server:
pick the group, the speaker named in the message replies under its own name and avatar, the next
message named for the other character gets the other one, and a reload shows both names again."""

import pytest

from tests.browser import chromium, log_in
from tests.live import LiveServer, prepare_database

pytestmark = pytest.mark.smollm2

SETUP = """
import base64
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from characters.models import Character, CharacterGroup, GroupMember
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
get_user_model().objects.create_user('reader', password='a-long-test-password')
ada = Character.objects.create(name='Ada', slug='ada', description='Ada keeps the lighthouse.')
ada.avatar.save('ada.png', ContentFile(PNG), save=True)
bob = Character.objects.create(name='Bob', slug='bob', description='Bob fishes the bay.')
crew = CharacterGroup.objects.create(name='Harbor crew', slug='harbor-crew', scenario='A storm night.')
GroupMember.objects.create(group=crew, character=ada, position=0)
GroupMember.objects.create(group=crew, character=bob, position=1)
"""


@pytest.fixture(scope="module")
def group_server(tmp_path_factory, smollm2_path):
    server = LiveServer(workdir=tmp_path_factory.mktemp("browser-groups"))
    prepare_database(server, {})
    server.manage(SETUP)
    server.start()
    yield server
    server.stop()


def test_group_chat_with_two_characters(group_server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        log_in(page, group_server.url + "/accounts/login/", "reader", "a-long-test-password")

        page.get_by_role("list", name="Group chats").get_by_role("button", name="Harbor crew").click()
        expect(page.locator("#character-name")).to_have_text("Harbor crew")
        page.get_by_label("Your message").fill("Bob, how is the catch?")
        page.get_by_role("button", name="Send").click()
        replies = page.locator(".message.assistant[data-complete='true']")
        try:
            expect(replies).to_have_count(1, timeout=120_000)
        except AssertionError:
            raise AssertionError(f"{page.get_by_role('status').inner_text()!r} {problems}") from None
        expect(replies.nth(0).locator(".who")).to_have_text("Bob")
        assert replies.nth(0).get_attribute("data-speaker") == "bob"

        page.get_by_label("Your message").fill("And you, Ada?")
        page.get_by_role("button", name="Send").click()
        # data-complete marks the reply that just ended (the page's tree view): now Ada's, below Bob's.
        expect(replies.locator(".who")).to_have_text("Ada", timeout=90_000)
        expect(replies.locator(".who img.avatar")).to_have_count(1)
        shown = page.locator(".message.assistant")
        expect(shown).to_have_count(2)
        expect(shown.nth(0).locator(".who")).to_have_text("Bob")

        page.reload()
        stored = page.locator(".message.assistant")
        expect(stored).to_have_count(2)
        expect(stored.nth(0).locator(".who")).to_have_text("Bob")
        expect(stored.nth(1).locator(".who")).to_have_text("Ada")
        expect(page.get_by_role("list", name="Past conversations").get_by_role("listitem")).to_have_count(1)
        browser.close()
