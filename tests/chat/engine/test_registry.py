"""Model registry: lazy, once-per-process loading; clear errors for unknown and unreadable models."""

import logging
import subprocess
import sys
import textwrap
import threading

import pytest

from chat.engine import Engine, ModelRegistry, ModelSpec, ModelUnavailable, UnknownModel

from .conftest import ROOT


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_the_engine_imports_no_inference_library(tiny_gguf):
    result = run_python(
        """
        import sys
        import chat.engine
        from chat.engine import ModelRegistry, ModelSpec
        registry = ModelRegistry([ModelSpec("tiny", sys.argv[1], parallel=1)])
        print(sorted(name for name in ("llama_cpp", "ctransformers") if name in sys.modules))
        registry.get("tiny")  # the first use imports the backend library
        print("llama_cpp" in sys.modules, "ctransformers" in sys.modules)
        registry.close()
        """,
        str(tiny_gguf),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True False"]


def test_registry_names_default_and_specs_without_loading(registry):
    assert registry.default_name == "tiny-llama"  # the first spec
    assert registry.spec().name == "tiny-llama"
    assert "smollm2" in registry.names()
    assert registry.spec("missing").backend == "llama_cpp"
    assert not registry.is_loaded("missing")


def test_unknown_model_is_a_clear_error(registry):
    with pytest.raises(UnknownModel) as raised:
        registry.get("gpt-17")
    assert raised.value.name == "gpt-17"
    assert "gpt-17" in str(raised.value) and "tiny-llama" in str(raised.value)
    with pytest.raises(UnknownModel):
        registry.spec("gpt-17")


def test_missing_file_is_model_unavailable(registry):
    with pytest.raises(ModelUnavailable) as raised:
        registry.get("missing")
    error = raised.value
    assert error.model == "missing" and error.path.endswith("does-not-exist.gguf")
    assert "does not exist" in error.reason
    assert not registry.is_loaded("missing")


@pytest.mark.smollm2
def test_ctransformers_cannot_read_smollm2_and_says_what_to_do(registry, smollm2_gguf):
    with pytest.raises(ModelUnavailable) as raised:
        registry.get("smollm2-ct")
    message = str(raised.value)
    assert "ctransformers" in message
    assert str(smollm2_gguf) in message
    assert "backend: llama_cpp" in message
    assert "Failed to create LLM" not in message


def test_ctransformers_failure_on_an_unreadable_file_is_explained(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00\x01not a model" * 1000)
    registry = ModelRegistry([ModelSpec("junk", str(junk), backend="ctransformers")])
    with pytest.raises(ModelUnavailable) as raised:
        registry.get()
    message = str(raised.value)
    assert "ctransformers" in message and str(junk) in message and "backend: llama_cpp" in message


@pytest.mark.parametrize("backend", ["llama_cpp", "ctransformers"])
def test_eight_concurrent_first_calls_load_the_model_exactly_once(tiny_gguf, caplog, backend):
    caplog.set_level(logging.INFO, logger="chat.engine.registry")
    registry = ModelRegistry([ModelSpec("tiny", str(tiny_gguf), backend=backend, parallel=2)])
    start = threading.Barrier(8)
    engines: list[Engine] = []

    def first_call():
        start.wait()
        engines.append(registry.get("tiny"))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(engines) == 8 and all(engine is engines[0] for engine in engines)
        loads = [r for r in caplog.records if r.name == "chat.engine.registry" and "loaded" in r.getMessage()]
        assert len(loads) == 1
        assert registry.is_loaded("tiny")
    finally:
        registry.close()


def test_invalid_configuration_fails_when_the_registry_is_built(tiny_gguf):
    with pytest.raises(ValueError):
        ModelSpec("x", str(tiny_gguf), backend="vllm")
    with pytest.raises(ValueError):
        ModelRegistry([ModelSpec("x", str(tiny_gguf)), ModelSpec("x", str(tiny_gguf))])
    with pytest.raises(ValueError):
        ModelRegistry([ModelSpec("x", str(tiny_gguf))], default="y")
