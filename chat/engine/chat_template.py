"""Rendering chat messages into a prompt with the model's own Jinja2 chat template (as Hugging Face does)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache

from .errors import InvalidRequest
from .prompt import FINAL_MARK, SHARED_MARK, ControlTexts, Prompt, broken, markup_literals

logger = logging.getLogger(__name__)

# Used for GGUF files that carry no tokenizer.chat_template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRejected(Exception):
    """Raised by a template's own `raise_exception(...)` call (e.g. "System role not supported")."""


def _raise_exception(message: str):
    raise TemplateRejected(message)


def _tojson(value, indent=None):
    # Hugging Face's variant: no HTML escaping, non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=1)
def _environment():
    # Imported here: jinja2 is only needed once a model is used, not when the engine is imported.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same settings as transformers' apply_chat_template; sandboxed because templates come from files.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template plus the BOS/EOS texts it may refer to.

    `control_texts`: the vocabulary's control-token texts. Only the template's own markup becomes
    control tokens: every string in the messages and tools is guarded as text (chat/engine/prompt.py). Markup the
    model reads as text (`text_markup`: Llama 2's [INST] and <<SYS>>) is broken up by a word joiner wherever a
    message or tool holds it, as it would otherwise be the very tokens of the template's turns.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", control_texts: Iterable[str] = ()):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.controls = ControlTexts(control_texts)
        self.text_markup = markup_literals(source, self.controls.texts)
        self._template = _environment().from_string(source)  # raises jinja2.TemplateSyntaxError

    @classmethod
    def for_model(cls, source: str | None, *, bos_token: str = "", eos_token: str = "", model: str = "",
                  control_texts: Iterable[str] = ()) -> ChatTemplate:
        """The model's template, or ChatML when it has none or its template does not compile."""
        from jinja2 import TemplateError

        if source:
            try:
                return cls(source, bos_token=bos_token, eos_token=eos_token, control_texts=control_texts)
            except TemplateError:  # a broken template in a downloaded file should not make the model unusable
                logger.warning("model %r: chat template does not compile; using ChatML instead", model, exc_info=True)
        return cls(CHATML_TEMPLATE, bos_token=bos_token, eos_token=eos_token, control_texts=control_texts)

    @property
    def supports_tools(self) -> bool:
        """The template renders a `tools` list itself (Hugging Face's test: it refers to `tools`)."""
        return "tools" in self.source

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, continue_final: bool = False,
               shared_until: tuple[int, int] | None = None) -> Prompt:
        """The prompt, split into markup and text. `tools` (OpenAI function tools) are given to templates
        that support them (see supports_tools). Every string in `messages` and `tools` is text.

        `shared_until` (message index, characters of its content): the site's own content, the same for every
        tenant (a character's system prompt and persona), ends there; the Prompt records where that is in the
        rendered text (its `shared_pieces` and `shared_chars`).

        `continue_final`: the last message (an assistant turn) stays open, so that the model extends its
        text: rendered without a generation prompt, and cut where its content ends (the template's
        end-of-turn markup after it is left out), as transformers' `continue_final_message` does."""
        messages = _validated(messages)
        guarded = self.controls.guard(broken(messages, self.text_markup))
        if shared_until is not None and 0 <= shared_until[0] < len(messages):
            guarded = self._marked_shared(messages, guarded, *shared_until)
        messages = guarded
        if continue_final:
            messages = _marked_final(messages)
            add_generation_prompt = False
        extra = {"tools": self.controls.guard(broken(tools, self.text_markup))} if tools and self.supports_tools else {}
        try:
            rendered = self._render(messages, add_generation_prompt, **extra)
        except TemplateRejected as rejection:
            if not any(m["role"] == "system" for m in messages):
                raise InvalidRequest(f"The model's chat template rejected the messages: {rejection}") from None
            # Templates such as Gemma's or Mistral's refuse a system role: fold it into the first user turn.
            try:
                rendered = self._render(fold_system_into_first_user(messages), add_generation_prompt, **extra)
            except TemplateRejected as rejection:
                raise InvalidRequest(f"The model's chat template rejected the messages: {rejection}") from None
        return self.controls.split(_cut_at_mark(rendered) if continue_final else rendered)

    def _marked_shared(self, messages: list[dict], guarded: list[dict], index: int, chars: int) -> list[dict]:
        """`guarded` with a SHARED_MARK where the site's own content ends: after `chars` characters of message
        `index`'s content (guarded in two parts, so no client text can hold or move the mark)."""
        content = messages[index]["content"]
        chars = max(0, min(chars, len(content)))
        site, rest = broken(content[:chars], self.text_markup), broken(content[chars:], self.text_markup)
        if site + rest != broken(content, self.text_markup):  # markup across the boundary: nothing is shared
            return guarded
        marked = [dict(m) for m in guarded]
        marked[index]["content"] = self.controls.guard(site) + SHARED_MARK + self.controls.guard(rest)
        return marked

    def _render(self, messages: list[dict], add_generation_prompt: bool, **extra) -> str:
        return str(self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        ))


def _marked_final(messages: list[dict]) -> list[dict]:
    """`messages` (guarded: no string of theirs, tools' neither, holds FINAL_MARK) with the mark after the last's
    content: where the final message's content ends in the rendered text of a continued turn."""
    messages = [dict(m) for m in messages]
    if messages[-1]["role"] != "assistant":
        raise InvalidRequest("Only an assistant turn can be continued.")
    messages[-1]["content"] += FINAL_MARK
    return messages


def _cut_at_mark(rendered: str) -> str:
    end = rendered.rfind(FINAL_MARK)
    if end < 0:
        raise InvalidRequest("The model's chat template does not render the reply to continue.")
    return rendered[:end]


def fold_system_into_first_user(messages: list[dict]) -> list[dict]:
    """Move the text of system messages to the front of the first user message."""
    system_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{system_text}\n\n{message['content']}" if message["content"] else system_text
            return rest
    return [{"role": "user", "content": system_text}, *rest]


def _validated(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list.")
    cleaned = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise InvalidRequest("each message must be a dict with string 'role' and 'content'.")
        cleaned.append(dict(message))
    return cleaned
