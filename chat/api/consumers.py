"""WebSocket chat: ws/chat/<character>/ streams replies as JSON events and runs the conversation's tree
operations.

Client messages (each a JSON object with a "type"):
- {"type": "message", "content", optional "conversation" (null: a new one), "greeting" (which greeting a new
  one opens with), "max_tokens", "temperature", "top_p", "seed", "stop", "on_disconnect", "speaker" (a group
  chat's member who replies; <character> may be a group's slug)}: a reply;
- {"type": "regenerate", "message", optional "n" and sampling}: new alternatives of a reply;
- {"type": "edit", "message", "content"}: a user message edited, answered at once (a new branch);
- {"type": "continue", "message"}: a reply extended;
- {"type": "select", "message"} / {"type": "delete", "message"}: show that branch / delete that subtree,
  answered {"type": "path", ...} (the active path, as GET /v1/conversations/<id>/path/);
- {"type": "stop"}: stop the running reply (kept, marked stopped); answered by its end event;
- {"type": "attach", "conversation"}: follow the conversation (after a reconnect): its running reply is
  streamed from its text so far ("start" with "resumed": true), or {"type": "idle"} when none runs;
- {"type": "new_conversation"}: the next message starts a new conversation (answered in kind);
- {"type": "delete_conversation"}: the whole conversation deleted (the owner's; 409 while a reply runs), answered
  {"type": "conversation_deleted", "conversation"}; the socket's next message then starts a new one.
The operations act on the socket's conversation unless the message names one ("conversation").

A user holds at most WS_MAX_CONNECTIONS_PER_USER sockets in one process; the next handshake is closed with 4429.

A reply is answered {"type": "start", kind, conversation, text (so far, per choice), ...}, {"type": "token",
"index", "text"}..., then {"type": "end", text, finish_reason, usage, scenarios, conversation, messages,
stopped} or {"type": "error", "status", "error"}. Each generating message spends the sender's rate limit
like an HTTP request and each reply is admitted under the sender's quotas (429 error event with
retry_after); so does every other operation but new_conversation. Before each operation the socket's key or
session is checked again (chat/api/ws_auth.py): no longer valid, the socket gets a 401 error event and is closed
with 4401. Each operation's blocking work (database, prompt composition) runs in a thread of its own, as each
HTTP request's does, so that one socket's slow operation never holds up another's. A frame over
API_MAX_REQUEST_BYTES gets a 413 error event before it is parsed. While the
instance drains (SIGTERM) a generating message gets a 503 error event, code "draining", and the socket is
closed with 1012 (service restart): the client reconnects to another instance; running replies go on.

Closing the socket (or the page) does not end a reply: it goes on, for at most REPLY_DETACHED_SECONDS, and
is stored (chat/trees/running.py); a message with "on_disconnect": "cancel" is cancelled instead. Auth:
chat/api/ws_auth.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from contextlib import aclosing

from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from rest_framework.exceptions import AuthenticationFailed, Throttled, ValidationError

from chat.engines import DRAIN_RETRY_AFTER_SECONDS, is_draining
from chat.errors import PayloadTooLarge, RateLimited, ServiceUnavailable, error_from_exception
from chat.selectors import user_display_name
from llmsite.strict_json import StrictJSONError, strict_json_loads
from chat.trees.operations import (chat_reply_run, conversation_delete, message_delete, message_edit,
                                   message_select, reply_continue, reply_regenerate, reply_stop, running_reply_of)
from chat.trees.running import CANCEL, KEEP

from .conversation_ops import EditRequestSerializer, RegenerateRequestSerializer, ReplyRequestSerializer, path_body, \
    run_events
from .read_budget import ReadBudget
from .serializers import ChatCompletionRequestSerializer
from .throttling import identity_of, rate_limit_wait
from .ws_auth import CLOSE_UNAUTHENTICATED, credentials_now

logger = logging.getLogger("llmsite.ws")

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "speaker")  # speaker: a group chat's member
NEW_CONVERSATION = "new_conversation"
GENERATING = ("message", "regenerate", "edit", "continue")
OPERATIONS = (*GENERATING, "select", "delete", "stop", "attach", NEW_CONVERSATION, "delete_conversation")
CLOSE_SERVICE_RESTART = 1012  # RFC 6455: the server is restarting; a client reconnects (to another instance)
CLOSE_TOO_MANY_CONNECTIONS = 4429
_open_sockets: Counter = Counter()  # user pk -> sockets open in this process (the event loop's thread only)
_read_budgets: dict = {}  # user pk -> ReadBudget (the event loop's thread only)


def _forget_full_budgets() -> None:
    """Drop the budgets of users with no socket open whose buckets are full again: they owe nothing."""
    for user_pk in [pk for pk, budget in _read_budgets.items() if pk not in _open_sockets and budget.full()]:
        del _read_budgets[user_pk]


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        limit = settings.WS_MAX_CONNECTIONS_PER_USER
        if limit and _open_sockets[user.pk] >= limit:
            await self.close(code=CLOSE_TOO_MANY_CONNECTIONS)
            return
        _open_sockets[user.pk] += 1
        self.counted_user = user.pk
        self.character_slug = self.scope["url_route"]["kwargs"]["character"]
        self.conversation_id = None
        self.watch_task: asyncio.Task | None = None  # streams the reply this socket follows
        self.run = None
        await self.accept()

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:  # however the socket ends (a disconnect, an error), its place is given back
            counted = getattr(self, "counted_user", None)
            if counted is not None:
                _open_sockets[counted] -= 1
                if _open_sockets[counted] <= 0:
                    del _open_sockets[counted]
                    # The budget stays (a reconnect must not get a fresh burst), until it has filled up again.
                    _forget_full_budgets()

    async def disconnect(self, code):
        self.unwatch()  # the reply itself goes on (or is cancelled, if it asked for that): chat/trees/running.py

    def unwatch(self) -> None:
        task = getattr(self, "watch_task", None)
        if task is not None and not task.done():
            task.cancel()

    @property
    def watching(self) -> bool:
        return self.watch_task is not None and not self.watch_task.done()

    async def receive_json(self, content, **kwargs):
        kind = content.get("type") if isinstance(content, dict) else None
        if kind not in OPERATIONS:
            await self.send_error(ValidationError({"type": "send {\"type\": \"message\", \"content\": \"...\"} (or one "
                                                           f"of {', '.join(OPERATIONS[1:])})."}))
            return
        # The operation's sync_to_async calls get a thread of their own, as each HTTP request's do: without it,
        # every socket of the process shares one thread, and one socket's slow operation stalls them all.
        async with ThreadSensitiveContext():
            await self.operate(kind, content)

    async def operate(self, kind: str, content: dict):
        if not await self.credentials_still_valid():
            return
        if kind == NEW_CONVERSATION:
            self.unwatch()  # the unfinished reply belongs to the old conversation (and is still stored)
            self.conversation_id = None
            await self.send_json({"type": NEW_CONVERSATION})
            return
        if kind in GENERATING:
            if is_draining():
                await self.send_error(ServiceUnavailable("This instance is shutting down; reconnect and retry.",
                                                         code="draining"), retry_after=DRAIN_RETRY_AFTER_SECONDS)
                await self.close(code=CLOSE_SERVICE_RESTART)
                return
            if self.watching:
                await self.send_error(ValidationError({"content": "wait for the current reply to finish."}))
                return
        wait = await database_sync_to_async(rate_limit_wait)(self.rate_identity())
        if wait is not None:
            await self.send_error(Throttled(wait=wait), retry_after=int(wait) + 1)
            return
        try:
            await getattr(self, f"do_{kind}")(content)
        except Exception as exc:
            await self.send_error(exc)

    async def credentials_still_valid(self) -> bool:
        """Check the socket's key or session again (a revoked key must not go on); closes the socket if invalid."""
        credentials = await database_sync_to_async(credentials_now)(self.scope)
        if credentials is None:
            await self.send_error(AuthenticationFailed("The socket's API key or session is no longer valid "
                                                       "(revoked, expired or logged out)."))
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return False
        self.scope["user"], self.scope["api_key"] = credentials  # fresh: a key's quotas changed meanwhile apply
        return True

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if frame_too_large(text_data, bytes_data):  # refused before it is parsed, like an HTTP body
            limit = settings.API_MAX_REQUEST_BYTES
            await self.send_error(PayloadTooLarge(f"A message may be at most {limit:,} bytes (API_MAX_REQUEST_BYTES).",
                                                  param="message"))
            return
        size = len(text_data.encode("utf-8", "surrogatepass")) if text_data is not None else len(bytes_data or b"")
        budget = _read_budgets.setdefault(self.counted_user, ReadBudget(
            rate=settings.WS_READ_BYTES_PER_SECOND, burst=settings.API_MAX_REQUEST_BYTES))
        if not budget.take(size):  # dropped unread: parsing runs on the loop every socket and stream shares
            wait = budget.seconds_until(size)
            await self.send_error(RateLimited(
                f"Too many bytes sent: at most {settings.WS_READ_BYTES_PER_SECOND:,} a second "
                "(WS_READ_BYTES_PER_SECOND); this message was dropped unread.", param="message",
                retry_after=int(wait) + 1))
            return
        try:
            await super().receive(text_data=text_data, bytes_data=bytes_data, **kwargs)
        except StrictJSONError as exc:  # read as strictly as an HTTP body
            await self.send_error(ValidationError({"message": f"each message must be a JSON object; this one "
                                                              f"is not valid JSON: {exc}."}))
        except ValueError:  # a binary or empty frame
            await self.send_error(ValidationError({"message": "each message must be a JSON object."}))

    @classmethod
    async def decode_json(cls, text_data):
        return strict_json_loads(text_data)

    # -- the operations ------------------------------------------------------------------------------

    async def do_message(self, content: dict):
        payload = {"messages": [{"role": "user", "content": content.get("content")}],
                   "character": self.character_slug,
                   # An explicit null starts a new conversation; leaving the key out continues this socket's.
                   "conversation": content["conversation"] if "conversation" in content else self.conversation_id,
                   **{key: content[key] for key in SAMPLING_KEYS if key in content}}
        if "greeting" in content:
            payload["greeting"] = content["greeting"]
        on_disconnect = self.on_disconnect_of(content)
        run = await database_sync_to_async(self.start_message)(payload, on_disconnect)
        self.watch(run)

    def start_message(self, payload: dict, on_disconnect: str):
        serializer = ChatCompletionRequestSerializer(data=payload)
        serializer.is_valid(raise_exception=True)
        user = self.scope["user"]
        return chat_reply_run(user=user, api_key=self.scope.get("api_key"), data=serializer.validated_data,
                              user_name=user_display_name(user), on_disconnect=on_disconnect)

    async def do_regenerate(self, content: dict):
        await self.start_operation(reply_regenerate, RegenerateRequestSerializer, content)

    async def do_edit(self, content: dict):
        await self.start_operation(message_edit, EditRequestSerializer, content)

    async def do_continue(self, content: dict):
        await self.start_operation(reply_continue, ReplyRequestSerializer, content)

    async def start_operation(self, operation, serializer_class, content: dict):
        def start():
            fields = {key: value for key, value in content.items() if key not in ("type", "message", "conversation")}
            serializer = serializer_class(data=fields)
            serializer.is_valid(raise_exception=True)
            data = dict(serializer.validated_data)
            data.pop("stream", None)
            on_disconnect = data.pop("on_disconnect", KEEP)
            extra = {"content": data.pop("content")} if "content" in data else {}
            return operation(user=self.scope["user"], api_key=self.scope.get("api_key"),
                             conversation_id=self.conversation_of(content), message_id=self.message_of(content),
                             data=data, on_disconnect=on_disconnect, **extra)

        self.watch(await database_sync_to_async(start)())

    async def do_select(self, content: dict):
        await self.send_path(message_select, content)

    async def do_delete(self, content: dict):
        await self.send_path(message_delete, content)

    async def send_path(self, operation, content: dict):
        def run():
            conversation = operation(user=self.scope["user"], conversation_id=self.conversation_of(content),
                                     message_id=self.message_of(content))
            return path_body(conversation)

        await self.send_json({"type": "path", **await database_sync_to_async(run)()})

    async def do_delete_conversation(self, content: dict):
        conversation_id = self.conversation_of(content)
        await database_sync_to_async(conversation_delete)(user=self.scope["user"], conversation_id=conversation_id)
        if conversation_id == self.conversation_id:
            self.conversation_id = None
        # Only a run of the deleted conversation is no longer followed (one that ended as it was deleted): the
        # socket may be following another's reply, e.g. a new conversation's first one, which goes on.
        if self.watching and self.run.conversation_id == conversation_id:
            self.unwatch()
        await self.send_json({"type": "conversation_deleted", "conversation": conversation_id})

    async def do_stop(self, content: dict):
        if not content.get("conversation") and self.watching and self.run.conversation_id is None:
            self.run.stop()  # a reply that is never stored (no conversation): only this socket knows it
            return
        # The reply this socket follows, unless the message names a conversation (a new conversation's first
        # reply has its id before the conversation is stored).
        followed = self.run.conversation_id if self.watching else None
        conversation_id = self.conversation_of(content) if content.get("conversation") else (
            followed or self.conversation_of(content))
        stopped = await database_sync_to_async(reply_stop)(user=self.scope["user"], conversation_id=conversation_id)
        if not self.watching:  # another socket streams it: its end event goes there
            await self.send_json({"type": "stopped", "conversation": stopped.conversation_id})

    async def do_attach(self, content: dict):
        conversation_id = self.conversation_of(content)
        run = await database_sync_to_async(running_reply_of)(user=self.scope["user"], conversation_id=conversation_id)
        self.unwatch()
        self.conversation_id = str(conversation_id)
        if run is None or run.finished.is_set():
            await self.send_json({"type": "idle", "conversation": self.conversation_id})
            return
        self.watch(run, resumed=True)

    # -- following a reply ---------------------------------------------------------------------------

    def watch(self, run, *, resumed: bool = False) -> None:
        self.run = run
        self.watch_task = asyncio.create_task(self.stream(run, resumed=resumed))

    async def stream(self, run, *, resumed: bool):
        try:
            # Closed however the task ends (a cancel may come while sending): the run loses this listener at once.
            async with aclosing(run_events(run, resumed=resumed, viewer=self.scope["user"].pk)) as events:
                async for event in events:
                    if event["type"] == "keepalive":
                        continue
                    if event["type"] == "end" and event["conversation"]:
                        self.conversation_id = event["conversation"]
                    await self.send_json(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.send_error(exc)

    def conversation_of(self, content: dict):
        conversation = content.get("conversation") or self.conversation_id
        if not conversation:
            raise ValidationError({"conversation": "no conversation: send its id."})
        try:
            return str(uuid.UUID(conversation))
        except (TypeError, ValueError, AttributeError):  # not a string, or not a UUID
            raise ValidationError({"conversation": "must be a conversation's id (a UUID)."}) from None

    @staticmethod
    def message_of(content: dict) -> int:
        message = content.get("message")
        if not isinstance(message, int) or isinstance(message, bool):
            raise ValidationError({"message": "the message's id (an integer) is required."})
        return message

    @staticmethod
    def on_disconnect_of(content: dict) -> str:
        value = content.get("on_disconnect", KEEP)
        if value not in (KEEP, CANCEL):
            raise ValidationError({"on_disconnect": f"must be {KEEP!r} or {CANCEL!r}."})
        return value

    def rate_identity(self) -> str:
        client = self.scope.get("client") or ("-", 0)
        return identity_of(api_key=self.scope.get("api_key"), user=self.scope.get("user"), address=client[0])

    async def send_error(self, exc: Exception, **extra):
        status, body, headers = error_from_exception(exc)
        if "Retry-After" in headers:  # a quota or overload: when to try again, as HTTP's header says
            extra.setdefault("retry_after", int(headers["Retry-After"]))
        await self.send_json({"type": "error", "status": status, **body, **extra})


def frame_too_large(text_data: str | None, bytes_data: bytes | None) -> bool:
    """Whether a frame is over API_MAX_REQUEST_BYTES (in UTF-8 bytes, as an HTTP body is counted)."""
    limit = settings.API_MAX_REQUEST_BYTES
    if bytes_data is not None:
        return len(bytes_data) > limit
    if text_data is None or len(text_data) * 4 <= limit:  # a character is at most 4 bytes
        return False
    return len(text_data) > limit or len(text_data.encode("utf-8", "surrogatepass")) > limit
