"""Long prompts beside decoding streams go to a second context on a thread of their own
(chat/engine/backends/side_prefill.py): the reply and every logprob are a cold prompt's, the streams' too, and a
cancel, a failure or a shutdown midway leaves the engine serving. SmolLM2: real logits, compared exactly."""

from __future__ import annotations

import threading
import time

import pytest

from chat.engine import ModelRegistry, ModelSpec, SamplingParams
from chat.engine.backends import side_prefill
from chat.engine.errors import EngineClosed

pytestmark = pytest.mark.smollm2

# ~1,050 tokens: past SIDE_PREFILL_MIN_TOKENS, its last chunk padded (tiled) far past 256 cells. A raw prompt the
# model continues for all of max_tokens (a question here gets the end-of-generation token first: no logprobs).
LONG_PROMPT = "Here is a long list of facts about the sea, ships and sailors. " * 72 + "The sea is"
LONG_PARAMS = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
# A stream that decodes while the long prompt arrives: a raw prompt the model continues by counting.
STREAM_PROMPT = "Numbers: " + ", ".join(str(n) for n in range(1, 40)) + ","
STREAM_PARAMS = SamplingParams(max_tokens=80, temperature=0, logprobs=1)


def engine_registry(smollm2_gguf, **options) -> ModelRegistry:
    options = {"parallel": 2, **options}
    return ModelRegistry([ModelSpec("smol-side", str(smollm2_gguf), context_length=2048, threads=2,
                                    prefix_cache_mb=0, **options)])


def run(generation):
    for _ in generation:
        pass
    return generation.result


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def records(completion) -> list:
    return [(t.token, t.logprob, [(o.token, o.logprob) for o in t.top]) for t in completion.logprobs]


@pytest.fixture(scope="module")
def alone(smollm2_gguf):
    """Each request's completion on an engine that never uses the side context, one request at a time."""
    registry = engine_registry(smollm2_gguf, side_prefill=False)
    try:
        engine = registry.get()
        return {"long": engine.generate(LONG_PROMPT, LONG_PARAMS), "stream": engine.generate(STREAM_PROMPT,
                                                                                            STREAM_PARAMS)}
    finally:
        registry.close()


def long_prompt_beside_a_stream(engine, params: SamplingParams = LONG_PARAMS, owner: str = "B"):
    """(stream, long request): the long prompt submitted once the stream decodes (by `owner`: another owner's
    request reuses none of the cells an earlier one left)."""
    generated = engine.stats()["tokens_generated"]
    stream = engine.submit(STREAM_PROMPT, STREAM_PARAMS, owner="A")
    wait_for(lambda: engine.stats()["tokens_generated"] >= generated + 3)
    return stream, engine.submit(LONG_PROMPT, params, owner=owner)


def test_a_long_prompt_beside_a_stream_is_evaluated_aside_with_the_cold_logprobs(smollm2_gguf, alone):
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        stream, long = long_prompt_beside_a_stream(engine)
        long_done, stream_done = run(long), run(stream)
        stats = engine.stats()
    finally:
        registry.close()
    assert stats["side_prefills"] == 1
    assert long_done.text == alone["long"].text and records(long_done) == records(alone["long"])
    # The stream decoded on one thread meanwhile: the same tokens and logprobs as alone.
    assert stream_done.text == alone["stream"].text and records(stream_done) == records(alone["stream"])
    assert long_done.prompt_tokens == alone["long"].prompt_tokens
    assert len(long_done.logprobs) == LONG_PARAMS.max_tokens  # every token's record compared


def test_a_side_prompt_whose_streams_ended_takes_every_thread_with_the_same_logprobs(smollm2_gguf, alone,
                                                                                     monkeypatch):
    """The streams end while the long prompt is evaluated aside: its next chunks take both threads (the main
    context has nothing else to do), and its logprobs are still a cold prompt's."""
    jobs = []
    start = side_prefill.SidePrefill.start
    monkeypatch.setattr(side_prefill.SidePrefill, "start",
                        lambda self, *args: (lambda job: (jobs.append(job), job)[1])(start(self, *args)))
    short_stream = SamplingParams(max_tokens=6, temperature=0)
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        generated = engine.stats()["tokens_generated"]
        stream = engine.submit(STREAM_PROMPT, short_stream, owner="A")
        wait_for(lambda: engine.stats()["tokens_generated"] >= generated + 3)
        long = engine.submit(LONG_PROMPT, LONG_PARAMS, owner="B")
        assert run(stream).finish_reason == "length"  # ended while the long prompt is evaluated aside
        long_done = run(long)
        assert engine.stats()["side_prefills"] == 1
    finally:
        registry.close()
    assert jobs and jobs[0].threads == 2
    assert records(long_done) == records(alone["long"])


def test_a_long_prompt_with_nothing_decoding_stays_in_the_main_context(smollm2_gguf, alone):
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        assert records(engine.generate(LONG_PROMPT, LONG_PARAMS)) == records(alone["long"])
        assert engine.stats()["side_prefills"] == 0  # two threads on it: no stream to keep flowing
    finally:
        registry.close()


def test_a_failed_side_evaluation_goes_on_in_the_main_context(smollm2_gguf, alone, monkeypatch):
    def failing(self, job):
        job.failed = True
        return False

    monkeypatch.setattr(side_prefill.SidePrefill, "_evaluate", failing)
    assert_evaluated_in_the_main_context(smollm2_gguf, alone)


def assert_evaluated_in_the_main_context(smollm2_gguf, alone) -> None:
    """The long prompt beside a stream on a fresh engine: both replies are the runs alone's, none went aside."""
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        stream, long = long_prompt_beside_a_stream(engine)
        assert records(run(long)) == records(alone["long"])
        assert run(stream).text == alone["stream"].text
        assert engine.stats()["side_prefills"] == 0
    finally:
        registry.close()


def held_side_jobs(monkeypatch) -> list:
    """Side jobs from now on wait, before their first chunk, until cancelled: the test acts on them midway."""
    held = []
    evaluate = side_prefill.SidePrefill._evaluate

    def held_evaluate(self, job):
        held.append(job)
        while not job.cancelled:
            time.sleep(0.005)
        return evaluate(self, job)

    monkeypatch.setattr(side_prefill.SidePrefill, "_evaluate", held_evaluate)
    return held


def test_a_side_prompt_cancelled_midway_leaves_the_engine_serving(smollm2_gguf, alone, monkeypatch):
    held = held_side_jobs(monkeypatch)
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        stream, long = long_prompt_beside_a_stream(engine)
        wait_for(lambda: held)
        long.cancel()
        assert run(long).finish_reason == "cancelled"
        assert run(stream).text == alone["stream"].text  # it decoded on while the side job waited
        monkeypatch.undo()
        # The side context is free again: the next long prompt beside a stream goes there.
        stream, long = long_prompt_beside_a_stream(engine)
        assert records(run(long)) == records(alone["long"])
        run(stream)
        assert engine.stats()["side_prefills"] == 1
    finally:
        registry.close()


def test_an_engine_closed_while_a_prompt_is_evaluated_aside_shuts_down(smollm2_gguf, monkeypatch):
    held = held_side_jobs(monkeypatch)
    registry = engine_registry(smollm2_gguf)
    engine = registry.get()
    stream, long = long_prompt_beside_a_stream(engine)
    wait_for(lambda: held)
    registry.close()  # cancels the side job, joins its thread, frees both contexts
    for generation in (long, stream):
        with pytest.raises(EngineClosed):
            run(generation)
    assert held[0].done.is_set()


def test_a_first_token_sampled_aside_is_the_only_token_of_its_step(smollm2_gguf, alone):
    """The first token, sampled from the side context's logits, is decoded in the next step: decoded in the same
    one, a second token came with it, its logprob record in place of the first's and one token past max_tokens."""
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        stream, long = long_prompt_beside_a_stream(engine, SamplingParams(max_tokens=1, temperature=0, logprobs=3))
        long_done, stream_done = run(long), run(stream)
        stats = engine.stats()
    finally:
        registry.close()
    assert stats["side_prefills"] == 1
    assert long_done.completion_tokens == 1 and records(long_done) == records(alone["long"])[:1]
    assert stats["tokens_generated"] == stream_done.completion_tokens + 1


def test_a_side_state_the_main_context_refuses_is_not_evaluated_aside_again(smollm2_gguf, alone, monkeypatch):
    """A model whose memory writes more than the one stream count patched (the two KV caches of SWA models) has
    every side state refused: after the first, long prompts stay in the main context instead of being evaluated
    twice. Simulated with the side's state unpatched (one stream where the main context has two)."""
    jobs = []
    evaluate, saved_state = side_prefill.SidePrefill._evaluate, side_prefill.SidePrefill._saved_state

    def counted(self, job):
        jobs.append(job)
        return evaluate(self, job)

    def unpatched(self):
        streams, self._streams = self._streams, 1
        try:
            return saved_state(self)
        finally:
            self._streams = streams

    monkeypatch.setattr(side_prefill.SidePrefill, "_evaluate", counted)
    monkeypatch.setattr(side_prefill.SidePrefill, "_saved_state", unpatched)
    registry = engine_registry(smollm2_gguf)
    try:
        engine = registry.get()
        for owner in ("B", "C"):
            stream, long = long_prompt_beside_a_stream(engine, owner=owner)
            assert records(run(long)) == records(alone["long"])
            run(stream)
        assert len(jobs) == 1 and engine.stats()["side_prefills"] == 0
    finally:
        registry.close()


def test_a_side_thread_that_cannot_start_frees_the_context_made_for_it(smollm2_gguf, alone, monkeypatch):
    """No thread to be had (a process limit): the long prompt is evaluated in the main context, and the second
    context created for it is freed, not dropped with its KV cells allocated."""
    freed = []
    close = side_prefill.SidePrefill.close

    start = side_prefill.threading.Thread.start

    def no_side_thread(self):
        if self.name == "side-prefill":
            raise RuntimeError("can't start new thread")
        start(self)

    def counted_close(self):
        freed.append(self.context is not None)
        close(self)

    monkeypatch.setattr(side_prefill.threading.Thread, "start", no_side_thread)
    monkeypatch.setattr(side_prefill.SidePrefill, "close", counted_close)
    assert_evaluated_in_the_main_context(smollm2_gguf, alone)
    assert freed == [True]


def test_the_side_state_is_written_into_its_final_buffer_with_no_copy_in_python(smollm2_gguf):
    """At the hand-over the side's state (tens of MB) was copied four times in Python (bytes, slices, a join, a
    ctypes copy) holding the GIL: every stream and the event loop paused (0.4 s on a Xeon). llama.cpp now writes it
    where it stays and only the header moves; memory Python allocates meanwhile stays a sliver of the state."""
    import struct
    import tracemalloc

    from chat.engine.backends.llama_cpp import _llama, model_params_for

    llama = _llama()
    spec = ModelSpec("smol-state", str(smollm2_gguf))
    model = llama.llama_model_load_from_file(str(smollm2_gguf).encode(), model_params_for(llama, spec, spec.path))
    side = side_prefill.SidePrefill(llama, model, context_length=2048, streams=3, batch_tokens=512,
                                    flash_attn_type=llama.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    try:
        tokens = [100 + (i * 7919) % 30000 for i in range(1024)]
        job = side_prefill.SideJob(seq=None, tokens=tokens, chunks=[(start, 64, 0) for start in range(0, 1024, 64)])
        assert side._create() and side._evaluate(job)
        tracemalloc.start()
        try:
            state, size = side._saved_state()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert size > 10_000_000 and peak < size / 100
        # The main context's three streams: two empty (a cell count of 0 each), then the side's one.
        assert struct.unpack_from("<III", state, side_prefill.STATE_HEADER)[:3] == (3, 0, 0)
    finally:
        side.close()
        llama.llama_model_free(model)


def test_of_two_long_prompts_the_side_context_takes_the_owner_it_served_least_recently(smollm2_gguf, monkeypatch):
    """X's long prompt went aside; then X's second and Y's first arrive in one step, X's admitted first (Y was
    admitted more recently): the side context takes Y's, so that one owner's burst of long prompts does not
    keep another's out of it."""
    from chat.engine.backends.llama_cpp import LlamaCppBackend

    held = held_side_jobs(monkeypatch)
    owners = []
    start = side_prefill.SidePrefill.start
    monkeypatch.setattr(side_prefill.SidePrefill, "start",
                        lambda self, seq, *args: (owners.append(seq.owner), start(self, seq, *args))[1])
    open_gate, paused = threading.Event(), threading.Event()
    open_gate.set()
    step = LlamaCppBackend.step

    def gated_step(self, seqs):
        if not open_gate.is_set():
            paused.set()
            open_gate.wait(30)
        return step(self, seqs)

    monkeypatch.setattr(LlamaCppBackend, "step", gated_step)
    registry = engine_registry(smollm2_gguf, parallel=4)
    try:
        engine = registry.get()
        generated = engine.stats()["tokens_generated"]
        stream = engine.submit(STREAM_PROMPT, SamplingParams(max_tokens=1500, temperature=0), owner="A")
        wait_for(lambda: engine.stats()["tokens_generated"] >= generated + 3)
        first = engine.submit(LONG_PROMPT, LONG_PARAMS, owner="X")
        wait_for(lambda: held)
        first.cancel()
        run(first)
        run(engine.submit("Hello", SamplingParams(max_tokens=1, temperature=0), owner="Y"))
        open_gate.clear()
        wait_for(paused.is_set)
        second_of_x = engine.submit(LONG_PROMPT, LONG_PARAMS, owner="X")
        first_of_y = engine.submit(LONG_PROMPT.replace("sea", "lake"), LONG_PARAMS, owner="Y")
        open_gate.set()
        wait_for(lambda: len(owners) == 2)
        for generation in (second_of_x, first_of_y, stream):
            generation.cancel()
            run(generation)
    finally:
        open_gate.set()
        registry.close()
    assert owners == ["X", "Y"]
