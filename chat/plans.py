"""What a chat request will do, decided before anything is generated: an immutable `ChatPlan`.

`chat_request_prepare` resolves the character and the caller's conversation, the model, the sampling
(request, then character, then config.yaml) and the tools, and composes the prompt. It may raise
ApiError or engine errors; nothing has been generated or stored then.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q

from characters.models import Character, CharacterGroup
from characters.selectors import character_find_active
from scenarios.models import Scenario
from scenarios.world_info import character_filter_allows

from .engine import EngineProtocol, SamplingParams
from .engine.grammar_stacks import MAX_STACKS, too_many_stacks
from .engine.grammars import SchemaNotConvertible, json_object_grammar, json_schema_grammar
from .engines import get_engine
from .errors import ApiError, NotFound
from .groups import GroupLine, Human, group_turns_for, human_labels, speaker_choose
from .models import Conversation
from .prompting import ComposedPrompt, prompt_compose, prompt_greetings, world_info_inputs
from .prompting.tools import tools_system_text, turns_with_tool_text
from .selectors import conversation_get_owned, conversation_path, newest_leaf_under, user_display_name
from .tenancy.conversation_lock import ConversationLease, conversation_lease_take, conversation_reread
from .tooling.grammar import tool_call_grammar
from .tooling.requests import ToolRequest, tool_request_of

logger = logging.getLogger("llmsite.chat")

CLIENT_TURN_ROLES = ("user", "assistant")
CLIENT_SYSTEM_ROLES = ("system", "developer")
DEFAULT_USER_NAME = "User"
USER_NAME_MAX = 100  # Conversation.user_name
LOGPROBS_BACKEND = "llama_cpp"  # the local backend that exposes its logits
# Remote models pass logprobs through from their upstreams (llama-server and vLLM return them).
LOGPROBS_BACKENDS = (LOGPROBS_BACKEND, "openai_compatible")


@dataclass(frozen=True)
class Branch:
    """Where a reply goes in a stored conversation's tree (chat/trees/operations.py). Without one, the
    request's user message follows the active leaf."""

    leaf_id: int | None          # the history is the path to this message (None: nothing before)
    answer_leaf: bool = False    # regenerate: the leaf is a user message, answered again (no new user message)
    continue_leaf: bool = False  # continue: the leaf is an assistant message, extended
    new_message: bool = False    # edit: the request's user message follows the leaf (a new branch)
    target_id: int | None = None  # the message operated on (the reply regenerated, the message edited)


@dataclass(frozen=True)
class ChatPlan:
    """Everything decided before generation starts; never changed afterwards."""

    engine: EngineProtocol
    prompt: ComposedPrompt
    params: SamplingParams
    character: Character | None
    conversation: Conversation | None   # the stored conversation continued, None for a new chat
    new_turns: tuple[dict, ...]         # client turns to store with the reply
    store: bool
    user: object
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    shorthand: bool = False
    user_name: str = DEFAULT_USER_NAME  # {{user}}; stored with a new conversation
    tools: ToolRequest | None = None    # the request's tools; the reply is read for calls when it may call
    cache_allowed: bool = True          # False: the client sent Cache-Control: no-cache
    request_key: str | None = None      # the fast-path cache key, when the request qualifies
    conversation_lease: ConversationLease | None = None  # held while continuing `conversation`
    end_user: str = ""                  # the request's opaque `user` id: logged, never in the prompt
    # The id a new conversation is stored under, known before the reply (a Responses API id names it).
    new_conversation_id: uuid.UUID = field(default_factory=uuid.uuid4)
    group: CharacterGroup | None = None  # a group chat's group (None for an ad hoc one)
    members: tuple = ()                 # a group chat's characters; `character` is the one who speaks
    parent_id: int | None = None        # the stored message the new turns (or the reply) follow
    continued: object | None = None     # the assistant Message a continuation extends
    choices: int = 1                    # alternatives generated from the one prompt (`n`)

    def __post_init__(self):
        if self.conversation_lease is not None:
            # The last resort: a plan dropped on a path that did not release its lease (the releases are in
            # chat/replies.py, where the reply is stored, fails or is cancelled) releases it when collected.
            weakref.finalize(self, self.conversation_lease.release)

    @property
    def model_name(self) -> str:
        return self.engine.spec.name

    def release_conversation(self) -> None:
        """Let the next request continue this plan's conversation (idempotent)."""
        if self.conversation_lease is not None:
            self.conversation_lease.release()


def chat_request_prepare(*, user, data: dict, greet: bool = False, user_name: str = "", cache_allowed: bool = True,
                         request_key: str | None = None, branch: Branch | None = None,
                         lease_holder: str | None = None) -> ChatPlan:
    """Resolve character, conversation, model and sampling, and compose the prompt.

    `greet`: a new conversation starts with the character's greeting as its first message (the
    chat page and WebSocket show it); the request's `greeting` picks which one (0 = the main
    greeting, 1.. = the alternates) and also makes an API request start with it.
    `user_name`: what {{user}} becomes when the request names no one (default: the account's display name).
    `branch`: where in the conversation's tree the reply goes (regenerate, edit, continue).
    `lease_holder`: who takes the conversation's lease (a background job: its retry takes over its own lease).
    """
    conversation = lease = None
    if data.get("conversation"):
        conversation = conversation_get_owned(user=user, conversation_id=data["conversation"])
        # One continuation at a time (409 conversation_busy), its history read once the lease is held.
        lease = conversation_lease_take(conversation=conversation, holder=lease_holder)
    try:
        if conversation is not None:
            # The version whose history is read (replies.py), and its active leaf (404 if deleted meanwhile).
            conversation_reread(conversation)
            if branch is not None:
                _check_branch_still_there(conversation, branch)
        plan = _plan_for(user=user, data=data, conversation=conversation, lease=lease, greet=greet,
                         user_name=user_name, cache_allowed=cache_allowed, request_key=request_key, branch=branch)
        if conversation is not None:
            _tree_room_check(plan)
        elif plan.store:
            _conversation_room_check(plan)
        return plan
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def _plan_for(*, user, data: dict, conversation: Conversation | None, lease: ConversationLease | None, greet: bool,
              user_name: str, cache_allowed: bool, request_key: str | None, branch: Branch | None = None) -> ChatPlan:
    group, members = _group_for(data, conversation)
    if members:
        return _group_plan_for(user=user, data=data, conversation=conversation, lease=lease, group=group,
                               members=members, user_name=user_name, branch=branch)
    character = _character_for(data, conversation)

    client_messages = data["messages"]
    client_system = "\n\n".join(m["content"] for m in client_messages if m["role"] in CLIENT_SYSTEM_ROLES
                                and m["content"].strip())
    # Tool calls and results of the history become text turns (chat/prompting/tools.py).
    client_turns = turns_with_tool_text(client_messages)
    parent_id = continued = None
    if conversation is not None and conversation.owner_id != user.pk:
        # Only a group chat attributes each line to its author; here a participant would write as the owner.
        raise ApiError("Only the owner writes in a conversation with one character; participants take part in "
                       "group chats.", param="conversation", code="not_conversation_owner", status=403)
    if conversation is not None:
        # The stored history is authoritative: the path to the leaf (chat/selectors.py), then only the
        # request's last user message is new (none when the leaf is answered again or continued).
        if branch is not None:
            leaf_id = branch.leaf_id
        else:
            leaf_id = conversation.active_id or newest_leaf_under(conversation, None)
        path = conversation_path(conversation, leaf_id=leaf_id) if leaf_id is not None else []
        history = [{"role": m.role, "content": m.content} for m in path if m.role in CLIENT_TURN_ROLES]
        parent_id = path[-1].pk if path else None
        if branch is not None and (branch.answer_leaf or branch.continue_leaf):
            new_turns = []
            continued = path[-1] if branch.continue_leaf else None
        else:
            new_turns = [client_turns[-1]]
        user_name = conversation.user_name
    else:
        user_name = user_name_for(data, fallback=user_name or user_display_name(user))
        greeting = _greeting_for(data, character, greet=greet, user_name=user_name)
        if greeting:
            client_turns = [{"role": "assistant", "content": greeting}, *client_turns]
        history, new_turns = client_turns[:-1], client_turns

    engine = get_engine(data.get("model") or None)
    logger.info("Received request for character %s (model %s, conversation %s)",
                character.slug if character else "-", engine.spec.name, conversation.pk if conversation else "new")
    params = sampling_params_for(data=data, character=character, engine=engine)
    tools = tool_request_of(data)
    params = _with_tools(params, tools, engine=engine)
    # The tools reach the model through an upstream (remote), its own chat template when that supports tools,
    # or else the generic text of chat/prompting/tools.py.
    native_tools = ([tool.as_openai() for tool in tools.callable_tools]
                    if tools is not None and tools.may_call and engine.template_supports_tools else None)
    tools_text = "" if params.tools_json or native_tools else tools_system_text(tools)
    forced = _forced_scenarios(data.get("scenario"), character)
    turns = history + new_turns[-1:]
    new_conversation_id = uuid.uuid4()
    # A continued conversation is always stored; a new one when a character is set, unless store=false.
    store = conversation is not None or (character is not None and data.get("store", True))
    # World Info counts the messages up to the one answered: a continuation is evaluated as the reply it extends.
    if conversation is None:
        # A chat that is not stored and carries a `seed` rolls by it: the same request, the same prompt.
        seeded_by = new_conversation_id if store or data.get("seed") is None else f"request-seed-{data['seed']}"
        world_info = world_info_inputs(seeded_by, path=(), message_count=len(turns))
    else:
        world_info = world_info_inputs(conversation.pk, path=path[:-1] if continued is not None else path,
                                      message_count=len(turns) - (continued is not None))

    # Policy (docs/API.md): with a character, client system messages cannot replace or extend the
    # character's system prompt (prompt injection); without one, they replace the default prompt.
    system_override = client_system if character is None else ""
    prompt = prompt_compose(engine=engine, character=character, turns=turns,
                            user_name=user_name,
                            max_tokens=params.max_tokens, forced_scenarios=forced,
                            system_override=system_override, extra_system=tools_text,
                            tools=native_tools, continue_final=continued is not None, **world_info)
    if conversation is None and prompt.dropped_turns:
        # A new conversation stores what the model saw: the oldest turns that did not fit are not stored (they were
        # neither read nor billed, and a client could otherwise store a megabyte a request). World Info's timed
        # effects count messages: counted in the stored conversation, as the next request will count them.
        new_turns = new_turns[prompt.dropped_turns:]
        prompt.world_info_state = {key: {field: count - prompt.dropped_turns for field, count in record.items()}
                                   for key, record in prompt.world_info_state.items()}
    return ChatPlan(engine=engine, prompt=prompt, params=params, character=character, conversation=conversation,
                    new_turns=tuple(new_turns), store=store, user=user, shorthand=data.get("shorthand", False),
                    user_name=user_name, tools=tools, cache_allowed=cache_allowed, request_key=request_key,
                    conversation_lease=lease, end_user=data.get("user") or "", parent_id=parent_id,
                    continued=continued, choices=data.get("n") or 1, new_conversation_id=new_conversation_id)


def _check_branch_still_there(conversation: Conversation, branch: Branch) -> None:
    """The message a tree operation was checked against, checked again now that the lease is held: a delete
    that came between the check and the lease would leave it answering, extending or editing under nothing."""
    wanted = {pk for pk in (branch.leaf_id, branch.target_id) if pk is not None}
    found = {message.pk: message for message in conversation.messages.filter(pk__in=wanted)}
    leaf = found.get(branch.leaf_id)
    if len(found) < len(wanted) or (branch.continue_leaf and leaf.children.exists()):
        missing = min(wanted - set(found), default=branch.leaf_id)
        raise NotFound(f"No message {missing} in conversation {conversation.pk}: the branch changed.",
                       param="message", code="message_not_found")


def _tree_room_check(plan: ChatPlan) -> None:
    """409 before anything is generated when storing the plan's reply would pass the conversation's caps
    (CONVERSATION_MAX_MESSAGES, CONVERSATION_MAX_ALTERNATIVES): a tree cannot grow without bound."""
    conversation = plan.conversation
    # A continuation extends a stored message; otherwise the new turns and one reply per choice are added, the
    # first of them beside the children the parent already has.
    adding = 0 if plan.continued is not None else len(plan.new_turns) + plan.choices
    beside = 0 if plan.continued is not None else (1 if plan.new_turns else plan.choices)
    if conversation.messages.count() + adding > settings.CONVERSATION_MAX_MESSAGES:
        raise ApiError(f"The conversation holds its maximum of {settings.CONVERSATION_MAX_MESSAGES} messages "
                       "(CONVERSATION_MAX_MESSAGES): delete a branch or start a new conversation.",
                       param="conversation", code="conversation_full", status=409)
    siblings = conversation.messages.filter(parent_id=plan.parent_id).count()
    if beside and siblings + beside > settings.CONVERSATION_MAX_ALTERNATIVES:
        raise ApiError(f"The message would have more than {settings.CONVERSATION_MAX_ALTERNATIVES} alternatives "
                       "(CONVERSATION_MAX_ALTERNATIVES): delete some first.", param="message",
                       code="too_many_alternatives", status=409)


def _conversation_room_check(plan: ChatPlan) -> None:
    """409 before anything is generated when a new stored conversation would pass its owner's cap
    (USER_MAX_CONVERSATIONS, 0 = none): a key's stored conversations cannot grow without bound. Counted when the
    request arrives, so requests sent at once may pass it together (bounded by the key's concurrency)."""
    limit = settings.USER_MAX_CONVERSATIONS
    if limit and Conversation.objects.filter(owner_id=getattr(plan.user, "pk", None)).count() >= limit:
        raise ApiError(f"You have the maximum of {limit} stored conversations (USER_MAX_CONVERSATIONS): delete some "
                       "(DELETE /v1/conversations/<id>/), or send store: false.",
                       param="conversation", code="too_many_conversations", status=409)


def _group_for(data: dict, conversation: Conversation | None) -> tuple[CharacterGroup | None, list[Character]]:
    """The group and the members of a group chat, or (None, []) for a chat with one character."""
    if conversation is not None:
        members = list(conversation.members.order_by("id"))
        if not members:
            return None, []
        group = conversation.group
        # An editor retires a character or a group for every chat, stored ones included.
        if group is not None and not group.is_active:
            raise NotFound(f"No active group {group.slug!r}.", param="character", code="character_not_found")
        if group is not None:  # the group's order (its turns), for the members the conversation started with
            order = {member.pk: index for index, member in enumerate(group.member_list())}
            members.sort(key=lambda member: (order.get(member.pk, len(order)), member.pk))
        active = [member for member in members if member.is_active]
        if not active:
            raise NotFound("This group chat has no active character.", param="character", code="character_not_found")
        return group, active
    if data.get("characters"):
        members = []
        for slug in dict.fromkeys(data["characters"]):
            character = character_find_active(slug_or_id=slug)
            if character is None:
                raise NotFound(f"No active character {slug!r}.", param="characters", code="character_not_found")
            members.append(character)
        return None, members
    requested = data.get("character") or data.get("character_id")
    group = CharacterGroup.objects.filter(slug=str(requested), is_active=True).first() if requested else None
    if group is None:
        return None, []
    members = [member for member in group.member_list() if member.is_active]
    if not members:
        raise NotFound(f"The group {group.slug!r} has no active character.", param="character",
                       code="character_not_found")
    return group, members


def _group_plan_for(*, user, data: dict, conversation: Conversation | None, lease: ConversationLease | None,
                    group: CharacterGroup | None, members: list[Character], user_name: str,
                    branch: Branch | None = None) -> ChatPlan:
    """A group chat's plan: choose the speaker, and compose its prompt with its own persona and system prompt,
    the group's scenario and the history with every line attributed (chat/groups/). `branch` places it in the
    tree as for a one-character chat: regenerate answers the leaf again, continue extends the leaf's reply (its
    speaker goes on), edit puts the new message beside the old one."""
    answer_leaf = branch is not None and branch.answer_leaf
    continued = None
    if conversation is not None:
        owner_name = conversation.user_name
        leaf_id = branch.leaf_id if branch is not None else (conversation.active_id
                                                            or newest_leaf_under(conversation, None))
        path = conversation_path(conversation, leaf_id=leaf_id) if leaf_id is not None else []
        stored = [message for message in path if message.role in CLIENT_TURN_ROLES]
        labels = _human_labels(conversation, stored=stored, owner_name=owner_name)
        lines = [_group_line(message, conversation=conversation, labels=labels) for message in stored]
        author_name = labels.get(user.pk) or user_display_name(user) or "User"
        if branch is not None and branch.continue_leaf:
            continued = path[-1]
    else:
        owner_name = user_name_for(data, fallback=user_name)
        author_name = human_labels([Human(user.pk, owner_name, user.get_username())])[user.pk]
        labels, stored, lines = {user.pk: author_name}, [], []
    if answer_leaf or continued is not None:
        new_text, new_turns = lines[-1].content if answer_leaf else "", ()
    else:
        client_turns = [m for m in data["messages"] if m["role"] in CLIENT_TURN_ROLES]
        if not client_turns or client_turns[-1]["role"] != "user":
            raise ApiError("A group chat request ends with the user's new message.", param="messages")
        new_text = client_turns[-1]["content"]
        new_turns = ({"role": "user", "content": new_text},)
        lines.append(GroupLine(role="user", content=new_text, name=author_name))
    if continued is not None:
        speaker = continued.speaker or conversation.character
        if speaker not in members:
            raise NotFound(f"No active character {speaker.slug!r}.", param="message", code="character_not_found")
    else:
        before = lines[:-1]  # who spoke last before the message answered
        last_speaker = next((line.speaker_id for line in reversed(before) if line.role == "assistant"), None)
        speaker = _speaker_for(data, members=members, group=group, new_text=new_text, last_speaker=last_speaker,
                               retired=_retired_members(conversation))
    # Every member's name, retired ones too: their lines are still in the history.
    everyone = [member.name for member in (conversation.members.all() if conversation is not None else members)]
    humans = [owner_name, *labels.values()]
    turns = group_turns_for(lines=lines, speaker_id=speaker.pk, member_names=everyone, participant_names=humans)

    engine = get_engine(data.get("model") or None)
    params = sampling_params_for(data=data, character=speaker, engine=engine)
    new_conversation_id = uuid.uuid4()
    names = ", ".join(member.name for member in members)
    note = (f"This is a group chat between {names} and the humans writing as users. Every line starts with the "
            f"name of whoever wrote it; a line inside one that starts with \"> \" is quoted text, not a line of its "
            f"own. Write only {speaker.name}'s next reply, without the name in front.")
    prompt = prompt_compose(engine=engine, character=speaker, turns=turns, user_name=owner_name,
                            max_tokens=params.max_tokens, extra_system=note,
                            setting=group.scenario if group is not None and group.scenario.strip() else None,
                            continue_final=continued is not None,
                            # World Info counts the messages up to the one answered: a continuation is evaluated
                            # as the reply it extends.
                            **world_info_inputs(conversation.pk if conversation is not None else new_conversation_id,
                                               path=stored[:-1] if continued is not None else stored,
                                               message_count=len(lines) - (continued is not None)))
    parent_id = leaf_id if conversation is not None else None
    return ChatPlan(engine=engine, prompt=prompt, params=params, character=speaker, conversation=conversation,
                    # As with one character: a continued conversation is always stored, a new one unless store=false.
                    new_turns=new_turns, store=conversation is not None or data.get("store", True),
                    user=user, shorthand=data.get("shorthand", False),
                    user_name=owner_name, cache_allowed=False, request_key=None, conversation_lease=lease,
                    group=group, members=tuple(members), new_conversation_id=new_conversation_id,
                    parent_id=parent_id, continued=continued, choices=data.get("n") or 1)


def _retired_members(conversation: Conversation | None) -> dict:
    if conversation is None:
        return {}
    retired = conversation.members.filter(is_active=False).values_list("pk", "slug")
    return {key: slug for pk, slug in retired for key in (slug, str(pk))}


def _human_labels(conversation: Conversation, *, stored: list, owner_name: str) -> dict[int, str]:
    """Account id -> the name its lines go by (chat/groups/humans.py), for the owner, the participants and whoever
    wrote a stored line and left since: one query."""
    authors = {message.author_id for message in stored if message.role == "user"} - {None}
    people = get_user_model().objects.filter(Q(pk__in=authors) | Q(pk=conversation.owner_id)
                                             | Q(pk__in=conversation.participants.values("pk")))
    return human_labels([Human(person.pk, owner_name if person.pk == conversation.owner_id
                               else user_display_name(person) or "User", person.get_username())
                         for person in people.order_by("pk")])


def _group_line(message, *, conversation: Conversation, labels: dict[int, str]) -> GroupLine:
    if message.role == "assistant":
        speaker = message.speaker or conversation.character
        return GroupLine(role="assistant", content=message.content, name=speaker.name, speaker_id=speaker.pk)
    author_id = message.author_id or conversation.owner_id
    return GroupLine(role="user", content=message.content, name=labels.get(author_id) or "User")


def _speaker_for(data: dict, *, members: list[Character], group: CharacterGroup | None, new_text: str,
                 last_speaker: int | None, retired: dict | None = None) -> Character:
    """`retired`: the conversation's members an editor deactivated, their slugs by slug and by id."""
    retired = retired or {}
    requested = data.get("speaker")
    if requested:
        named = next((member for member in members if requested in (member.slug, str(member.pk))), None)
        if named is None and requested in retired:
            raise NotFound(f"No active character {retired[requested]!r}.", param="speaker",
                           code="character_not_found")
        if named is None:
            raise ApiError(f"{requested!r} is not a member of this group chat.", param="speaker",
                           code="speaker_not_member")
        return named
    mode = group.turn_mode if group is not None else CharacterGroup.TurnMode.NATURAL
    return speaker_choose(members=members, last_text=new_text, last_speaker_id=last_speaker, mode=mode)


def user_name_for(data: dict, *, fallback: str = "") -> str:
    """{{user}} for a new chat: the last user message's `name`, else `fallback` (the account's display name),
    else "User". Whitespace is folded so a name cannot start new lines in the prompt. The request's `user` is
    not a name: in the OpenAI API it is an opaque end-user id (often a hash or an email), kept for the request
    log (ChatPlan.end_user) and never shown to the model."""
    last_user = next((m for m in reversed(data["messages"]) if m["role"] == "user"), {})
    for candidate in (last_user.get("name"), fallback):
        name = " ".join((candidate or "").split())[:USER_NAME_MAX]
        if name:
            return name
    return DEFAULT_USER_NAME


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
        top_k=int(data["top_k"]) if data.get("top_k") is not None else SamplingParams.top_k,
        repetition_penalty=float(pick("repetition_penalty", "repetition_penalty")),
        presence_penalty=float(data.get("presence_penalty") or 0.0),
        frequency_penalty=float(data.get("frequency_penalty") or 0.0),
        seed=data.get("seed"),
        stop=tuple(data.get("stop") or ()),
        grammar=grammar_for_response_format(data.get("response_format")),
        logprobs=requested_logprobs(data=data, engine=engine, legacy=legacy),
        logit_bias=requested_logit_bias(data=data, engine=engine),
    )


def requested_logit_bias(*, data: dict, engine) -> tuple:
    """The request's (token id, bias) pairs; a 400 naming `logit_bias` where the backend cannot apply them
    (ctransformers has no logit access; a remote upstream is passed them)."""
    pairs = data.get("logit_bias") or ()
    if pairs and engine.spec.backend == "ctransformers":
        raise ApiError(f"logit_bias needs the llama_cpp backend (or an upstream that takes it); model "
                       f"{engine.spec.name!r} uses ctransformers.", param="logit_bias", code="unsupported")
    return tuple(pairs)


def grammar_for_response_format(response_format: dict | None) -> str | None:
    """The GBNF grammar of `response_format` (JSON mode, or a JSON Schema); None for plain text."""
    if not response_format or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return json_object_grammar()
    try:
        return _rehearsed(json_schema_grammar(response_format["json_schema"]["schema"]), param="response_format")
    except SchemaNotConvertible as exc:
        raise ApiError(f"response_format.json_schema.schema: {exc}", param="response_format",
                       code=exc.code) from None


def requested_logprobs(*, data: dict, engine, legacy: bool = False) -> int | None:
    """How many likeliest tokens to report per reply token, None when the request wants no logprobs.

    Chat: `logprobs: true` plus `top_logprobs` (0-20). Legacy /v1/completions: `logprobs` is that number
    (0-5). Refused with a 400 naming `logprobs` where the model's backend cannot compute them.
    """
    if legacy:
        count = data.get("logprobs")
    else:
        count = (data.get("top_logprobs") or 0) if data.get("logprobs") else None
    if count is None:
        return None
    backend = engine.spec.backend
    if backend not in LOGPROBS_BACKENDS:
        raise ApiError(f"logprobs need the {LOGPROBS_BACKEND} backend; model {engine.spec.name!r} uses {backend}.",
                       param="logprobs", code="unsupported")
    return int(count)


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
    # A llama.cpp upstream takes our grammar: a forced call (required, a named function) is enforced by it as
    # locally, whatever the upstream's template makes of tools. "auto" lets the upstream's own tool calling decide.
    forced_here = tools.must_call and getattr(engine, "accepts_grammar", False)
    if engine.spec.backend == "openai_compatible" and engine.spec.remote_api == "chat" and not forced_here:
        tools_json = json.dumps({"tools": [tool.as_openai() for tool in tools.tools], "tool_choice": tools.openai_choice,
                                 "parallel_tool_calls": tools.parallel})
        return dataclasses.replace(params, tools_json=tools_json)
    return dataclasses.replace(params, grammar=_rehearsed(tool_call_grammar(tools), param="tools"))


def _rehearsed(grammar: str, *, param: str) -> str:
    """`grammar`, unless text exists that makes llama.cpp follow too many parses at once (chat/engine/grammar_stacks.py):
    one token could then run for minutes on the scheduler thread, stalling everyone's requests."""
    if too_many_stacks(grammar):
        raise ApiError(f"The {param} asked for is too ambiguous to enforce: the server would have to follow more "
                       f"than {MAX_STACKS} readings of the text at once (alternatives such as 'anyOf', 'oneOf' or type "
                       "lists that start alike and nest, or very many optional properties or values), or its grammar "
                       "is too large to check. Make the alternatives start differently (e.g. by a required first "
                       "property or a 'const'), nest them less, or make the schema smaller.", param=param,
                       code="grammar_too_ambiguous")
    return grammar


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
    if not requested:
        return None
    character = character_find_active(slug_or_id=str(requested))
    if character is None:
        raise NotFound(f"No active character {str(requested)!r}.", param="character", code="character_not_found")
    return character


def _forced_scenarios(scenario_id, character: Character | None) -> list[Scenario] | None:
    if scenario_id is None:
        return None
    scenario = Scenario.objects.filter(pk=scenario_id, enabled=True).first()
    # Another character's entry, or a global one its character filter keeps from this character (World Info's
    # rule, which forcing skips otherwise): the same 404 as a missing one.
    if scenario is None or (scenario.character_id and (character is None or scenario.character_id != character.pk)) \
            or not character_filter_allows(scenario, character):
        raise NotFound(f"No enabled scenario {scenario_id} for this character.", param="scenario",
                       code="scenario_not_found")
    return [scenario]
