"""The local `.env` that `make run` writes, so that the README's commands work after it as written; without
that file the production defaults stay (DEBUG off, SECRET_KEY required)."""

import os
import re
import shutil
import subprocess

import pytest

from llmsite.env import SettingError, load_env_file
from tests.subprocess_helpers import ROOT

README_COMMAND = re.compile(r"`(\.venv/bin/python manage\.py create_api_key --name \w+)`")


def test_the_file_sets_only_what_the_environment_does_not(tmp_path, monkeypatch):
    path = tmp_path / ".env"
    path.write_text("# local\n\nDEBUG=1\nexport SECRET_KEY='s3cret=x'\nLOG_LEVEL=DEBUG\n")
    monkeypatch.delenv("DEBUG", raising=False)
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    load_env_file(path)
    assert (os.environ["DEBUG"], os.environ["SECRET_KEY"], os.environ["LOG_LEVEL"]) == ("1", "s3cret=x", "WARNING")
    load_env_file(tmp_path / "missing")  # nothing to load
    path.write_text("DEBUG 1\n")
    with pytest.raises(SettingError, match=r"\.env:1 is not a NAME=value line"):
        load_env_file(path)


def fresh_clone(tmp_path):
    """The tracked files of this checkout, as a fresh clone has them, sharing this checkout's virtualenv."""
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    (clone / ".venv").symlink_to((ROOT / ".venv").resolve())
    return clone


def shell_env() -> dict:
    """A terminal's environment: none of the project's variables set."""
    return {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}


@pytest.mark.smollm2  # slow: copies the checkout and migrates a database in child processes
def test_the_readme_key_command_works_after_make_run_in_a_fresh_clone(tmp_path):
    command = README_COMMAND.search((ROOT / "README.md").read_text()).group(1)
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0  # never committed
    clone = fresh_clone(tmp_path)

    refused = subprocess.run(command, shell=True, cwd=clone, env=shell_env(), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0  # no .env: a deployment keeps the production defaults
    assert "SECRET_KEY must be set when DEBUG is off" in refused.stderr

    planned = subprocess.run(["make", "-n", "run"], cwd=clone, env=shell_env(), capture_output=True, text=True,
                             timeout=60)
    assert "SECRET_KEY=" in planned.stdout and "> .env" in planned.stdout  # `make run` writes the file first
    # The parts of `make run` that matter here (the rest installs, downloads and serves).
    for step in (["make", "local-env"], [".venv/bin/python", "manage.py", "migrate", "--noinput"]):
        done = subprocess.run(step, cwd=clone, env=shell_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (clone / ".env").stat().st_mode & 0o077 == 0  # the secret is readable by its owner only

    result = subprocess.run(command, shell=True, cwd=clone, env=shell_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    raw_key = result.stdout.strip()
    assert re.fullmatch(r"llms-[\w-]{40,}", raw_key), result.stdout
    again = subprocess.run(command, shell=True, cwd=clone, env=shell_env(), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stdout.strip() != raw_key
