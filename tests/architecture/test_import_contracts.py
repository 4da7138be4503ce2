"""The import contracts of pyproject.toml hold, and they fail when an arrow is turned round.

Run with import-linter (static: nothing is imported). The breaking cases run on a copy of the
packages with one import added, so the contracts are shown to be able to fail.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from chat.engine import Engine, EngineProtocol
from chat.engine.remote import RemoteEngine

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(ROOT / ".venv" / "bin" / "lint-imports")) if (ROOT / ".venv" / "bin" / "lint-imports").exists() \
    else shutil.which("lint-imports")
PACKAGES = ("chat", "characters", "scenarios", "llmsite")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


@pytest.fixture
def project_copy(tmp_path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static",
                                                                                          "templates", "migrations"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(module: Path, statement: str) -> None:
    module.write_text(module.read_text() + f"\n{statement}\n")


def test_the_project_keeps_its_import_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "statement", "contract"), [
    ("characters/models.py", "import chat.models", "Apps: chat uses the content apps"),
    ("scenarios/selectors.py", "from characters.models import Character", "Apps: chat uses the content apps"),
    ("chat/engine/types.py", "from django.conf import settings", "The engine imports no Django"),
    ("chat/engine/registry.py", "import chat.engines", "chat: surfaces above use cases"),
    ("chat/replies.py", "from chat.services import chat_completion_create", "chat: surfaces above use cases"),
    ("chat/services.py", "from chat.api.views import logged", "chat: surfaces above use cases"),
    ("characters/card_format.py", "from characters import card_services", "No import cycles"),
])
def test_turning_an_arrow_round_breaks_a_contract(project_copy, module, statement, contract):
    add_import(project_copy / module, statement)
    result = lint_imports(project_copy)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken) or contract in result.stdout.split("Broken contracts")[-1], \
        result.stdout


def test_chat_keeps_a_short_top_level():
    """Each step of a request has its own file; surfaces, tools and the engine live in subpackages."""
    modules = sorted(path.stem for path in (ROOT / "chat").glob("*.py") if path.stem != "__init__")
    assert len(modules) <= 13, modules


def test_local_and_remote_engines_share_one_protocol():
    for engine_class in (Engine, RemoteEngine):
        members = [name for name in vars(EngineProtocol) if not name.startswith("_")]
        missing = [name for name in members if not hasattr(engine_class, name)]
        assert "submit" in members and "alive" in members
        assert not missing, (engine_class.__name__, missing)
