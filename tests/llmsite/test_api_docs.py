"""Swagger UI and ReDoc are served by the site itself (drf-spectacular-sidecar) and render with no network, under\ntheir Content-Security-Policy."""

import re
from urllib.parse import urlparse

import pytest

from llmsite.content_security import DOCS_POLICY
from tests.browser import chromium, log_in
from tests.live import LiveServer, prepare_database
from tests.subprocess_helpers import ROOT

ARTIFACTS = ROOT / "artifacts"


@pytest.mark.django_db
def test_doc_pages_load_their_assets_from_this_site(client):
    for path in ("/api/docs/", "/api/redoc/"):
        html = client.get(path).content.decode()
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources, html
        assert all(not urlparse(source).netloc for source in sources), sources  # nothing from a CDN


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    server = LiveServer(workdir=tmp_path_factory.mktemp("docs"))
    prepare_database(server, {})
    server.manage("from django.contrib.auth import get_user_model\n"
                  "get_user_model().objects.create_user('reader', password='a-long-test-password')")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(("path", "ready"), [("/api/docs/", ".swagger-ui .opblock"),
                                             ("/api/redoc/", "[role=menuitem], .menu-content li")])
def test_doc_pages_render_offline_in_chromium(docs_server, path, ready):
    ARTIFACTS.mkdir(exist_ok=True)
    outside = []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def only_this_site(route):  # no network but the server under test
            if route.request.url.startswith(docs_server.url):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", only_this_site)
        console = []
        page.on("console", lambda message: console.append(message.text))
        log_in(page, docs_server.url + "/accounts/login/", "reader", "a-long-test-password")
        page.wait_for_url(docs_server.url + "/")
        response = page.goto(docs_server.url + path)
        assert response.headers["content-security-policy"] == DOCS_POLICY
        page.locator(ready).first.wait_for(state="visible", timeout=30_000)
        assert "chat/completions" in page.content()
        page.screenshot(path=str(ARTIFACTS / f"api-{path.strip('/').replace('/', '-')}.png"), full_page=False)
        browser.close()
    # The one thing asked of the network: ReDoc's "by Redocly" badge, an <img> that hides itself when
    # it cannot load. Everything the page needs came from this site.
    assert set(outside) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, outside
    # Under the policy (llmsite/content_security.py): nothing refused but that badge, which the policy now blocks.
    assert not [text for text in console if "Content Security Policy" in text and "cdn.redoc.ly" not in text], console
