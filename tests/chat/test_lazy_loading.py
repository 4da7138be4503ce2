"""Management commands and test collection never load an inference library (models load on first use)."""

import json

from tests.subprocess_helpers import run_python


def test_setup_check_and_migrate_load_no_inference_library(tmp_path):
    result = run_python("""
import sys, django
django.setup()
from django.core.management import call_command
call_command("check", verbosity=0)
call_command("migrate", verbosity=0)
import chat.engines, chat.admin
print(sorted(name for name in ("llama_cpp", "ctransformers") if name in sys.modules))
""", env={"SQLITE_PATH": str(tmp_path / "db.sqlite3")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_collecting_the_test_suite_loads_no_inference_library(tmp_path):
    report = tmp_path / "report.json"
    result = run_python(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                        env={"LLMSITE_COLLECTION_REPORT": str(report)}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(report.read_text()) == {"loaded": []}
    # The report covers a real collection, including the engine tests that use the inference libraries.
    assert "tests/chat/engine/test_generation.py::test_cancel_frees_the_sequence" in result.stdout
