"""The admin (and DRF's browsable API) in headless Chromium under its Content-Security-Policy (llmsite/content_security.py): every page sends
the policy, and its scripts (the slug filled in from the name, the prompt preview, the usage chart) run without a
single violation."""

import pytest

from tests.browser import chromium
from tests.live import LiveServer, prepare_database

PAGES = ["/admin/", "/admin/characters/character/", "/admin/characters/character/{mira}/change/",
         "/admin/characters/character/add/", "/admin/scenarios/scenario/", "/admin/chat/usagerecord/",
         "/v1/models", "/api-auth/login/"]  # and DRF's browsable API


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    server = LiveServer(workdir=tmp_path_factory.mktemp("admin-policy"))
    prepare_database(server, {})
    mira = server.manage("from django.contrib.auth import get_user_model\n"
                         "from characters.models import Character\n"
                         "get_user_model().objects.create_superuser('editor', password='a-long-test-password')\n"
                         "print(Character.objects.get(slug='captain-mira').pk)").strip().splitlines()[-1]
    server.start()
    server.mira = mira
    yield server
    server.stop()


def test_admin_pages_run_under_their_policy(admin_server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        console = []
        page.on("console", lambda message: console.append(message.text))
        response = page.goto(admin_server.url + "/admin/login/")
        assert "style-src 'self' 'unsafe-inline'" in response.headers["content-security-policy"]
        page.get_by_label("Username").fill("editor")
        page.get_by_label("Password").fill("a-long-test-password")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("link", name="Log out").or_(page.get_by_role("button", name="Log out"))).to_be_visible()
        for path in PAGES:
            response = page.goto(admin_server.url + path.format(mira=admin_server.mira))
            assert response.status == 200, path
            policy = response.headers["content-security-policy"]
            assert "script-src" not in policy and "default-src 'self'" in policy, policy  # no inline scripts
            page.wait_for_load_state("load")
        # The add form's script fills the slug in from the name (prepopulated fields: a script with its data).
        page.goto(admin_server.url + "/admin/characters/character/add/")
        page.locator("#id_name").press_sequentially("Quartermaster Jo")  # keyup events, as a person typing
        expect(page.locator("#id_slug")).to_have_value("quartermaster-jo")
        # Style attributes still apply (the prompt preview's box: style="padding: 8px 10px").
        page.goto(admin_server.url + f"/admin/characters/character/{admin_server.mira}/change/")
        assert page.locator("#prompt-preview > div").evaluate("e => getComputedStyle(e).paddingLeft") == "10px"
        # The browsable API's log-out (DRF's own link runs an inline onclick; ours is a form button).
        page.goto(admin_server.url + "/v1/models")
        page.get_by_role("button", name="Log out").click()
        page.goto(admin_server.url + "/admin/")
        expect(page.get_by_label("Password")).to_be_visible()  # logged out: the admin asks again
        browser.close()
    assert not [text for text in console if "Content Security Policy" in text], console
