"""Engine fixtures: tiny random GGUF models written once per session, and one shared registry.

The registry is session-scoped so each model loads once for the whole suite; tests that need an
engine with special settings get their own spec in it. Nothing here imports an inference library:
backends are imported when a model is first used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chat.engine import ModelRegistry, ModelSpec
from tests import factories
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[3]
SMOLLM2_PATH = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONTEXT = 256

# Like Gemma's template: refuses a system role.
SYSTEM_REJECTING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def write_tiny_gguf():
    return factories.write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, write_tiny_gguf) -> Path:
    """A tiny llama model with a ChatML chat template."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def tiny_gguf_without_template(tmp_path_factory, write_tiny_gguf) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-plain.gguf", seed=1, with_chat_template=False)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not SMOLLM2_PATH.exists():
        pytest.fail(f"{SMOLLM2_PATH} is missing: run `make model` (make test does it first)")
    return SMOLLM2_PATH


@pytest.fixture(scope="session")
def registry(tiny_gguf, tiny_gguf_without_template):
    tiny = str(tiny_gguf)
    specs = [
        ModelSpec("tiny-llama", tiny, context_length=TINY_CONTEXT, parallel=4),
        # One thread: ctransformers' old ggml spins its worker threads, which costs more than a tiny model computes.
        ModelSpec("tiny-ct", tiny, backend="ctransformers", context_length=TINY_CONTEXT, threads=1),
        # Separate engines where a test needs to know exactly what ran in them.
        ModelSpec("tiny-batch", tiny, context_length=TINY_CONTEXT, parallel=4),
        ModelSpec("tiny-prefix", tiny, context_length=TINY_CONTEXT, parallel=1, prefix_cache_mb=8),
        ModelSpec("tiny-plain", str(tiny_gguf_without_template), context_length=TINY_CONTEXT, parallel=1),
        ModelSpec("tiny-folding", tiny, context_length=TINY_CONTEXT, parallel=1, chat_template=SYSTEM_REJECTING_TEMPLATE),
        # No prefill budget: llama.cpp's CPU kernels are not bit-identical across ubatch shapes, so prompts
        # cut into small chunks next to a stream can flip a greedy near-tie (measured: 4-token chunks changed
        # 2 of 4 replies, 16-token chunks none); "batched equals alone" is tested with whole prompts.
        # The budget itself is tested in test_scheduling.py.
        ModelSpec("smollm2", str(SMOLLM2_PATH), context_length=1024, parallel=4, prefill_step_ms=0),
        ModelSpec("smollm2-ct", str(SMOLLM2_PATH), backend="ctransformers"),
        ModelSpec("missing", str(ROOT / "models" / "does-not-exist.gguf")),
    ]
    registry = ModelRegistry(specs)
    yield registry
    registry.close()


@pytest.fixture(params=["tiny-llama", "tiny-ct"])
def tiny_engine(request, registry):
    """The tiny model under each backend."""
    return registry.get(request.param)


@pytest.fixture
def smollm2(registry, smollm2_gguf):
    return registry.get("smollm2")


# -- remote engines over scripted upstreams (tests/fake_upstream.py) ------------------------------


@pytest.fixture
def upstreams():
    """start(script=None, **FakeUpstream options) -> a fake upstream server, stopped after the test."""
    started: list[FakeUpstream] = []

    def start(script=None, **options) -> FakeUpstream:
        started.append(FakeUpstream(script=script, **options))
        return started[-1]

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def engines():
    """make(*upstreams, **ModelSpec options) -> a RemoteEngine over them, closed after the test."""
    from chat.engine.remote import RemoteEngine  # imported here: a test of local models never needs it

    made: list[RemoteEngine] = []

    def make(*pool: FakeUpstream, **options) -> RemoteEngine:
        health_interval = options.pop("health_interval", 3600.0)
        options = {"context_length": 2048, "connect_timeout": 2, "timeout": 30, **options}
        spec = ModelSpec("remote", "", backend="openai_compatible", base_urls=tuple(u.url for u in pool), **options)
        made.append(RemoteEngine(spec, health_interval=health_interval))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def chunk_rules():
    """Engines loaded from now on keep to whole aligned chunks, as where the row probe fails (a model of F32
    weights, a build without the rows patch): for the tests of those rules. A patch of its own, which a test's
    monkeypatch.undo() leaves in place."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("chat.engine.backends.llama_cpp.rows_split_invariant", lambda *args, **kwargs: False)
        yield
