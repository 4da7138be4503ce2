"""The conversation tree on the chat page in headless Chromium against a live daphne server: regenerate and
switch alternatives, edit and switch branches, continue, stop, and a reply that completes after its page closed."""

import pytest

from tests.browser import chromium, log_in
from tests.live import LiveServer, prepare_database

pytestmark = pytest.mark.smollm2
DONE = ".message.assistant[data-complete='true']"


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, smollm2_path):
    server = LiveServer(workdir=tmp_path_factory.mktemp("browser-tree"))
    prepare_database(server, {})
    server.manage("from django.contrib.auth import get_user_model\n"
                  "from characters.models import Character\n"
                  "get_user_model().objects.create_user('brancher', password='a-long-test-password')\n"
                  # Short replies keep the tests quick on a busy CPU; Byte's are cut short (room to continue);
                  # Luca's are long (time to stop one), Quill's long enough to outlive a closed page.
                  "for slug, tokens in [('captain-mira', 16), ('byte', 12), ('chef-luca', 600), ('professor-quill', 40)]:\n"
                  "    Character.objects.filter(slug=slug).update(max_tokens=tokens)")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def browser():
    with chromium() as browser:
        yield browser


def logged_in(browser, server, *, narrow: bool = True):
    page = browser.new_page(viewport={"width": 390, "height": 844} if narrow else None)
    log_in(page, server.url + "/accounts/login/", "brancher", "a-long-test-password")
    page.get_by_role("heading", name="Pick a character").wait_for()
    return page


def assert_no_sideways_overflow(page):
    """Nothing sticks out to the right of a 390-pixel phone screen (no horizontal scrolling)."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"


def say(page, text: str):
    from playwright.sync_api import expect

    page.get_by_label("Your message").fill(text)
    page.get_by_role("button", name="Send").click()
    expect(page.locator(DONE)).to_have_count(1, timeout=120_000)
    return page.locator(".message").last


def test_regenerate_and_switch_between_alternatives(browser, page_server):
    from playwright.sync_api import expect

    page = logged_in(browser, page_server)
    page.get_by_role("button", name="Captain Mira Vale").click()
    reply = say(page, "Is a storm coming tonight?")
    first = reply.locator(".text").inner_text()
    reply.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".message").last.locator(".counter")).to_have_text("2 / 2", timeout=120_000)
    expect(page.locator(DONE)).to_have_count(1)
    second = page.locator(".message").last.locator(".text").inner_text()
    assert_no_sideways_overflow(page)  # the message with its arrows, counter and buttons

    page.locator(".message").last.get_by_role("button", name="Previous alternative").click()
    expect(page.locator(".message").last.locator(".counter")).to_have_text("1 / 2")
    expect(page.locator(".message").last.locator(".text")).to_have_text(first)
    # Keyboard: → on the message's buttons shows the next alternative.
    page.locator(".message").last.get_by_role("button", name="Regenerate").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator(".message").last.locator(".counter")).to_have_text("2 / 2")
    expect(page.locator(".message").last.locator(".text")).to_have_text(second)
    # Deleting this alternative leaves the other one.
    page.locator(".message").last.get_by_role("button", name="Delete message").click()
    expect(page.locator(".message").last.locator(".text")).to_have_text(first)
    expect(page.locator(".message").last.locator(".counter")).to_have_count(0)
    page.reload()
    expect(page.locator(".message").last.locator(".text")).to_have_text(first)


def test_edit_a_message_and_switch_back_to_the_old_branch(browser, page_server):
    from playwright.sync_api import expect

    page = logged_in(browser, page_server)
    page.get_by_role("button", name="Captain Mira Vale").click()
    page.get_by_role("button", name="New conversation").click()
    old_reply = say(page, "What is our heading?").locator(".text").inner_text()
    user = page.locator(".message.user").last
    user.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("Where are we sailing?")
    assert_no_sideways_overflow(page)  # the message being edited in place
    page.get_by_label("Edit message").press("Enter")
    expect(page.locator(".message.user").last.locator(".counter")).to_have_text("2 / 2", timeout=120_000)
    expect(page.locator(DONE)).to_have_count(1)
    expect(page.locator(".message.user").last.locator(".text")).to_have_text("Where are we sailing?")

    page.locator(".message.user").last.get_by_role("button", name="Previous alternative").click()
    expect(page.locator(".message.user").last.locator(".text")).to_have_text("What is our heading?")
    expect(page.locator(".message").last.locator(".text")).to_have_text(old_reply)


def test_delete_a_past_conversation_from_the_sidebar(browser, page_server):
    from playwright.sync_api import expect

    page = logged_in(browser, page_server, narrow=False)
    page.get_by_role("button", name="Captain Mira Vale").click()
    page.get_by_role("button", name="New conversation").click()
    say(page, "Which sail do we mend first?")
    history = page.locator("#conversations")
    expect(history.get_by_role("button", name="Which sail do we mend first?", exact=True)).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.dismiss())  # asked first; dismissed, nothing happens
    history.get_by_role("button", name="Delete conversation: Which sail do we mend first?").click()
    expect(history.get_by_role("button", name="Which sail do we mend first?", exact=True)).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept())
    history.get_by_role("button", name="Delete conversation: Which sail do we mend first?").click()
    expect(page.get_by_text("Conversation deleted.")).to_be_visible()
    expect(history.get_by_role("button", name="Which sail do we mend first?", exact=True)).to_have_count(0)
    expect(page.locator(".message.user")).to_have_count(0)  # the open conversation was the one deleted
    listed = page.evaluate("fetch('/v1/conversations/?character=captain-mira').then((r) => r.json())")
    assert "Which sail do we mend first?" not in [conversation["title"] for conversation in listed["results"]]
    page.reload()  # the page no longer remembers it either
    expect(page.locator(".message.user")).to_have_count(0)


def test_a_conversation_is_not_deleted_from_the_sidebar_while_its_reply_is_written(browser, page_server):
    """The server would refuse it (409), and that error event ended the reply on the page while it went on."""
    from playwright.sync_api import expect

    page = logged_in(browser, page_server, narrow=False)
    page.get_by_role("button", name="Chef Luca Romano").click()
    page.get_by_role("button", name="New conversation").click()
    say(page, "Buongiorno!")
    delete = page.locator("#conversations").get_by_role("button", name="Delete conversation: Buongiorno!")
    expect(delete).to_be_enabled()
    page.get_by_label("Your message").fill("Tell me, in great detail, every recipe you know.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".message[aria-busy='true'] .text")).not_to_have_text("", timeout=120_000)
    expect(delete).to_be_disabled()
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".message[data-stopped='true']")).to_have_count(1, timeout=60_000)
    expect(delete).to_be_enabled()


def test_continue_a_reply(browser, page_server):
    from playwright.sync_api import expect

    page = logged_in(browser, page_server)
    page.get_by_role("button", name="Byte").click()
    reply = say(page, "Explain how a compiler works, step by step.")
    before = reply.locator(".text").inner_text()
    reply.get_by_role("button", name="Continue").click()
    expect(page.locator(".message").last.locator(".text")).not_to_have_text(before, timeout=120_000)
    expect(page.locator(DONE)).to_have_count(1, timeout=120_000)
    after = page.locator(".message").last.locator(".text").inner_text()
    assert after.startswith(before.rstrip()) and len(after) > len(before)
    assert page.locator(".message.assistant").count() == 2  # greeting and the one extended reply


def test_stop_a_reply_and_keep_its_text(browser, page_server):
    from playwright.sync_api import expect

    page = logged_in(browser, page_server)
    page.get_by_role("button", name="Chef Luca Romano").click()
    say(page, "Hello!")
    page.get_by_label("Your message").fill("Tell me, in great detail, every recipe you know.")
    page.get_by_role("button", name="Send").click()
    streaming = page.locator(".message[aria-busy='true'] .text")
    expect(streaming).not_to_have_text("", timeout=120_000)
    page.get_by_role("button", name="Stop").click()
    stopped = page.locator(".message[data-stopped='true']")
    expect(stopped).to_have_count(1, timeout=60_000)
    text = stopped.locator(".text").inner_text()
    assert text.strip()
    page.reload()
    expect(page.locator(".message[data-stopped='true'] .text")).to_have_text(text)
    expect(page.locator(".stopped-note")).to_have_text("Stopped")


def test_a_reply_completes_after_its_page_was_closed(browser, page_server):
    from playwright.sync_api import expect

    page = logged_in(browser, page_server)
    page.get_by_role("button", name="Professor Ada Quill").click()
    say(page, "Good morning!")
    address = page.url
    conversation = address.split("conversation=")[1]
    page.get_by_label("Your message").fill("Explain the history of the printing press.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".message[aria-busy='true'] .text")).not_to_have_text("", timeout=120_000)
    page.close()  # the page goes away mid-reply

    again = logged_in(browser, page_server)
    again.goto(address)
    # Streaming on if it still runs, stored if it ended: either way the whole reply shows.
    expect(again.locator(".message")).to_have_count(5, timeout=120_000)
    expect(again.locator(".message[aria-busy='true']")).to_have_count(0, timeout=120_000)
    stored = page_server.manage(
        "from chat.models import Conversation\n"
        f"c = Conversation.objects.get(pk='{conversation}')\n"
        "m = c.messages.order_by('id').last()\n"
        "print(m.role, m.stopped, m.finish_reason, c.active_id == m.pk)")
    assert stored.split() == ["assistant", "False", stored.split()[2], "True"]
    assert stored.split()[2] in ("stop", "length")
    last = again.locator(".message").last.locator(".text").inner_text()
    assert last.strip()


def test_a_reply_that_ended_between_the_pages_path_and_its_attach_shows(browser, page_server):
    """The page loads a conversation's path, then attaches to its running reply. A reply that ended in between is
    answered "idle" by the attach: the page then loads the path again. The race is made certain here: the first
    path request is answered with the path as it was before the last exchange."""
    import json

    from playwright.sync_api import expect

    page = logged_in(browser, page_server)
    page.get_by_role("button", name="Captain Mira").click()
    say(page, "Ahoy!")
    before = page.evaluate("(url) => fetch(url).then((r) => r.text())",
                           page.url.split("?")[0] + "v1/conversations/"
                           + page.url.split("conversation=")[1] + "/path/")
    say(page, "Where are we headed?")
    expect(page.locator(".message")).to_have_count(5, timeout=120_000)
    expect(page.locator(".message[aria-busy='true']")).to_have_count(0, timeout=120_000)  # the reply has ended
    address = page.url
    page.close()

    again = logged_in(browser, page_server)
    stale = {"sent": False}

    def first_path_stale(route):
        if stale["sent"]:
            return route.continue_()
        stale["sent"] = True
        route.fulfill(status=200, content_type="application/json", body=before)

    again.route("**/v1/conversations/*/path/", first_path_stale)
    again.goto(address)
    expect(again.locator(".message")).to_have_count(5, timeout=60_000)
    assert stale["sent"] and len(json.loads(before)["messages"]) == 3
