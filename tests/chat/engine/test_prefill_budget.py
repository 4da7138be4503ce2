"""The prefill budget's arithmetic, on measured step times that noise can make odd."""

from chat.engine.prefill_budget import PrefillBudget


def test_a_step_faster_than_a_decode_only_step_does_not_make_prompt_tokens_free():
    budget = PrefillBudget(target_seconds=0.2, batch_tokens=512)
    budget.observe(0.050, decoding=4, prompt_tokens=0)  # decode-only steps: 50 ms
    budget.observe(0.040, decoding=4, prompt_tokens=64)  # a chunk beside them, yet faster (noise): 0 s a token
    allowed = budget.prompt_tokens(4)  # divided by that average: ZeroDivisionError failed every running sequence
    assert 0 <= allowed <= 512 - 4


def test_the_budget_allows_what_fits_in_the_target():
    budget = PrefillBudget(target_seconds=0.2, batch_tokens=512)
    assert budget.prompt_tokens(4) == 0  # speed unknown: only the per-prompt minimum
    budget.observe(0.050, decoding=4, prompt_tokens=0)
    budget.observe(0.050 + 64 * 0.001, decoding=4, prompt_tokens=64)  # 1 ms a prompt token
    assert budget.prompt_tokens(4) == 150  # (200 - 50) ms at 1 ms a token
    assert budget.prompt_tokens(0) == 512  # nothing decodes: all the room
