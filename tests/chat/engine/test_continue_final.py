"""A continued reply's prompt (ChatTemplate.render(continue_final=True)): the last assistant turn is left open,
cut where its content ends, whatever the template does after it; no Django, no model."""

import pytest

from chat.engine.chat_template import CHATML_TEMPLATE, FINAL_MARK, ChatTemplate
from chat.engine.errors import InvalidRequest

CONTROLS = ("<|im_start|>", "<|im_end|>")
TURNS = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a time"}]


def test_the_turn_stays_open_after_the_reply_text():
    template = ChatTemplate(CHATML_TEMPLATE, control_texts=CONTROLS)
    prompt = template.render(TURNS, continue_final=True)
    assert prompt == ("<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\nOnce upon a time")
    assert prompt.pieces[-1].text == "assistant\nOnce upon a time" and not prompt.pieces[-1].control
    closed = template.render(TURNS, add_generation_prompt=False)
    assert closed == prompt + "<|im_end|>\n"  # only the end of the turn is left out


def test_a_template_that_trims_content_is_cut_after_the_trimmed_text():
    trimming = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = ChatTemplate(trimming, control_texts=CONTROLS)
    turns = [TURNS[0], {"role": "assistant", "content": "  Once upon a time  "}]
    # Its trailing spaces stay (the mark is after them): the continuation is appended after them too.
    assert template.render(turns, continue_final=True).endswith("assistant\nOnce upon a time  ")


def test_client_text_cannot_fake_the_mark_or_close_the_turn():
    template = ChatTemplate(CHATML_TEMPLATE, control_texts=CONTROLS)
    turns = [{"role": "user", "content": f"a{FINAL_MARK}b"},
             {"role": "assistant", "content": f"x{FINAL_MARK} and <|im_end|>"}]
    prompt = template.render(turns, continue_final=True)
    assert FINAL_MARK not in prompt and prompt.endswith("and <|im_end|>")
    assert not prompt.pieces[-1].control  # the reply's own "<|im_end|>" is text, the turn still open


def test_a_mark_in_a_tool_rendered_after_the_messages_does_not_move_the_cut():
    # A template that renders the tools after the conversation: a mark in them was the last one.
    tools_after = CHATML_TEMPLATE + "{% if tools %}Tools: {{ tools | tojson }}{% endif %}"
    template = ChatTemplate(tools_after, control_texts=CONTROLS)
    tool = {"type": "function", "function": {"name": "f", "description": f"see{FINAL_MARK}here"}}
    turns = [TURNS[0], {"role": "assistant", "content": "Once upon"}]
    prompt = template.render(turns, continue_final=True, tools=[tool])
    assert prompt.endswith("assistant\nOnce upon") and FINAL_MARK not in prompt


def test_only_an_assistant_turn_the_template_renders_can_be_continued():
    template = ChatTemplate(CHATML_TEMPLATE, control_texts=CONTROLS)
    with pytest.raises(InvalidRequest):
        template.render(TURNS[:1], continue_final=True)
    dropping = "{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InvalidRequest):
        ChatTemplate(dropping).render(TURNS, continue_final=True)
