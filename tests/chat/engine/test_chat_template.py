"""Chat prompts rendered with the model's own template, ChatML fallback, and system-role folding."""

import pytest

from chat.engine import InvalidRequest, ModelRegistry, ModelSpec, ModelUnavailable
from chat.engine.chat_template import CHATML_TEMPLATE, ChatTemplate, fold_system_into_first_user

MESSAGES = [
    {"role": "system", "content": "You are Ada."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
]


@pytest.mark.smollm2
def test_smollm2_prompt_uses_its_own_template(smollm2):
    assert smollm2.render_chat(MESSAGES) == (
        "<|im_start|>system\nYou are Ada.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # SmolLM2's template adds its default system prompt when none is given.
    assert smollm2.render_chat([{"role": "user", "content": "Hi!"}], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
    )


@pytest.mark.smollm2
def test_smollm2_chat_markers_tokenize_as_special_tokens(smollm2):
    tokens = smollm2.tokenize("<|im_start|>user\nHi<|im_end|>")
    assert tokens[0] == smollm2.tokenize("<|im_start|>")[0] and len(smollm2.tokenize("<|im_start|>")) == 1
    assert len(smollm2.tokenize("<|im_start|>", special=False)) > 1  # as plain text it is several tokens


def test_file_without_template_falls_back_to_chatml(registry):
    engine = registry.get("tiny-plain")
    assert engine.render_chat(MESSAGES) == ChatTemplate(CHATML_TEMPLATE).render(MESSAGES)
    assert engine.render_chat(MESSAGES).startswith("<|im_start|>system\nYou are Ada.<|im_end|>\n")


def test_template_that_rejects_system_role_gets_it_folded_into_first_user_turn(registry):
    engine = registry.get("tiny-folding")
    assert engine.render_chat(MESSAGES) == (
        "<start_of_turn>user\nYou are Ada.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>assistant\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_other_template_rejections_are_client_errors(registry):
    engine = registry.get("tiny-folding")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        engine.render_chat([{"role": "assistant", "content": "I start."}])


def test_folding_without_a_user_turn_makes_the_system_text_a_user_turn():
    assert fold_system_into_first_user([{"role": "system", "content": "Be brief."}]) == [
        {"role": "user", "content": "Be brief."}
    ]


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"])
def test_malformed_messages_are_rejected(registry, messages):
    with pytest.raises(InvalidRequest):
        registry.get("tiny-plain").render_chat(messages)


def test_template_override_that_does_not_compile_makes_the_model_unavailable(tiny_gguf):
    registry = ModelRegistry([ModelSpec("broken", str(tiny_gguf), chat_template="{% for %}", parallel=1)])
    with pytest.raises(ModelUnavailable, match="chat_template"):
        registry.get()
    assert not registry.is_loaded("broken")
