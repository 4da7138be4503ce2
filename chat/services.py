"""Chat business logic: turn a validated request into a prompt, run it, store the exchange.

Views call `chat_request_prepare` (which may raise ApiError or engine errors before anything is
generated), then either `chat_completion_run` (blocking) or the streaming path in
chat/streaming.py, and both end in `chat_exchange_store`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction

from characters.models import Character
from chat.engine import Completion, SamplingParams
from scenarios.models import Scenario

from .errors import ApiError, NotFound
from .grammars import grammar_for_response_format
from .metrics import record_generation
from .inference import get_engine
from .logprobs import LegacyLogprobs, chat_logprobs, requested_logprobs
from .models import Conversation, Message
from .prompting import prompt_compose, prompt_greetings
from .prompting.tools import tools_system_text, turns_with_tool_text
from .response_cache import BYPASS, cached_completion, cached_request, remember_completion, request_cache_key
from .selectors import character_get_active, conversation_get_owned
from .tool_calls import tool_finish_reason, tool_reply
from .tool_grammar import tool_call_grammar
from .tools import ToolRequest

logger = logging.getLogger("llmsite.chat")

CLIENT_TURN_ROLES = ("user", "assistant")
CLIENT_SYSTEM_ROLES = ("system", "developer")
DEFAULT_USER_NAME = "User"
USER_NAME_MAX = 100  # Conversation.user_name


@dataclass
class GenerationTiming:
    """When a live generation started, produced its first text, and ended (perf_counter seconds)."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: float | None = None

    def saw_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def finish(self, *, model: str, completion: Completion) -> None:
        self.finished = time.perf_counter()
        record_generation(model=model, completion=completion, started=self.started,
                          first_token_at=self.first_token_at, finished=self.finished)


@dataclass
class ChatPlan:
    """Everything decided before generation starts."""

    engine: object
    prompt: object                      # chat.prompting.ComposedPrompt
    params: SamplingParams
    character: Character | None
    conversation: Conversation | None
    new_turns: list[dict]               # client turns to store with the reply
    store: bool
    user: object
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    shorthand: bool = False
    user_name: str = "User"                  # {{user}}; stored with a new conversation
    cache_status: str = BYPASS
    cache_allowed: bool = True               # False: the client sent Cache-Control: no-cache
    request_key: str | None = None           # the fast-path cache key, when the request qualifies
    timing: GenerationTiming | None = None   # set when generated live (not from the cache)
    completion: Completion | None = None     # set when finished
    tools: ToolRequest | None = None         # the request's tools; the reply is read for calls when it may call

    @property
    def model_name(self) -> str:
        return self.engine.spec.name


def chat_request_prepare(*, user, data: dict, greet: bool = False, user_name: str = "") -> ChatPlan:
    """Resolve character, conversation, model and sampling, and compose the prompt.

    `greet`: a new conversation starts with the character's greeting as its first message (the
    chat page and WebSocket show it); the request's `greeting` picks which one (0 = the main
    greeting, 1.. = the alternates) and also makes an API request start with it.
    `user_name`: what {{user}} becomes when the request names no one (the page's logged-in user).
    """
    conversation = None
    if data.get("conversation"):
        conversation = conversation_get_owned(user=user, conversation_id=data["conversation"])
    character = _character_for(data, conversation)

    client_messages = data["messages"]
    client_system = "\n\n".join(m["content"] for m in client_messages if m["role"] in CLIENT_SYSTEM_ROLES
                                and m["content"].strip())
    # Tool calls and results of the history become text turns (chat/prompting/tools.py).
    client_turns = turns_with_tool_text(client_messages)
    if conversation is not None:
        # The stored history is authoritative: only the request's last user message is new.
        history = [{"role": m.role, "content": m.content}
                   for m in conversation.messages.filter(role__in=CLIENT_TURN_ROLES).order_by("id")]
        new_turns = [client_turns[-1]]
        user_name = conversation.user_name
    else:
        user_name = user_name_for(data, fallback=user_name)
        greeting = _greeting_for(data, character, greet=greet, user_name=user_name)
        if greeting:
            client_turns = [{"role": "assistant", "content": greeting}, *client_turns]
        history, new_turns = client_turns[:-1], client_turns

    engine = get_engine(data.get("model") or None)
    logger.info("Received request for character %s (model %s, conversation %s)",
                character.slug if character else "-", engine.spec.name, conversation.pk if conversation else "new")
    params = sampling_params_for(data=data, character=character, engine=engine)
    tools = data.get("tool_request")
    params = _with_tools(params, tools, engine=engine)
    # The tools reach the model through an upstream (remote), its own chat template when that supports tools,
    # or else the generic text of chat/prompting/tools.py.
    native_tools = ([tool.as_openai() for tool in tools.callable_tools]
                    if tools is not None and tools.may_call and engine.template_supports_tools else None)
    tools_text = "" if params.tools_json or native_tools else tools_system_text(tools)
    forced = _forced_scenarios(data.get("scenario"), character)

    # Policy (docs/API.md): with a character, client system messages cannot replace or extend the
    # character's system prompt (prompt injection); without one, they replace the default prompt.
    system_override = client_system if character is None else ""
    prompt = prompt_compose(engine=engine, character=character, turns=history + new_turns[-1:],
                            user_name=user_name,
                            max_tokens=params.max_tokens, forced_scenarios=forced,
                            system_override=system_override, extra_system=tools_text,
                            tools=native_tools)
    # A continued conversation is always stored; a new one when a character is set, unless store=false.
    store = conversation is not None or (character is not None and data.get("store", True))
    return ChatPlan(engine=engine, prompt=prompt, params=params, character=character, conversation=conversation,
                    new_turns=new_turns, store=store, user=user, shorthand=data.get("shorthand", False),
                    user_name=user_name, tools=tools)


def user_name_for(data: dict, *, fallback: str = "") -> str:
    """{{user}} for a new chat: the last user message's `name`, else the request's `user`, else
    `fallback` (the logged-in user on the page), else "User". Whitespace is folded so a name
    cannot start new lines in the prompt."""
    last_user = next((m for m in reversed(data["messages"]) if m["role"] == "user"), {})
    for candidate in (last_user.get("name"), data.get("user"), fallback):
        name = " ".join((candidate or "").split())[:USER_NAME_MAX]
        if name:
            return name
    return DEFAULT_USER_NAME


def _greeting_for(data: dict, character: Character | None, *, greet: bool, user_name: str) -> str:
    """The greeting a new conversation starts with, placeholders filled; "" for none."""
    index = data.get("greeting")
    if character is None:
        if index is not None:
            raise ApiError("greeting needs a character.", param="greeting", code="greeting_without_character")
        return ""
    if index is None:
        if not greet:
            return ""
        index = 0
    greetings = prompt_greetings(character=character, user_name=user_name)
    if index >= len(greetings):
        raise ApiError(f"Character {character.slug!r} has {len(greetings)} greeting(s): greeting must be "
                       f"0 to {len(greetings) - 1}.", param="greeting", code="greeting_not_found")
    return greetings[index]


def _with_tools(params: SamplingParams, tools: ToolRequest | None, *, engine) -> SamplingParams:
    """The sampling parameters with the grammar that makes the reply tool calls (or text, for "auto"), or, for
    a remote model in chat mode, with the tools to pass to its upstream."""
    if tools is None or not tools.may_call:
        return params
    if engine.spec.backend == "ctransformers":
        raise ApiError("Tool calling needs the llama_cpp backend; this model uses ctransformers.", param="tools",
                       code="unsupported")
    if params.grammar is not None:
        raise ApiError("response_format cannot be combined with tools that may be called; send tool_choice "
                       "\"none\" or leave response_format out.", param="response_format")
    if engine.spec.backend == "openai_compatible" and engine.spec.remote_api == "chat":
        tools_json = json.dumps({"tools": [tool.as_openai() for tool in tools.tools], "tool_choice": tools.openai_choice,
                                 "parallel_tool_calls": tools.parallel})
        return dataclasses.replace(params, tools_json=tools_json)
    return dataclasses.replace(params, grammar=tool_call_grammar(tools))


def sampling_params_for(*, data: dict, character: Character | None, engine, legacy: bool = False) -> SamplingParams:
    """Request values first, then the character's defaults, then config.yaml's. `legacy`: /v1/completions'
    parameter shapes (`logprobs` is a count there)."""
    defaults = settings.LLMSITE.sampling

    def pick(name, character_field=None):
        if data.get(name) is not None:
            return data[name]
        if character is not None and character_field and getattr(character, character_field) is not None:
            return getattr(character, character_field)
        return defaults.get(name)

    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
    if max_tokens is None:
        max_tokens = character.max_tokens if character and character.max_tokens else defaults["max_tokens"]
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(pick("temperature", "temperature")),
        top_p=float(pick("top_p", "top_p")),
        top_k=int(data["top_k"]) if data.get("top_k") is not None else 40,
        repetition_penalty=float(pick("repetition_penalty", "repetition_penalty")),
        presence_penalty=float(data.get("presence_penalty") or 0.0),
        frequency_penalty=float(data.get("frequency_penalty") or 0.0),
        seed=data.get("seed"),
        stop=tuple(data.get("stop") or ()),
        grammar=grammar_for_response_format(data.get("response_format")),
        logprobs=requested_logprobs(data=data, engine=engine, legacy=legacy),
    )


def chat_completion_run(*, plan: ChatPlan) -> dict:
    """Generate the whole reply (blocking), store it, and return the chat.completion object."""
    completion = cached_completion(plan)
    if completion is None:
        completion = generate_observed(plan)
        remember_completion(plan, completion)
    conversation = chat_exchange_store(plan=plan, completion=completion)
    return chat_completion_body(plan=plan, completion=completion, conversation=conversation)


def generate_observed(plan: ChatPlan, *, on_text=None) -> Completion | None:
    """Generate the reply (blocking), timing it for metrics and logs; `on_text(delta)` may return False to stop."""
    plan.timing = GenerationTiming()
    generation = plan.engine.submit(plan.prompt.text, plan.params)
    for delta in generation:
        if delta:
            plan.timing.saw_text()
        if on_text is not None and on_text(delta) is False:
            generation.cancel()
            return None
    completion = generation.result
    plan.timing.finish(model=plan.model_name, completion=completion)
    plan.completion = completion
    return completion


def chat_exchange_store(*, plan: ChatPlan, completion: Completion) -> Conversation | None:
    """Store the new turns and the reply together, or nothing (a cancelled reply is not stored)."""
    if not plan.store or completion.finish_reason not in ("stop", "length"):
        return plan.conversation
    with transaction.atomic():
        conversation = plan.conversation
        if conversation is None:
            first_user = next((t["content"] for t in plan.new_turns if t["role"] == "user"), "")
            conversation = Conversation.objects.create(character=plan.character, owner=plan.user,
                                                       title=_title_from(first_user), user_name=plan.user_name)
        for turn in plan.new_turns:
            Message.objects.create(conversation=conversation, role=turn["role"], content=turn["content"],
                                   completion_tokens=plan.engine.count_tokens(turn["content"]))
        reply = Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, content=completion.text,
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason, model_name=plan.model_name)
        reply.scenarios.set(plan.prompt.scenarios)
        conversation.save(update_fields=["updated_at"])
    plan.conversation = conversation
    return conversation


def chat_completion_body(*, plan: ChatPlan, completion: Completion, conversation: Conversation | None) -> dict:
    return completion_body(completion_id=plan.completion_id, created=plan.created, model=plan.model_name,
                           completion=completion, scenarios=scenarios_used(plan),
                           conversation_id=str(conversation.pk) if conversation else None, shorthand=plan.shorthand,
                           tools=plan.tools)


def chat_completion_from_cache(*, data: dict, cache_allowed: bool, user) -> tuple[dict | None, str | None]:
    """(body, key): the stored reply of an identical stateless deterministic request of the same
    caller, before any prompt work; key is where the slow path should remember its reply (None when
    the request does not qualify)."""
    key = request_cache_key(data, allowed=cache_allowed, user=user)
    stored = cached_request(key)
    if stored is None:
        return None, key
    body = completion_body(completion_id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                           model=stored["model"], completion=Completion(**stored["completion"]),
                           scenarios=stored["scenarios"], conversation_id=None,
                           shorthand=data.get("shorthand", False), tools=data.get("tool_request"))
    return body, key


def completion_body(*, completion_id: str, created: int, model: str, completion: Completion, scenarios: list,
                    conversation_id: str | None, shorthand: bool, tools: ToolRequest | None = None) -> dict:
    message, finish_reason = {"role": "assistant", "content": completion.text}, completion.finish_reason
    if tools is not None and tools.may_call:
        message["content"], calls = tool_reply(completion.text)
        if calls:
            message["tool_calls"] = calls
        finish_reason = tool_finish_reason(finish_reason, bool(calls))
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                     "logprobs": chat_logprobs(completion.logprobs)}],
        "usage": usage_of(completion),
        "system_fingerprint": None,
        "scenarios": scenarios,
        "conversation": conversation_id,
    }
    if shorthand:
        body["text"] = completion.text
    return body


def usage_of(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def scenarios_used(plan: ChatPlan) -> list[dict]:
    reasons = getattr(plan.prompt, "reasons", {}) or {}
    return [{"id": s.pk, "title": s.title, "reason": reasons.get(s.pk, "")} for s in plan.prompt.scenarios]


def text_completion_run(*, data: dict) -> dict:
    """POST /v1/completions: plain text continuation of `prompt`, no character or template."""
    engine = get_engine(data.get("model") or None)
    params = sampling_params_for(data=data, character=None, engine=engine, legacy=True)
    completion = engine.generate(data["prompt"], params)
    logprobs = LegacyLogprobs().shape(completion.logprobs) if completion.logprobs is not None else None
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": engine.spec.name,
        "choices": [{"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                     "logprobs": logprobs}],
        "usage": usage_of(completion),
    }


def _character_for(data: dict, conversation: Conversation | None) -> Character | None:
    requested = data.get("character") or data.get("character_id")
    if conversation is not None:
        if requested and requested not in (conversation.character.slug, str(conversation.character.pk)):
            raise ApiError("This conversation belongs to another character.", param="character",
                           code="character_mismatch")
        if not conversation.character.is_active:
            raise NotFound(f"No active character {conversation.character.slug!r}.", param="character",
                           code="character_not_found")
        return conversation.character
    return character_get_active(slug_or_id=str(requested)) if requested else None


def _forced_scenarios(scenario_id, character: Character | None) -> list[Scenario] | None:
    if scenario_id is None:
        return None
    scenario = Scenario.objects.filter(pk=scenario_id, enabled=True).first()
    if scenario is None or (scenario.character_id and (character is None or scenario.character_id != character.pk)):
        raise NotFound(f"No enabled scenario {scenario_id} for this character.", param="scenario",
                       code="scenario_not_found")
    return [scenario]


def _title_from(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."
