"""The chat page in headless Chromium against a live daphne server: log in, chat, see tokens stream, reload; all
under the page's Content-Security-Policy."""

from urllib.parse import urlsplit

import pytest

from tests.browser import chromium, log_in
from tests.live import LiveServer, prepare_database
from tests.subprocess_helpers import ROOT

pytestmark = pytest.mark.smollm2

ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, smollm2_path):
    server = LiveServer(workdir=tmp_path_factory.mktemp("browser"))
    prepare_database(server, {})
    server.manage("from django.contrib.auth import get_user_model\n"
                  "from characters.models import Character\n"
                  "get_user_model().objects.create_user('reader', password='a-long-test-password', is_staff=True)\n"
                  "mira = Character.objects.get(slug='captain-mira')\n"
                  "mira.alternate_greetings = ['Back on deck, {{user}}? Grab a rope.']\n"
                  "mira.save()")
    server.start()
    yield server
    server.stop()


def test_log_in_chat_with_streaming_and_reload(page_server):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
        page.goto(page_server.url + "/")
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        page.get_by_label("Username").fill("reader")
        page.get_by_label("Password").fill("a-long-test-password")
        page.get_by_role("button", name="Log in").click()

        page.get_by_role("button", name="Captain Mira Vale").click()
        # The greeting, with {{user}} as the logged-in user's name.
        expect(page.locator(".message.assistant").first).to_contain_text("Ahoy there, reader")
        expect(page.get_by_role("link", name="Admin")).to_be_visible()  # staff see the admin link
        # Count how often the streaming reply's text changes: several times means tokens streamed in.
        page.evaluate("""() => {
            window.textChanges = 0;
            new MutationObserver(() => { window.textChanges += 1; })
                .observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true});
        }""")
        page.get_by_label("Your message").fill("Is a storm coming tonight?")
        page.get_by_role("button", name="Send").click()
        reply = page.locator(".message.assistant[data-complete='true']")
        expect(reply).to_have_count(1, timeout=90_000)
        assert page.evaluate("window.textChanges") > 4
        expect(reply.locator(".scenarios")).to_contain_text("A storm is coming")
        reply_text = reply.locator(".text").inner_text()
        assert reply_text.strip()
        page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)

        page.reload()
        expect(page.locator(".message.user")).to_contain_text("Is a storm coming tonight?")
        expect(page.locator(".message.assistant").nth(1).locator(".text")).to_have_text(reply_text)
        expect(page.get_by_role("list", name="Past conversations").get_by_role("listitem")).to_have_count(1)

        # "New conversation" really starts one: the next message is stored in a second conversation,
        # opened by the alternate greeting the user cycled to.
        page.get_by_role("button", name="New conversation").click()
        expect(page.locator(".message.user")).to_have_count(0)
        page.get_by_role("button", name="Another greeting").click()
        expect(page.locator(".message.assistant .text")).to_have_text(["Back on deck, reader? Grab a rope."])
        page.get_by_label("Your message").fill("Where are we sailing?")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".message.assistant[data-complete='true']")).to_have_count(1, timeout=90_000)
        expect(page.get_by_role("button", name="Another greeting")).to_be_hidden()
        expect(page.get_by_role("list", name="Past conversations").get_by_role("listitem")).to_have_count(2)
        stored = page_server.manage(
            "from chat.models import Conversation\n"
            "for c in Conversation.objects.filter(owner__username='reader').order_by('created_at'):\n"
            "    print(c.user_name, '|', ' / '.join(m.content for m in c.messages.order_by('id')[:2]))")
        first, second = stored.strip().splitlines()
        assert first.startswith("reader | Ahoy there, reader") and "Is a storm coming tonight?" in first
        assert second == "reader | Back on deck, reader? Grab a rope. / Where are we sailing?"
        browser.close()


def test_errors_are_readable_not_raw_json(page_server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        log_in(page, page_server.url + "/accounts/login/", "reader", "a-long-test-password")
        page.get_by_role("button", name="Byte").click()
        page.get_by_label("Your message").fill("word " * 3000)  # far beyond the context window
        page.get_by_role("button", name="Send").click()
        status = page.get_by_role("status")
        expect(status).to_contain_text("too long for the model", timeout=60_000)
        assert "{" not in status.inner_text()
        browser.close()


def test_the_page_runs_under_its_policy_and_ignores_a_conversation_id_that_is_not_one(page_server):
    """?conversation= went into a fetch() path unchecked: `../../admin/` made the page GET another of the site's
    pages with the user's cookie."""
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        console, requested = [], []
        page.on("console", lambda message: console.append(message.text))
        page.on("request", lambda request: requested.append(request.url))
        log_in(page, page_server.url + "/accounts/login/", "reader", "a-long-test-password")
        expect(page.get_by_role("heading", name="Pick a character")).to_be_visible()
        page.goto(page_server.url + "/?character=captain-mira&conversation=../../../admin/password_change")
        # A new conversation instead: the greeting, no error, and the socket open.
        expect(page.locator(".message.assistant").first).to_contain_text("Ahoy there, reader")
        page.wait_for_function("() => !document.getElementById('send').disabled")  # the WebSocket is open
        assert "could not be opened" not in page.get_by_role("status").inner_text()
        assert not [url for url in requested if urlsplit(url).path.startswith("/admin")], requested
        assert not [text for text in console if "Content Security Policy" in text], console
        browser.close()
