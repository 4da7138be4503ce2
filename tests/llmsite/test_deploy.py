"""The production deploy check (Nginx, two daphne instances, a worker, PostgreSQL, Redis) and the Nginx template."""

import re
import shutil
import subprocess
import sys

import pytest

from characters.card_services import DEFAULT_CARD_MAX_BYTES
from tests.conftest import missing_service
from tests.subprocess_helpers import ROOT

TEMPLATE = (ROOT / "deploy" / "nginx.conf.template").read_text()
SIZES = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def test_nginx_accepts_a_card_as_large_as_the_limit():
    size, unit = re.search(r"client_max_body_size (\d+)([kmg]?);", TEMPLATE).groups()
    assert int(size) * SIZES.get(unit, 1) > DEFAULT_CARD_MAX_BYTES


def test_nginx_passes_the_balancers_scheme_on_and_serves_media():
    assert "proxy_set_header X-Forwarded-Proto $scheme;" not in TEMPLATE  # would loop behind TLS
    assert TEMPLATE.count("proxy_set_header X-Forwarded-Proto $forwarded_proto;") == 2
    assert re.search(r"location /media/ \{\s*alias \$\{MEDIA_ROOT\}/;", TEMPLATE)


def test_nginx_refuses_the_probe_paths_and_sets_its_own_request_id():
    # Probes reach each instance directly; from outside, an anonymous /ready would load the model.
    for probe in ("/health", "/ready", "/metrics"):
        assert re.search(rf"location = {probe} \{{ return 404; \}}", TEMPLATE), probe
    assert TEMPLATE.count("proxy_set_header X-Request-ID $request_id;") == TEMPLATE.count("proxy_pass ") == 2


@pytest.mark.smollm2
def test_production_stack_behind_nginx_end_to_end(redis_url, postgres_url):
    if not shutil.which("nginx"):
        missing_service("nginx is not installed (.ci/run installs it)")
    redis_base = redis_url.rsplit("/", 1)[0]
    result = subprocess.run([sys.executable, "-m", "deploy.check_multi_instance"], cwd=ROOT, capture_output=True,
                            text=True, timeout=400, env={"PATH": "/usr/sbin:/usr/bin:/bin", "HOME": "/tmp",
                                                         "REDIS_URL": redis_base + "/12",
                                                         "CELERY_BROKER_URL": redis_base + "/13",
                                                         "POSTGRES_URL": postgres_url})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "errors: 0; problems: 0" in result.stdout
