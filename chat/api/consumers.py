"""WebSocket chat: ws/chat/<character>/ streams a reply's tokens as JSON events.

Client sends {"type": "message", "content": "...", optional "conversation" (null: a new one),
"greeting" (which greeting a new one opens with), "max_tokens", "temperature", "top_p", "seed",
"stop", "speaker" (a group chat's member who replies)}; <character> may be a group's slug. The server
answers {"type": "start"} (with "speaker" in a group chat), {"type": "token", "text"}..., {"type": "end",
finish_reason, usage, scenarios, conversation} or {"type": "error", "status", "error"}.
{"type": "new_conversation"} makes the next message start a new conversation (answered
{"type": "new_conversation"}). Each message spends the sender's rate limit like an HTTP request
(429 error event with retry_after), and each reply is admitted under the sender's quotas like one
(chat/tenancy/quotas.py: a 429 error event with retry_after). A frame over API_MAX_REQUEST_BYTES gets
a 413 error event before it is parsed; the socket stays open. Closing the socket cancels the generation. Auth:
chat/api/ws_auth.py.
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from rest_framework.exceptions import Throttled, ValidationError

from chat.errors import PayloadTooLarge, error_from_exception
from chat.replies import end_fields, reply_stream, speaker_of
from chat.selectors import user_display_name
from chat.services import chat_stream_start

from .serializers import ChatCompletionRequestSerializer
from .throttling import identity_of, rate_limit_wait
from .ws_auth import CLOSE_UNAUTHENTICATED

logger = logging.getLogger("llmsite.ws")

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "speaker")  # speaker: a group chat's member
NEW_CONVERSATION = "new_conversation"


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.character_slug = self.scope["url_route"]["kwargs"]["character"]
        self.conversation_id = None
        self.reply_task: asyncio.Task | None = None
        await self.accept()

    async def disconnect(self, code):
        task = getattr(self, "reply_task", None)
        if task is not None and not task.done():
            task.cancel()  # reply_stream's cleanup cancels the generation

    async def receive_json(self, content, **kwargs):
        if isinstance(content, dict) and content.get("type") == NEW_CONVERSATION:
            if self.reply_task is not None and not self.reply_task.done():
                self.reply_task.cancel()  # the unfinished reply belongs to the old conversation
            self.conversation_id = None
            await self.send_json({"type": NEW_CONVERSATION})
            return
        if not isinstance(content, dict) or content.get("type") != "message":
            await self.send_error(ValidationError({"type": "send {\"type\": \"message\", \"content\": \"...\"}."}))
            return
        if self.reply_task is not None and not self.reply_task.done():
            await self.send_error(ValidationError({"content": "wait for the current reply to finish."}))
            return
        wait = await sync_to_async(rate_limit_wait)(self.rate_identity())
        if wait is not None:
            await self.send_error(Throttled(wait=wait), retry_after=int(wait) + 1)
            return
        self.reply_task = asyncio.create_task(self.reply(content))

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if frame_too_large(text_data, bytes_data):  # refused before it is parsed, like an HTTP body
            limit = settings.API_MAX_REQUEST_BYTES
            await self.send_error(PayloadTooLarge(f"A message may be at most {limit:,} bytes (API_MAX_REQUEST_BYTES).",
                                                  param="message"))
            return
        try:
            await super().receive(text_data=text_data, bytes_data=bytes_data, **kwargs)
        except ValueError:  # not JSON
            await self.send_error(ValidationError({"message": "each message must be a JSON object."}))

    async def reply(self, content: dict):
        try:
            payload = {"messages": [{"role": "user", "content": content.get("content")}],
                       "character": self.character_slug,
                       # An explicit null starts a new conversation; leaving the key out continues this socket's.
                       "conversation": content["conversation"] if "conversation" in content else self.conversation_id,
                       **{key: content[key] for key in SAMPLING_KEYS if key in content}}
            if "greeting" in content:
                payload["greeting"] = content["greeting"]
            record, generation = await sync_to_async(self.start)(payload)
            # The same scenario objects ({id, title, reason}) as the end event and the HTTP API.
            start = {"type": "start", "conversation": self.conversation_id,
                     "scenarios": record.plan.prompt.scenarios_used}
            if record.plan.members:  # a group chat: who is replying
                start["speaker"] = speaker_of(record.plan.character)
            await self.send_json(start)
            async for kind, value in reply_stream(record, generation):
                if kind == "delta":
                    await self.send_json({"type": "token", "text": value})
                elif kind == "end":
                    self.conversation_id = str(record.conversation.pk) if record.conversation else None
                    await self.send_json({"type": "end", "text": record.completion.text, **end_fields(record)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.send_error(exc)

    def start(self, payload: dict):
        serializer = ChatCompletionRequestSerializer(data=payload)
        serializer.is_valid(raise_exception=True)
        user = self.scope["user"]
        return chat_stream_start(user=user, api_key=self.scope.get("api_key"), data=serializer.validated_data,
                                 user_name=user_display_name(user))

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
