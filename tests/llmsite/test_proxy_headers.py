"""The client's address behind a proxy: daphne must read it from a header the proxy sets itself (X-Real-IP), never
from the first X-Forwarded-For entry, which the client writes (login lockouts are per address)."""

import re

import pytest

from chat.management.commands.serve import DrainingCommandLine
from tests.subprocess_helpers import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(path for path in (ROOT / "deploy").iterdir() if path.is_file())]
# Each --proxy-headers (a command line, a YAML list, a sentence) with what follows it.
PROXY_HEADERS = re.compile(r"--proxy-headers(?![-\w])(.{0,60})", re.DOTALL)


def test_every_documented_proxy_headers_option_comes_with_the_address_header():
    uses = [(path.name, match.group()) for path in DOCUMENTS
            for match in PROXY_HEADERS.finditer(path.read_text(errors="replace"))]
    assert len(uses) >= 3, "the deploy docs show how to run daphne behind Nginx"
    for name, use in uses:
        assert "--proxy-headers-host" in use, (name, use)


def test_serve_refuses_proxy_headers_without_the_host_header(capsys):
    with pytest.raises(SystemExit) as exit_info:
        DrainingCommandLine().run(["--proxy-headers", "llmsite.asgi:application"])
    assert exit_info.value.code == 2
    assert "--proxy-headers needs --proxy-headers-host" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--proxy-headers", "--proxy-headers-host", "X-Real-IP"],
                                  ["--proxy-headers", "--proxy-headers-host=X-Real-IP"], []])
def test_serve_accepts_proxy_headers_with_the_host_header_or_none(args):
    cli = DrainingCommandLine()
    cli.refuse_proxy_headers_without_host(cli.parser.parse_args([*args, "llmsite.asgi:application"]))
