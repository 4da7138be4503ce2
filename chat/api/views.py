"""The OpenAI-compatible API: thin views that validate, authorise, call a service and shape the reply."""

import asyncio
import datetime
import functools
import threading

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from django.utils import timezone
from rest_framework import generics, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from characters.selectors import characters_active
from chat.engine.generation import generations_started
from chat.engines import get_registry
from chat.engine import EngineError
from chat.errors import NotFound, json_error_response
from chat.jobs import job_body, job_cancel, job_get_visible, job_url
from chat.models import ApiKey
from chat.selectors import conversation_get_listed, conversation_get_owned, conversations_of
from chat.services import chat_completion_create, text_completion_run, text_generation_start
from chat.tenancy.usage import usage_of_owner, usage_window
from chat.trees.operations import chat_completion_choices, conversation_delete, conversation_rename
from chat.trees.running import client_gone_signal

from . import serializers as s
from .choices import choices_response
from .sse import chat_completion_events, sse_response, text_completion_events

ERRORS = {code: OpenApiResponse(s.ErrorSerializer, description=text) for code, text in {
    400: "Invalid request (the error names the field), or context_length_exceeded.",
    401: "Missing or invalid API key.",
    403: "not_conversation_owner: a participant of a group conversation changing or deleting it.",
    404: "Unknown model, character, conversation or scenario.",
    409: "conversation_busy: a reply to the conversation is on its way.",
    413: "Request body too large.", 429: "Rate limit reached.", 503: "Model unavailable."}.items()}


def api_key_of(request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


def logged(response, record):
    """The response, carrying what became of the request's plan for its log line (chat/ops/middleware.py)."""
    response.reply_record = record
    return response


def logged_fields(response, **fields):
    """The response, carrying fields for its log line where no plan stands behind it (/v1/completions)."""
    response.log_fields = fields
    return response


def reply_stream_response(record, events):
    """An SSE response of events that come from replies.reply_stream, whose `finally` releases the conversation's
    lease. A stream that never starts (refused at admission, or its client gone first) never runs it: the
    wrapper below then releases the lease itself, else the conversation answers 409 for LEASE_SECONDS."""
    response = logged(sse_response(events), record)
    response.release_unstarted = record.plan.release_conversation
    return response


async def release_unstarted(response) -> None:
    release = getattr(response, "release_unstarted", None)
    if release is not None:
        await sync_to_async(release)()  # a cache call: not on the event loop


def leaving_abandoned_runs_alone(view):
    """Wrap a view that waits for a reply run (a non-streamed regenerate, edit or continue): when its client goes
    away the view's thread stops waiting, so the run is left alone as a stream's reader leaving leaves it (its
    on_disconnect, REPLY_DETACHED_SECONDS and the owner's REPLY_DETACHED_MAX_PER_OWNER apply); watched by a thread
    that never returned, it ran to max_tokens whatever the client asked and counted against no cap."""
    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        gone = threading.Event()
        with client_gone_signal(gone):  # the task copies the context: the view's thread sees the signal
            call = asyncio.ensure_future(sync_to_async(view)(request, *args, **kwargs))
        return await view_thread_outcome(call, on_cancel=gone.set)
    return wrapper


async def view_thread_outcome(call, *, on_cancel):
    """Await a view running in its thread; when the request's task is cancelled (its client left), run
    `on_cancel` to make the thread return, wait for it, and re-raise the cancel. The thread is shielded and
    awaited here: asgiref 3.13's sync_to_async waits for its thread on cancel and then returns as if nothing
    happened, so the cancel must be seen by the caller, not inside it."""
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        on_cancel()
        await asyncio.wait({call})
        if not call.cancelled():
            call.exception()  # retrieved (ClientGone, or a failure meanwhile): no one to answer
        raise


def cancelling_abandoned_generations(view):
    """Wrap a generating view so that no Generation outlives a client that left.

    Under ASGI a disconnect cancels the request's task; a blocking (non-streamed) view keeps running in its
    thread, so the generations it started are cancelled here (`view_thread_outcome`).

    A stream starts only once its generation holds a slot: a request that cannot be admitted (queue
    full, queue_timeout) is answered 503 + Retry-After before any byte of the stream. The wait is
    bounded by the model's queue_timeout (+1 s; 60 s without one, then the stream starts anyway).
    Once returned, the generations are cancelled when the response is closed (Django closes it after
    sending, or after a client left mid-stream) or when the request's task is cancelled before the
    response was sent. No garbage-collector finalizer is involved.
    """
    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        with generations_started() as started:
            call = asyncio.ensure_future(sync_to_async(view)(request, *args, **kwargs))
            # on cancel the view's thread stops waiting for tokens and returns
            response = await view_thread_outcome(call, on_cancel=lambda: cancel_all(started))
        if isinstance(response, StreamingHttpResponse):
            try:
                for generation in started:
                    await generation.wait_admitted()
            except asyncio.CancelledError:
                cancel_all(started)
                await release_unstarted(response)
                raise
            except EngineError as error:  # not admitted: nothing of the stream was sent yet
                cancel_all(started)
                await release_unstarted(response)
                refused = json_error_response(error, request)
                if hasattr(response, "reply_record"):
                    refused.reply_record = response.reply_record
                return refused
        for generation in started:  # cancel() is a no-op for a finished generation
            response._resource_closers.append(generation.cancel)
        task = asyncio.current_task()
        if task is not None and started:  # a request cancelled before its response was sent never closes it
            task.add_done_callback(lambda done: abandon(started, response) if done.cancelled() else None)
        return response

    return wrapper


def cancel_all(generations) -> None:
    for generation in generations:
        generation.cancel()


def abandon(generations, response) -> None:
    """The request's task was cancelled (its client left) before or while its response was sent."""
    cancel_all(generations)
    release = getattr(response, "release_unstarted", None)
    if release is not None:  # idempotent: a stream that had started released it already
        asyncio.get_running_loop().run_in_executor(None, release)


class GeneratingView(APIView):
    @classmethod
    def as_view(cls, **initkwargs):
        return cancelling_abandoned_generations(super().as_view(**initkwargs))


class ChatCompletionsView(GeneratingView):
    """Create a chat completion (OpenAI-compatible), optionally streamed as server-sent events."""

    @extend_schema(request=s.ChatCompletionRequestSerializer, responses={
        200: OpenApiResponse(s.ChatCompletionSerializer,
                             description="A chat.completion object; with stream=true, text/event-stream of "
                                         "chat.completion.chunk objects ending in 'data: [DONE]'."),
        **ERRORS})
    def post(self, request):
        payload = request.data
        if "character_id" in request.query_params and isinstance(payload, dict):
            # The original design passed the character as a query parameter.
            payload = {**payload, "character_id": request.query_params["character_id"]}
        serializer = s.ChatCompletionRequestSerializer(data=payload)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if (data.get("n") or 1) > 1:  # n choices of one prompt (chat/api/choices.py)
            run = chat_completion_choices(user=request.user, api_key=api_key_of(request), data=data)
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            return logged(choices_response(run, stream=data.get("stream"), include_usage=include_usage), run.record)
        started = chat_completion_create(user=request.user, api_key=api_key_of(request), data=data,
                                         payload=s.request_as_sent(serializer),
                                         cache_allowed="no-cache" not in request.headers.get("Cache-Control", ""))
        if started.job is not None:
            response = Response(job_body(started.job), status=202, headers={"Location": job_url(started.job)})
            return logged(response, started.record)
        if started.generation is not None:
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            response = reply_stream_response(started.record, chat_completion_events(
                record=started.record, generation=started.generation, include_usage=include_usage))
        else:
            response = logged(Response(started.body), started.record)
        response["X-Cache"] = started.cache_status
        return response


class JobView(APIView):
    """A background chat completion: its state, and DELETE to cancel it."""

    @extend_schema(responses={200: dict, 404: ERRORS[404]})
    def get(self, request, pk):
        return Response(job_body(job_get_visible(user=request.user, job_id=pk)))

    @extend_schema(responses={200: dict, 404: ERRORS[404]})
    def delete(self, request, pk):
        return Response(job_body(job_cancel(user=request.user, job_id=pk)))


class CompletionsView(GeneratingView):
    """Plain text completion of a prompt (no character, no chat template)."""

    @extend_schema(request=s.CompletionRequestSerializer, responses={
        200: OpenApiResponse(s.TextCompletionSerializer,
                             description="A text_completion object; with stream=true, text/event-stream of "
                                         "text_completion objects ending in 'data: [DONE]'."),
        **ERRORS})
    def post(self, request):
        serializer = s.CompletionRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        end_user = data.get("user") or None  # the request's opaque `user` id, for the log line
        if not data.get("stream"):
            body = text_completion_run(user=request.user, api_key=api_key_of(request), data=data)
            return logged_fields(Response(body), model=body["model"], end_user=end_user,
                                 prompt_tokens=body["usage"]["prompt_tokens"],
                                 completion_tokens=body["usage"]["completion_tokens"])
        # Submitted before the response starts, so a bad prompt (too long, unknown model) is still a 4xx.
        engine, generation = text_generation_start(user=request.user, api_key=api_key_of(request), data=data)
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return logged_fields(
            sse_response(text_completion_events(engine=engine, generation=generation, include_usage=include_usage,
                                                with_logprobs=data.get("logprobs") is not None,
                                                echo=data["prompt"] if data.get("echo") else "")),
            model=engine.spec.name, end_user=end_user)


def model_object(registry, name: str, *, user) -> dict:
    """A model as OpenAI lists one. `loaded` for staff only: models stay loaded once used, so it would tell any
    tenant that another used a model."""
    model = {"id": name, "object": "model", "created": 0, "owned_by": "llmsite", "default": name == registry.default_name}
    if getattr(user, "is_staff", False):
        model["loaded"] = registry.is_loaded(name)
    return model


class ModelListView(APIView):
    """The configured models (loaded lazily on first use)."""

    @extend_schema(responses={200: s.ModelListSerializer})
    def get(self, request):
        registry = get_registry()
        return Response({"object": "list", "data": [model_object(registry, name, user=request.user)
                                                    for name in registry.names()]})


class ModelDetailView(APIView):
    """One configured model (what `client.models.retrieve(id)` asks for)."""

    @extend_schema(operation_id="v1_models_detail", responses={200: s.ModelInfoSerializer, 404: ERRORS[404]})
    def get(self, request, model_id):
        registry = get_registry()
        if model_id not in registry.names():
            raise NotFound(f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return Response(model_object(registry, model_id, user=request.user))


class CharacterListView(generics.ListAPIView):
    """Active characters."""

    serializer_class = s.CharacterSerializer

    def get_queryset(self):
        return characters_active()


class CharacterDetailView(generics.RetrieveAPIView):
    """One active character, by slug (404 `character_not_found`, as a chat request naming it gets)."""

    serializer_class = s.CharacterSerializer

    def get_object(self):
        slug = self.kwargs["slug"]
        character = characters_active().filter(slug=slug).first()
        if character is None:
            raise NotFound(f"No active character {slug[:80]!r}.", param="character", code="character_not_found")
        return character


class ConversationListView(generics.ListAPIView):
    """The caller's own conversations, newest first."""

    serializer_class = s.ConversationSerializer

    def get_queryset(self):
        conversations = conversations_of(user=self.request.user)
        character = self.request.query_params.get("character")
        group = self.request.query_params.get("group")  # a group's conversations
        if group:
            conversations = conversations.filter(group__slug=group)
        return conversations.filter(character__slug=character, members__isnull=True) if character else conversations


class ConversationDetailView(generics.RetrieveAPIView):
    """GET: a conversation. PATCH: its title. DELETE: the whole conversation (the owner's alone)."""

    serializer_class = s.ConversationSerializer

    def get_object(self):
        return conversation_get_listed(user=self.request.user, conversation_id=self.kwargs["pk"])

    @extend_schema(request=s.ConversationRenameSerializer, responses={
        200: s.ConversationSerializer, 400: ERRORS[400], 403: ERRORS[403], 404: ERRORS[404]})
    def patch(self, request, pk):
        rename = s.ConversationRenameSerializer(data=request.data)
        rename.is_valid(raise_exception=True)
        conversation_rename(user=request.user, conversation_id=pk, title=rename.validated_data["title"])
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(request=None, responses={204: None, 403: ERRORS[403], 404: ERRORS[404], 409: ERRORS[409]})
    def delete(self, request, pk):
        conversation_delete(user=request.user, conversation_id=pk)
        return Response(status=204)


class ConversationMessagesView(generics.ListAPIView):
    """A conversation's messages, oldest first, with the scenarios used for each reply."""

    serializer_class = s.MessageSerializer

    def get_queryset(self):
        conversation = conversation_get_owned(user=self.request.user, conversation_id=self.kwargs["pk"])
        return conversation.messages.prefetch_related("scenarios").order_by("id")


# Days a usage query may name: the window's arithmetic (29 days back, one day on) stays inside Python's dates.
USAGE_FIRST_DAY, USAGE_LAST_DAY = datetime.date(1970, 1, 1), datetime.date(9999, 12, 30)


class UsageQuerySerializer(serializers.Serializer):
    start = serializers.DateField(required=False, help_text="First UTC day (YYYY-MM-DD); default: 29 days before end.")
    end = serializers.DateField(required=False, help_text="Last UTC day, inclusive; default: today.")

    def validate(self, attrs):
        for name in ("start", "end"):
            if attrs.get(name) and not USAGE_FIRST_DAY <= attrs[name] <= USAGE_LAST_DAY:
                raise serializers.ValidationError(
                    {name: f"{name} must be a day from {USAGE_FIRST_DAY} to {USAGE_LAST_DAY}."})
        if attrs.get("start") and attrs.get("end") and attrs["start"] > attrs["end"]:
            raise serializers.ValidationError({"start": "start must not be after end."})
        return attrs


class UsageView(APIView):
    """The caller's own usage (every key of the user it acts as): totals and per UTC day."""

    @extend_schema(parameters=[UsageQuerySerializer], responses={200: dict, 400: ERRORS[400], 401: ERRORS[401]})
    def get(self, request):
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        start, end = usage_window(start=query.validated_data.get("start"), end=query.validated_data.get("end"),
                                  today=timezone.now().date())
        return Response(usage_of_owner(user=request.user, start=start, end=end))

