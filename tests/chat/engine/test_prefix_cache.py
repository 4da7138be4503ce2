"""Prefix reuse: evaluated prompt prefixes are reused (idle KV or saved state) and give the same output as cold."""

import pytest

from chat.engine import ModelRegistry, ModelSpec, SamplingParams
from chat.engine.backends.llama_cpp import LONE_ROW_KV_CELLS, last_chunk_start, resident_reuse, reusable
from chat.engine.chat_template import CHATML_TEMPLATE, ChatTemplate
from chat.engine.prefix_cache import PrefixCache, common_prefix_length
from chat.engine.prompt import Prompt
from tests.factories import chat_prompt

from .conftest import TINY_CONTEXT

GREEDY = SamplingParams(max_tokens=16, temperature=0)
CHARACTER = "you are a pirate who loves the sea and tells long stories about ships and water. " * 3


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix_length([], [1]) == 0


def test_prefix_cache_finds_the_longest_match_and_evicts_least_recently_used():
    cache = PrefixCache(budget_bytes=100)
    cache.put([1, 2, 3], "a", 40)
    cache.put([1, 2, 9, 9], "b", 40)
    entry, length = cache.longest_match([1, 2, 9, 7])
    assert entry.state == "b" and length == 3
    cache.longest_match([1, 2, 3, 4])  # "a" is now the most recently used
    cache.put([7, 7], "c", 40)  # over budget: "b" goes
    assert len(cache) == 2 and cache.total_bytes == 80
    assert cache.longest_match([1, 2, 9])[0].state == "a"
    assert not cache.put([5], "too big", 101)


def test_prefix_cache_drops_entries_that_a_longer_one_extends():
    cache = PrefixCache(budget_bytes=1000)
    cache.put([1, 2], "short", 10)
    cache.put([1, 2, 3], "long", 10)
    assert len(cache) == 1 and cache.covers([1, 2]) and not cache.covers([1, 2, 4])


def test_a_demoted_entry_is_the_first_to_go():
    cache = PrefixCache(budget_bytes=100)
    cache.put([1, 2, 3], "prompt", 40)
    cache.put([4, 5, 6, 7], "resumed sequence", 40, exact=2)
    cache.demote([4, 5, 6, 7])
    cache.demote([8])  # not there: nothing happens
    cache.put([9], "new prompt", 40)  # over budget: the demoted entry goes, not the older prompt
    assert [entry.state for entry in (cache.longest_match([1, 2, 3])[0], cache.longest_match([9])[0])] == [
        "prompt", "new prompt"]
    assert cache.longest_match([4, 5], exact_only=False) == (None, 0)


def test_an_entry_put_again_counts_its_bytes_once():
    cache = PrefixCache(budget_bytes=1000)
    for exact in (None, 64, 0):  # a suspended sequence's state, less reusable, stored over the same tokens
        cache.put((1, 2, 3), "state", 400, exact=exact)
    assert len(cache) == 1 and cache.total_bytes == 400


def test_reused_prefix_gives_the_same_output_as_cold(registry):
    engine = registry.get("tiny-prefix")  # one slot, so other prompts push earlier ones into the saved-state cache
    prompt = chat_prompt(engine, CHARACTER, "who are you")
    cold = engine.generate(prompt, GREEDY)

    # Another character takes the only slot; the first one's state is saved on the way out.
    engine.generate(chat_prompt(engine, "you are a city clerk. " * 20, "hello"), GREEDY)
    restored = engine.generate(chat_prompt(engine, CHARACTER, "who are you"), GREEDY)
    assert restored.text == cold.text
    assert restored.cached_prompt_tokens > len(engine.tokenize(CHARACTER)) // 2
    assert engine.stats()["prefix_cache_entries"] >= 1

    # Same character, next question: continues from the slot's own KV cells.
    follow_up = chat_prompt(engine, CHARACTER, "where is paris")
    resident = engine.generate(follow_up, GREEDY)
    assert resident.cached_prompt_tokens > len(engine.tokenize(CHARACTER)) // 2
    assert resident.text == cold_output(engine, follow_up)


def cold_output(engine, prompt: str) -> str:
    registry = ModelRegistry([ModelSpec("cold", engine.spec.path, context_length=engine.context_length, parallel=1, prefix_cache_mb=0)])
    try:
        completion = registry.get().generate(prompt, GREEDY)
        assert completion.cached_prompt_tokens == 0
        return completion.text
    finally:
        registry.close()


def test_prefix_hits_and_misses_are_counted(registry):
    engine = registry.get("tiny-prefix")
    before = engine.stats()
    prompt = chat_prompt(engine, CHARACTER + " extra", "hi")
    engine.generate(prompt, GREEDY)
    engine.generate(prompt, GREEDY)
    after = engine.stats()
    assert after["prefix_hits"] > before["prefix_hits"]
    assert after["cached_prompt_tokens"] > before["cached_prompt_tokens"]


def test_a_slot_gives_a_short_prompt_any_prefix_but_a_long_one_whole_chunks_only():
    # Short (ends within 256 cells, last chunk under 64 rows): any prefix up to the last token, when the slot's
    # aligned part ends where the prompt's last chunk starts (row-by-row cells after it, as a cold prompt's).
    assert resident_reuse(36, common=20, exact=0) == 20
    assert resident_reuse(36, common=36, exact=0) == 35  # the last token is evaluated: its logits are needed
    assert resident_reuse(100, common=90, exact=64) == 90
    # The slot's cells at 64.. were tiled (a whole chunk) where the cold prompt's last chunk goes row by row.
    assert resident_reuse(100, common=90, exact=128) == 64
    # The slot's cells before 64 were row by row where the cold prompt's first chunk is tiled.
    assert resident_reuse(100, common=90, exact=0) == 0
    # Long, or a last chunk of 64 rows (tiled): whole chunks before the last one only.
    assert resident_reuse(300, common=290, exact=256) == 256
    assert resident_reuse(128, common=120, exact=64) == 64
    assert resident_reuse(36, common=10, exact=0) == 10


@pytest.mark.parametrize("character", ["you are a pirate.", CHARACTER])  # under and over one 64-token chunk
@pytest.mark.parametrize("site_system", [False, True])
def test_another_owners_cells_give_only_the_sites_own_content_in_whole_chunks(tiny_gguf, character, site_system):
    """Reuse shows in usage.cached_tokens and in the time to the first token: by the token, a tenant could find
    out what another's prompt says one guessed token at a time, and by the chunk a chunk at a time (one unknown
    field in it, guessed field by field). Across owners only whole chunks of the site's own content (a
    character's system message) are reused; a client's own system message and question, never."""
    registry = ModelRegistry([ModelSpec("owners", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=1,
                                        prefix_cache_mb=0)])
    try:
        engine = registry.get()
        prompt = chat_prompt(engine, character, "my locker code is 4711", site_system=site_system)
        length = len(engine.prompt_tokens(prompt))
        site = chat_prompt(engine, character, "my locker code is 4711", site_system=True)
        system_end = engine._tokens_and_shared(site)[1]  # where the site's content ends
        assert length <= LONE_ROW_KV_CELLS
        engine.generate(prompt, GREEDY, owner="user:1")
        guessed = engine.generate(prompt, GREEDY, owner="user:2")  # the only slot holds user:1's prompt
        again = engine.generate(prompt, GREEDY, owner="user:2")  # now its own
    finally:
        registry.close()
    site_chunks = reusable(min(system_end, last_chunk_start(length)))
    assert guessed.cached_prompt_tokens == (site_chunks if site_system else 0)
    assert again.cached_prompt_tokens == length - 1
    assert (site_chunks > 0) == (character == CHARACTER)  # the chunk rule applies to the site's part too


@pytest.mark.parametrize("site_system", [False, True])
def test_a_saved_state_gives_another_owner_only_the_sites_own_content(tiny_gguf, site_system):
    registry = ModelRegistry([ModelSpec("saved", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=1,
                                        prefix_cache_mb=64)])
    try:
        engine = registry.get()
        prompt = chat_prompt(engine, CHARACTER, "my locker code is 4711 " * 4, site_system=site_system)
        site_end = engine._tokens_and_shared(chat_prompt(engine, CHARACTER, "", site_system=True))[1]
        engine.generate(prompt, GREEDY, owner="user:1")
        engine.generate(chat_prompt(engine, "you are a city clerk. " * 20, "hello"), GREEDY, owner="user:3")
        assert engine.stats()["prefix_cache_entries"] >= 1  # user:1's state went to the cache with its slot
        guessed = engine.generate(prompt, GREEDY, owner="user:2")
        engine.generate(chat_prompt(engine, "you are a city clerk. " * 20, "hello"), GREEDY, owner="user:3")
        own = engine.generate(prompt, GREEDY, owner="user:1")
    finally:
        registry.close()
    assert guessed.cached_prompt_tokens == (reusable(site_end) if site_system else 0) and reusable(site_end) > 0
    assert own.cached_prompt_tokens == last_chunk_start(own.prompt_tokens) > reusable(site_end)


def test_the_cache_gives_another_owner_only_what_both_hold_of_the_sites_content():
    cache = PrefixCache(budget_bytes=1000)
    cache.put(range(10), "user:1's conversation", 10, owner="user:1", shared=4)
    assert cache.longest_match(range(12), owner="user:1") == (cache.longest_match(range(12), owner="user:1")[0], 10)
    assert cache.longest_match(range(12), owner="user:2", shared=6)[1] == 4
    assert cache.longest_match(range(12), owner="user:2", shared=3)[1] == 3
    assert cache.longest_match(range(12), owner="user:2") == (None, 0)
    assert cache.longest_match(range(10), owner="user:2", shared=10, exact_only=False)[1] == 4
    # Another owner's state of the same tokens is its own entry: it neither replaces nor drops user:1's.
    cache.put(range(10), "user:2's", 10, owner="user:2", shared=4)
    cache.put(range(12), "user:2's longer", 10, owner="user:2", shared=4)
    assert cache.longest_match(range(10), owner="user:1")[0].state == "user:1's conversation"
    assert not cache.covers(range(12), owner="user:1") and cache.covers(range(12), owner="user:2")


def test_a_prompt_knows_where_the_sites_own_content_ends():
    template = ChatTemplate(CHATML_TEMPLATE, control_texts=["<|im_start|>", "<|im_end|>"])
    messages = [{"role": "system", "content": "You are Mara. Sam is <|im_end|> aboard."},
                {"role": "user", "content": "hi \ufdd4 there"}]
    plain = template.render(messages)
    whole, part = (template.render(messages, shared_until=(0, chars)) for chars in (39, 13))
    assert whole.pieces == part.pieces == plain.pieces and str(whole) == str(plain)  # the mark changes nothing else
    assert (plain.shared_pieces, plain.shared_chars) == (0, 0)
    assert whole.shared_pieces == 2 and whole.pieces[1].text.endswith("<|im_end|> aboard.")  # client text is text
    assert part.shared_pieces == 1 and part.pieces[1].text[:part.shared_chars] == "system\nYou are Mara."
    assert "\ufdd4" not in whole and "\ufffd" in whole  # a client's mark is text, not the boundary
    assert template.render([{"role": "user", "content": "x\ufdd4"}]).shared_pieces == 0
    folded = ChatTemplate("{{ messages[0]['content'] + messages[1]['content'] }}").render(messages, shared_until=(0, 12))
    assert (folded.shared_pieces, folded.pieces[0].text[:folded.shared_chars]) == (0, "You are Mara")


def test_the_engine_counts_only_tokens_that_spell_the_sites_content(registry):
    engine = registry.get("tiny-prefix")
    site = "you are a pirate who loves the sea"
    messages = [{"role": "system", "content": site}, {"role": "user", "content": "hi"}]
    tokens, whole_shared = engine._tokens_and_shared(engine.render_chat(messages, shared_until=(0, len(site))))
    part = engine.render_chat(messages, shared_until=(0, 20))
    part_tokens, part_shared = engine._tokens_and_shared(part)
    assert tokens == part_tokens == engine.prompt_tokens(engine.render_chat(messages))
    assert whole_shared == len(engine.prompt_tokens(Prompt(part.pieces[:2])))  # through the system message's text
    text_start = len(engine.prompt_tokens(Prompt(part.pieces[:1])))  # BOS and <|im_start|>
    assert text_start < part_shared < whole_shared
    assert ("system\n" + site[:20]).startswith(engine.detokenize(tokens[text_start:part_shared]))
    assert engine._tokens_and_shared(engine.render_chat(messages))[1] == 0


@pytest.mark.parametrize("character", ["you are a pirate.", CHARACTER])  # under and over one 64-token chunk
def test_a_running_prompt_of_another_owner_is_neither_forked_nor_shared(tiny_gguf, character):
    """The same prompt admitted twice in one step is evaluated once and forked (n choices), and the fork reports
    the whole prompt as cached: only within one owner. Another owner's identical guess is evaluated on its own
    and reuses nothing of the first one's (its system message is the client's own)."""
    registry = ModelRegistry([ModelSpec("twins", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=4,
                                        prefix_cache_mb=0)])
    try:
        engine = registry.get()
        prompt = chat_prompt(engine, character, "my locker code is 9035")
        length = len(engine.prompt_tokens(prompt))

        def pair(first_owner: str, second_owner: str):
            before = engine.stats()["forked_sequences"]
            with engine.admission_held():
                generations = [engine.submit(prompt, GREEDY, owner=first_owner),
                               engine.submit(prompt, GREEDY, owner=second_owner)]
            replies = [("".join(g), g.result)[1] for g in generations]
            return replies[1].cached_prompt_tokens, engine.stats()["forked_sequences"] - before

        guessed, forked_across = pair("user:1", "user:2")
        own, forked_within = pair("user:3", "user:3")
    finally:
        registry.close()
    assert (forked_within, own) == (1, length)
    assert forked_across == 0
    assert guessed == 0


@pytest.mark.smollm2
def test_smollm2_short_prompts_reuse_a_shared_system_message_and_keep_the_cold_logprobs(smollm2_gguf):
    """Prompts under 256 tokens take what a slot holds of them at any length (a 20-token system message, a
    reply decoded token by token), also beside other decoding sequences; every logprob equals the cold one."""
    sampling = SamplingParams(max_tokens=16, temperature=0, logprobs=5)  # the follow-up stays under 64 tokens

    def run(prompts, company: bool = False, parallel: int = 4) -> list:
        registry = ModelRegistry([ModelSpec("short", str(smollm2_gguf), context_length=1024, parallel=parallel,
                                            prefix_cache_mb=0)])
        try:
            engine, replies = registry.get(), []
            for prompt in prompts:
                others = [engine.submit(chat_prompt(engine, f"You are person {i}.", "Tell a long story."),
                                        SamplingParams(max_tokens=64, temperature=0)) for i in range(2 if company else 0)]
                replies.append(engine.generate(prompt(replies), sampling))
                for other in others:
                    "".join(other)
            return replies
        finally:
            registry.close()

    def first(_):
        return "<|im_start|>system\nYou are a helpful assistant. Be brief, kind and clear.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    def other_question(_):
        return "<|im_start|>system\nYou are a helpful assistant. Be brief, kind and clear.<|im_end|>\n<|im_start|>user\nTell me about trains.<|im_end|>\n<|im_start|>assistant\n"

    def follow_up(replies):
        return first(replies) + replies[0].text + "<|im_end|>\n<|im_start|>user\nAnd ships?<|im_end|>\n<|im_start|>assistant\n"

    warm = run([first, first, follow_up, other_question], company=True)
    assert all(reply.prompt_tokens <= LONE_ROW_KV_CELLS for reply in warm)
    assert warm[1].cached_prompt_tokens == warm[1].prompt_tokens - 1  # the same prompt: one row evaluated
    assert warm[2].cached_prompt_tokens > warm[0].prompt_tokens  # into the decoded reply
    assert 16 <= warm[3].cached_prompt_tokens < warm[3].prompt_tokens - 4  # the system message, not the question
    cold = [run([prompt])[0] for prompt in (first, lambda _: follow_up(warm), other_question)]
    assert all(reply.cached_prompt_tokens == 0 for reply in cold)
    for got, expected in zip(warm[1:], cold):
        assert got.text == expected.text
        assert [(r.logprob, [t.logprob for t in r.top]) for r in got.logprobs] == [
            (r.logprob, [t.logprob for t in r.top]) for r in expected.logprobs]


@pytest.mark.smollm2
def test_smollm2_reused_prefix_gives_the_same_output_as_cold(smollm2, smollm2_gguf):
    system = "You are Captain Mara, a retired sailor who answers kindly and briefly. " * 8
    prompt = chat_prompt(smollm2, system, "What do you like most about the sea?")
    cold = smollm2.generate(prompt, GREEDY)
    warm = smollm2.generate(prompt, GREEDY)
    assert warm.cached_prompt_tokens >= last_chunk_start(warm.prompt_tokens) > 0  # all but the last chunk
    assert warm.text == cold.text


def generated_cold(model_path, prompt: str, sampling: SamplingParams):
    """The prompt generated by a fresh engine with no prefix cache: nothing of it reused."""
    registry = ModelRegistry([ModelSpec("cold", str(model_path), context_length=1024, parallel=2, prefix_cache_mb=0)])
    try:
        return registry.get().generate(prompt, sampling)
    finally:
        registry.close()


@pytest.mark.smollm2
def test_smollm2_with_flash_attention_a_follow_up_from_a_warm_slot_has_the_cold_prompts_logprobs(smollm2_gguf):
    """Flash attention is on and the first prompt's reply was decoded token by token: whole aligned chunks are
    reused, and within LONE_ROW_KV_CELLS the row-by-row cells after them (the last chunk's, the reply's), so the
    follow-up's every logprob equals that of the same prompt evaluated cold."""
    spec = ModelSpec("warm", str(smollm2_gguf), context_length=1024, parallel=2)
    assert spec.flash_attention
    sampling = SamplingParams(max_tokens=24, temperature=0, logprobs=5)
    system = "You are Captain Mara, a retired sailor who answers kindly and briefly. " * 12
    registry = ModelRegistry([spec])
    try:
        engine = registry.get()
        first = chat_prompt(engine, system, "What do you like most about the sea?")
        reply = engine.generate(first, sampling)
        first_length = len(engine.prompt_tokens(first))
        follow_up = first + reply.text + "<|im_end|>\n<|im_start|>user\nAnd ships?<|im_end|>\n<|im_start|>assistant\n"
        warm = engine.generate(follow_up, sampling)
    finally:
        registry.close()
    cold = generated_cold(smollm2_gguf, follow_up, sampling)
    assert warm.prompt_tokens <= LONE_ROW_KV_CELLS and cold.cached_prompt_tokens == 0
    # Past the aligned chunks: into the first prompt's last chunk and its reply.
    assert warm.cached_prompt_tokens > first_length > last_chunk_start(warm.prompt_tokens)
    assert warm.text == cold.text
    assert [(r.logprob, [t.logprob for t in r.top]) for r in warm.logprobs] == [
        (r.logprob, [t.logprob for t in r.top]) for r in cold.logprobs]


@pytest.mark.smollm2
def test_smollm2_a_padded_last_chunk_leaves_no_trace(smollm2_gguf, chunk_rules):
    """A last, partial chunk past 256 cells is padded to 64 rows with throwaway tokens: none stays in the KV
    cache, the reply follows the same prompt evaluated without flash attention (other kernels: close, not
    bit-equal), and a warm follow-up still has the cold prompt's exact logprobs."""
    sampling = SamplingParams(max_tokens=24, temperature=0, logprobs=1)
    system = ("You are Captain Mara, a retired sailor who answers kindly and briefly. " * 23
              + "She has sailed every ocean twice. ")

    def first(engine):
        prompt = chat_prompt(engine, system, "What do you like most about the sea?")
        from chat.engine.backends.llama_cpp import ROW_BY_ROW_TAIL

        length = len(engine.prompt_tokens(prompt))
        assert length > 256 and length % 64 >= ROW_BY_ROW_TAIL, length  # so that the last chunk is padded
        return prompt

    def follow_up(engine):
        return first(engine) + padded.text + "<|im_end|>\n<|im_start|>user\nAnd ships?<|im_end|>\n<|im_start|>assistant\n"

    def run(prompts, flash_attention: bool = True, probe: bool = True) -> list:
        registry = ModelRegistry([ModelSpec("pad", str(smollm2_gguf), context_length=1024, parallel=2,
                                            flash_attention=flash_attention)])
        try:
            engine = registry.get()
            backend, replies = engine._backend, []
            for prompt in prompts:
                if probe:
                    engine.generate(prompt(engine), SamplingParams(max_tokens=1, temperature=0))
                for slot in backend._slots:  # the prompt's cells, and no throwaway one after them
                    assert backend._llama.llama_memory_seq_pos_max(backend._memory, slot.seq_id) == len(slot.kv_tokens) - 1
                replies.append(engine.generate(prompt(engine), sampling))
            return replies
        finally:
            registry.close()

    (padded,) = run([first])
    (plain,) = run([first], flash_attention=False)
    agreed = 0  # the kernels differ, so near-tied tokens may flip: compare while both replies agree
    while agreed < len(plain.logprobs) and padded.logprobs[agreed].token == plain.logprobs[agreed].token:
        agreed += 1
    # A cell left behind would garble the reply from its second token (the cells checked above are the direct
    # test). Past the first few tokens the kernels' rounding flips near ties ("it's my home" / "it's a place").
    assert agreed >= 4, (padded.text, plain.text)
    assert all(abs(a.logprob - b.logprob) < 0.3 for a, b in zip(padded.logprobs[:agreed], plain.logprobs))

    _, warm = run([first, follow_up])
    (cold,) = run([follow_up], probe=False)
    assert warm.cached_prompt_tokens >= 256 and cold.cached_prompt_tokens == 0
    assert [r.logprob for r in warm.logprobs] == [r.logprob for r in cold.logprobs]


@pytest.mark.smollm2
def test_smollm2_prompt_chunks_share_calls_and_keep_their_logits(smollm2_gguf, monkeypatch):
    """Whole 64-token chunks of one prompt, and of several prompts, go into one llama_decode of up to 512 rows
    (flash attention's tiled path computes a row the same in any such call); each prompt's logprobs equal those
    of its chunks evaluated one call each."""
    from chat.engine.backends import llama_cpp as backend_module

    sampling = SamplingParams(max_tokens=6, temperature=0, logprobs=2)
    long_system = "You are Captain Mara, a retired sailor who answers kindly and briefly. " * 50
    short_system = "You are a gardener who grows roses and talks about soil and rain. " * 20

    def run(prompts_of, *, one_chunk_per_call: bool) -> tuple[list, list[list[int]]]:
        registry = ModelRegistry([ModelSpec("calls", str(smollm2_gguf), context_length=1024, parallel=2,
                                            prefix_cache_mb=0)])
        calls = []
        try:
            engine = registry.get()
            backend = engine._backend
            decode = backend._llama.llama_decode

            def recording_decode(context, batch):
                calls.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
                return decode(context, batch)

            monkeypatch.setattr(backend._llama, "llama_decode", recording_decode)
            if one_chunk_per_call:  # the calls as they were before chunks shared them
                monkeypatch.setattr(backend_module, "BATCH_TOKENS", backend_module.PROMPT_CHUNK)
            prompts = prompts_of(engine)
            assert len(engine.prompt_tokens(prompts[0])) > backend_module.BATCH_TOKENS
            with engine.admission_held():
                generations = [engine.submit(prompt, sampling) for prompt in prompts]
            replies = [("".join(g), g.result)[1] for g in generations]
            return [[(r.logprob, [t.logprob for t in r.top]) for r in reply.logprobs] for reply in replies], calls
        finally:
            monkeypatch.undo()
            registry.close()

    def both(engine):
        return [chat_prompt(engine, long_system, "What do you like most about the sea?"),
                chat_prompt(engine, short_system, "When do roses bloom?")]

    merged, merged_calls = run(both, one_chunk_per_call=False)
    separate, separate_calls = run(both, one_chunk_per_call=True)
    alone, _ = run(lambda engine: both(engine)[:1], one_chunk_per_call=False)
    assert max(len(call) for call in merged_calls) == 512  # one prompt's 8 chunks in one call...
    assert any(len(set(call)) == 2 and len(call) > 2 for call in merged_calls)  # ...and both prompts' chunks in one
    assert max(len(call) for call in separate_calls) == 64
    assert merged == separate
    assert merged[0] == alone[0]


@pytest.mark.smollm2
def test_smollm2_a_short_last_chunk_goes_row_by_row_alone_and_keeps_its_logits(smollm2_gguf, chunk_rules, monkeypatch):
    """A last chunk of fewer than ROW_BY_ROW_TAIL rows past 256 cells is evaluated row by row in a call of its own
    (cheaper than padding it to 64 rows), cold or warm alike: the warm prompt has the cold one's exact logprobs.
    Its 30 rows: a tail that 16 rows, the limit before, padded."""
    from chat.engine.backends.llama_cpp import ROW_BY_ROW_TAIL

    sampling = SamplingParams(max_tokens=6, temperature=0, logprobs=2)
    system = "You are Captain Mara, a retired sailor who answers kindly and briefly. " * 26

    def run(times: int) -> tuple[list, list[int], int]:
        registry = ModelRegistry([ModelSpec("tail", str(smollm2_gguf), context_length=1024, parallel=1,
                                            prefix_cache_mb=0)])
        calls = []
        try:
            engine = registry.get()
            prompt = chat_prompt(engine, system, "What do you like most about the sea?")
            length = len(engine.prompt_tokens(prompt))
            assert length > LONE_ROW_KV_CELLS and 16 <= length % 64 < ROW_BY_ROW_TAIL
            decode = engine._backend._llama.llama_decode
            monkeypatch.setattr(engine._backend._llama, "llama_decode",
                                lambda context, batch: (calls.append(batch.n_tokens), decode(context, batch))[1])
            replies = [engine.generate(prompt, sampling) for _ in range(times)]
            logprobs = [[(r.logprob, [t.logprob for t in r.top]) for r in reply.logprobs] for reply in replies]
            return logprobs, calls, length % 64
        finally:
            monkeypatch.undo()
            registry.close()

    (cold,), _, _ = run(1)
    (first, warm), calls, tail = run(2)
    assert first == cold and warm == cold
    assert calls.count(tail) == 2 and 64 not in calls[calls.index(tail):], calls  # its own call, cold then warm


def test_one_owners_flood_evicts_its_own_entries_not_another_owners():
    cache = PrefixCache(budget_bytes=100)
    cache.put([1, 2, 3], "user:1's", 30, owner="user:1")
    for number in range(5):  # user:2's long prompts, one after another
        cache.put([50 + number, 2, 3], f"user:2's {number}", 30, owner="user:2")
    assert cache.longest_match([1, 2, 3, 4], owner="user:1")[0].state == "user:1's"
    assert cache.total_bytes <= 100
    assert cache.longest_match([54, 2, 3, 4], owner="user:2")[0] is not None  # its newest stays


def test_fair_victims_take_the_heaviest_owners_oldest_entries_first():
    from chat.engine.prefix_cache import fair_victims

    entries = [("a", 10, "a1"), ("b", 30, "b1"), ("a", 10, "a2"), ("b", 30, "b2"), ("c", 5, "c1")]
    assert fair_victims(entries, 85) == []
    assert fair_victims(entries, 60) == ["b1"]
    assert fair_victims(entries, 30) == ["b1", "b2"]
    assert fair_victims(entries, 20) == ["b1", "b2", "a1"]


def test_the_entry_just_stored_is_kept_and_a_demoted_one_goes_first_whoever_holds_it():
    cache = PrefixCache(budget_bytes=100)
    cache.put([1], "a's", 60, owner="a")
    assert cache.put([2], "b's one long prompt", 70, owner="b")  # b is now the heaviest owner: its entry stays
    assert cache.longest_match([2, 3], owner="b")[0] is not None and cache.total_bytes <= 100
    cache.put([3], "c's", 10, owner="c")
    cache.put([4], "c's resumed state", 10, owner="c")
    cache.demote([4], owner="c")
    cache.put([5], "b's second", 15, owner="b")  # over budget: c's demoted entry goes before anything of b's
    assert cache.longest_match([4, 9], owner="c")[0] is None
    assert cache.longest_match([5, 9], owner="b")[0] is not None


def test_the_entry_just_stored_still_counts_toward_its_owners_bytes():
    cache = PrefixCache(budget_bytes=100)
    cache.put([9], "b's", 40, owner="b")
    cache.put([1], "a's first", 10, owner="a")
    cache.put([2], "a's second", 60, owner="a")  # a holds 70: its own older entry goes, not b's
    assert cache.longest_match([9, 9], owner="b")[0] is not None
    assert cache.longest_match([1, 9], owner="a")[0] is None and cache.longest_match([2, 9], owner="a")[0] is not None


@pytest.mark.smollm2
def test_smollm2_with_every_row_exact_a_follow_up_reuses_the_first_turn_to_the_token(smollm2_gguf):
    """The rows patch: a row computes the same in any call. So a follow-up past 256 cells reuses what the first
    turn left in its slot to the last token it shares (the prompt and the reply's decoded tokens, not whole
    64-token chunks), and its every logprob equals the same prompt's evaluated cold."""
    sampling = SamplingParams(max_tokens=24, temperature=0, logprobs=3)
    system = ("You are Captain Mara, a retired sailor who answers kindly and briefly. " * 23
              + "She has sailed every ocean twice. ")
    registry = ModelRegistry([ModelSpec("turns", str(smollm2_gguf), context_length=1024, parallel=2)])
    try:
        engine = registry.get()
        assert engine._backend._rows_exact and engine._backend._granularity == 1
        first = chat_prompt(engine, system, "What do you like most about the sea?")
        reply = engine.generate(first, sampling)
        follow_up = first + reply.text + "<|im_end|>\n<|im_start|>user\nAnd ships?<|im_end|>\n<|im_start|>assistant\n"
        tokens, first_length = engine.prompt_tokens(follow_up), len(engine.prompt_tokens(first))
        held = max(common_prefix_length(slot.kv_tokens, tokens) for slot in engine._backend._slots)
        warm = engine.generate(follow_up, sampling)
    finally:
        registry.close()
    cold = generated_cold(smollm2_gguf, follow_up, sampling)
    assert first_length > LONE_ROW_KV_CELLS and cold.cached_prompt_tokens == 0
    assert held > first_length + len(reply.logprobs) // 2  # the slot holds the reply's tokens too
    assert warm.cached_prompt_tokens == min(held, len(tokens) - 1)  # all of it, not whole chunks
    assert [(r.logprob, [t.logprob for t in r.top]) for r in warm.logprobs] == [
        (r.logprob, [t.logprob for t in r.top]) for r in cold.logprobs]
