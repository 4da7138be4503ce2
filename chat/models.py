"""Server-side chat history: conversations with a character, and their messages."""

import secrets
import threading
import time
import uuid

from django.conf import settings
from django.db import models

# Message ids follow creation (the tree and the Responses API sort by them) but count nothing: a database
# sequence handed every tenant the number of messages written by everyone between two of its own. They are
# milliseconds since 2026 with 12 random bits below, never lower than this process's last one, and stay below
# 2**53 (exact in JavaScript) until 2095.
EPOCH_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC
RANDOM_BITS = 12
ID_ATTEMPTS = 5  # ids drawn for one message before a collision is an error

_message_id_lock = threading.Lock()
_last_message_id = 0


def new_message_id() -> int:
    global _last_message_id
    milliseconds = time.time_ns() // 1_000_000 - EPOCH_MS
    candidate = (milliseconds << RANDOM_BITS) | secrets.randbelow(1 << RANDOM_BITS)
    with _message_id_lock:
        _last_message_id = max(candidate, _last_message_id + 1)
        return _last_message_id


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    character = models.ForeignKey(
        "characters.Character", on_delete=models.PROTECT, related_name="conversations",
        help_text="Characters with conversations cannot be deleted; deactivate them instead.",
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations",
        help_text="Only the owner can read or continue the conversation.",
    )
    title = models.CharField(max_length=200, blank=True, help_text="Shown in the list of past conversations.")
    user_name = models.CharField(max_length=100, default="User", help_text="Replaces {{user}} in prompts.")
    group = models.ForeignKey(
        "characters.CharacterGroup", null=True, blank=True, on_delete=models.PROTECT, related_name="conversations",
        help_text="A group conversation: its characters take turns (the members are copied into `members`).",
    )
    members = models.ManyToManyField(
        "characters.Character", blank=True, related_name="group_conversations",
        help_text="The characters of a group conversation (a group's, or an ad hoc set); empty: only `character`.",
    )
    participants = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="joined_conversations",
        help_text="Other users who may read and write into this conversation besides its owner.",
    )
    active = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The leaf of the branch shown and continued: the model sees the path from the root to it.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self):
        return self.title or f"Chat with {self.character.name} ({self.created_at:%Y-%m-%d %H:%M})"


class Invitation(models.Model):
    """An owner's invitation to a conversation, addressed to a username and stored whether or not such a user
    exists: the owner learns nothing about other accounts, and nobody joins a conversation without accepting."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="invitations")
    username = models.CharField(max_length=150, help_text="The username the owner wrote (shown to the owner).")
    invitee = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="invitations",
        help_text="The active user who held the username when invited; only they may accept. Empty: nobody "
                  "(no such user then, or deleted since), though the owner sees it pending like any other.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["conversation", "username"], name="one_invitation_per_user")]

    def __str__(self):
        return f"{self.username} to {self.conversation_id}"


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system", "System"
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

    id = models.BigIntegerField(primary_key=True, default=new_message_id, editable=False,
                                help_text="Ordered like creation, but no sequence (new_message_id).")
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children",
        help_text="The message this one answers or follows; siblings are alternatives (swipes, edits). "
                  "Deleting a message deletes its subtree.",
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField()
    speaker = models.ForeignKey(
        "characters.Character", null=True, blank=True, on_delete=models.PROTECT, related_name="spoken_messages",
        help_text="In a group conversation, the character that wrote this reply; empty: the conversation's character. "
                  "Characters that spoke cannot be deleted (their lines would change hands); deactivate them instead.",
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="authored_messages",
        help_text="The user who wrote this message (several humans may write into one group conversation).",
    )
    prompt_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tokens of the prompt that produced this reply (assistant messages)."
    )
    completion_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tokens of this message's text as the model counts them."
    )
    finish_reason = models.CharField(max_length=16, blank=True,
                                     help_text="Why generation stopped: stop, length, or cancelled (see stopped).")
    stopped = models.BooleanField(default=False, help_text="The reply was stopped before its end (by its owner, or "
                                  "when its client stayed away too long); the text is what had been generated.")
    model_name = models.CharField(max_length=100, blank=True, help_text="The model that wrote this reply.")
    scenarios = models.ManyToManyField(
        "scenarios.Scenario", blank=True, related_name="messages",
        help_text="Scenarios that were inserted into the prompt for this reply.",
    )
    world_info_state = models.JSONField(
        default=dict, blank=True,
        help_text="World Info timed effects (sticky, cooldown) after this reply, keyed by scenario id and the "
                  "message count at which each fired (scenarios/world_info.py). The next reply on this branch "
                  "reads them from the nearest reply on its path, so branches keep their own.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Ids grow within a conversation (save), so they order its messages even when two share a timestamp.
        ordering = ["id"]

    def save(self, *args, **kwargs):
        """A new message's id is above every id of its conversation (the tree, the Responses API's numbering and
        its deletes read order from ids, whatever the clocks of the hosts that wrote them), and another id is
        drawn if it is taken (another process, the same millisecond and random bits)."""
        if not self._state.adding:
            return super().save(*args, **kwargs)
        from django.db import IntegrityError, transaction
        from django.db.models import Max

        for attempt in range(ID_ATTEMPTS):
            highest = Message.objects.filter(conversation_id=self.conversation_id).aggregate(top=Max("id"))["top"]
            if attempt or (highest is not None and self.id <= highest):
                self.id = max(new_message_id(), (highest or 0) + 1 + secrets.randbelow(1 << RANDOM_BITS))
            try:
                with transaction.atomic():  # a savepoint: a taken id leaves the caller's transaction usable
                    return super().save(*args, force_insert=True, **{k: v for k, v in kwargs.items()
                                                                     if k != "force_insert"})
            except IntegrityError:
                if attempt == ID_ATTEMPTS - 1 or not Message.objects.filter(pk=self.id).exists():
                    raise  # not the id: another constraint

    def __str__(self):
        preview = self.content if len(self.content) <= 60 else self.content[:57] + "..."
        return f"{self.get_role_display()}: {preview}"


class ApiKey(models.Model):
    """A key for the REST API. Only a SHA-256 hash is stored; the key itself is shown once."""

    name = models.CharField(max_length=100, help_text="What the key is for, e.g. 'mobile app'.")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys",
        help_text="Requests with this key act as this user: they see only this user's conversations, jobs and "
                  "cached replies (shared with the user's other keys).",
    )
    prefix = models.CharField(max_length=16, editable=False, help_text="The key's first characters, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    revoked_at = models.DateTimeField(null=True, blank=True, help_text="Set by the 'revoke' action; revoked keys fail.")
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Quotas (chat/tenancy/quotas.py): empty takes the setting named in the help text; 0 is no limit.
    max_concurrent = models.PositiveIntegerField(
        null=True, blank=True, help_text="Generations this key may run at once. Empty: API_KEY_MAX_CONCURRENT; 0: no limit.")
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Prompt + completion tokens per minute. Empty: API_KEY_TOKENS_PER_MINUTE; 0: no limit.")
    tokens_per_day = models.PositiveIntegerField(
        null=True, blank=True, help_text="Prompt + completion tokens per UTC day. Empty: API_KEY_TOKENS_PER_DAY; 0: no limit.")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self):
        state = " (revoked)" if self.revoked_at else ""
        return f"{self.name} ({self.prefix}…){state}"


class Job(models.Model):
    """A chat completion generated in the background by a Celery worker."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs",
                                help_text="The key that created the job. The job belongs to its owner: any key acting as "
                                          "that user can read or cancel it.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    request = models.JSONField(help_text="The chat completion request as the client sent it.")
    result = models.JSONField(null=True, blank=True, help_text="The chat.completion object when done.")
    error = models.JSONField(null=True, blank=True, help_text="The error object when failed.")
    completion_tokens = models.PositiveIntegerField(default=0, help_text="Tokens generated so far.")
    partial_text = models.TextField(blank=True, help_text="The reply so far, while running.")
    attempts = models.PositiveIntegerField(default=0)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(help_text="After this the job and its result are gone.")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"Job {self.pk} ({self.status})"


class UsageRecord(models.Model):
    """One generation as the usage ledger counts it, written once when the generation ends (chat/tenancy/)."""

    class Outcome(models.TextChoices):
        COMPLETED = "completed", "Completed"
        LENGTH = "length", "Stopped at max_tokens"
        CANCELLED = "cancelled", "Cancelled"
        FAILED = "failed", "Failed"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records",
                              help_text="The user the request acted as.")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records",
                                help_text="Empty: a browser session, or a key since deleted.")
    model = models.CharField(max_length=100)
    character = models.ForeignKey("characters.Character", null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="usage_records", help_text="Empty: no character (plain completions).")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0,
                                                    help_text="Tokens generated, also those of a cancelled reply.")
    duration = models.FloatField(default=0, help_text="Seconds from admission to the end of the generation.")
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    end_user = models.CharField(max_length=256, blank=True,
                                help_text="The request's `user`: an opaque id of the client's end user (never shown "
                                          "to the model).")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "created_at"]), models.Index(fields=["api_key", "created_at"])]

    def __str__(self):
        return f"{self.model} for {self.owner_id}: {self.prompt_tokens}+{self.completion_tokens} ({self.outcome})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
