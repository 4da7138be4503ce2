"""The multi-instance check: Nginx balancing two daphne instances, with SSE and WebSocket through it."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import missing_service
from tests.subprocess_helpers import ROOT

pytestmark = pytest.mark.smollm2


def test_nginx_balances_two_instances_without_errors(redis_url):
    if not shutil.which("nginx"):
        missing_service("nginx is not installed (.ci/run installs it)")
    result = subprocess.run([sys.executable, "-m", "deploy.check_multi_instance"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={"PATH": "/usr/sbin:/usr/bin:/bin", "HOME": "/tmp",
                                                         "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/13"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "errors: 0" in result.stdout
