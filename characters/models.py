"""Personas and system prompts that editors shape in the admin.

Character fields follow the Character Card V2 format so cards import and export without loss.
"""

from django.core.exceptions import ValidationError
from django.core.validators import FileExtensionValidator, MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from PIL import Image


# Avatars are pictures the chat page shows: image types browsers show as images (Pillow also opens PDF and EPS
# files, which would be served as such), and a size every visitor's browser can decode.
AVATAR_EXTENSIONS = ["png", "jpg", "jpeg", "gif", "webp"]
AVATAR_MAX_BYTES = 8 * 1024 * 1024
AVATAR_MAX_PIXELS = 25_000_000


def avatar_size_check(file) -> None:
    if file.size > AVATAR_MAX_BYTES:
        raise ValidationError(f"An avatar may be at most {AVATAR_MAX_BYTES // (1024 * 1024)} MB.")
    width, height = getattr(file, "width", None) or 0, getattr(file, "height", None) or 0
    if width * height > AVATAR_MAX_PIXELS:
        raise ValidationError(f"The picture is {width}×{height} pixels; an avatar may have at most "
                              f"{AVATAR_MAX_PIXELS:,}.")
    # An animation (GIF, APNG, WebP) is decoded frame after frame, in a loop: its frames count together.
    frames = _frame_count(file)
    if frames > 1 and width * height * frames > AVATAR_MAX_PIXELS:
        raise ValidationError(f"The picture has {frames} frames of {width}×{height} pixels; an avatar may have at "
                              f"most {AVATAR_MAX_PIXELS:,} pixels in all its frames.")


def _frame_count(file) -> int:
    """Frames of the picture (1 for a still one, or one Pillow cannot read: the form field refuses that), read as
    ImageFieldFile reads its dimensions: the file is left open or closed, and at its position, as it was."""
    close = getattr(file, "closed", False)
    try:
        file.open()
        position = file.tell()
        file.seek(0)
        try:
            with Image.open(file) as image:
                return int(getattr(image, "n_frames", 1) or 1)
        finally:
            file.seek(position)
    except Exception:  # not a picture: ImageField's own check says so
        return 1
    finally:
        if close:
            file.close()


class SystemPrompt(models.Model):
    name = models.CharField(max_length=100, unique=True, help_text="A short name editors recognise.")
    content = models.TextField(help_text="Instructions placed first in every prompt that uses this system prompt.")
    is_default = models.BooleanField(
        default=False,
        help_text="Used for characters without a system prompt of their own. Exactly one prompt is the "
        "default; with none, the system_prompt from config.yaml is used.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-is_default", "name"]
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=Q(is_default=True), name="one_default_system_prompt")
        ]

    def __str__(self):
        return f"{self.name} (default)" if self.is_default else self.name

    def clean(self):
        if not self.content or not self.content.strip():
            raise ValidationError({"content": "A system prompt needs some text."})
        if self.is_default:
            other = SystemPrompt.objects.filter(is_default=True).exclude(pk=self.pk).first()
            if other is not None:
                raise ValidationError(
                    {"is_default": f"“{other.name}” is already the default system prompt. "
                     "Untick it there first: only one prompt can be the default."}
                )


class Character(models.Model):
    name = models.CharField(max_length=100, help_text="The name the character answers to; replaces {{char}}.")
    slug = models.SlugField(
        max_length=100, unique=True, blank=True,
        help_text="Identifies the character in the API and URLs, e.g. 'captain-mira'. Letters, digits, - and _.",
    )
    description = models.TextField(
        blank=True,
        help_text="The profile: who the character is, looks, background. Always part of the prompt (may be "
                  "empty when the personality and setting say it all).",
    )
    personality = models.TextField(blank=True, help_text="A short summary of temperament and voice.")
    setting = models.TextField(
        blank=True, help_text="The standing situation of every chat (the card's 'scenario' field)."
    )
    greeting = models.TextField(blank=True, help_text="The character's first message in a new conversation.")
    alternate_greetings = models.JSONField(
        default=list, blank=True,
        help_text="Other first messages: the chat page lets users cycle through them; API clients pick one "
                  "with the request's 'greeting' (1 = the first alternate).",
    )
    example_dialogue = models.TextField(
        blank=True, help_text="Sample exchanges showing the voice; dropped first when the context is full."
    )
    named_system_prompt = models.ForeignKey(
        SystemPrompt, null=True, blank=True, on_delete=models.PROTECT, related_name="characters",
        verbose_name="named system prompt",
        help_text="The system prompt this character uses; empty uses the default one. A system prompt "
                  "in use cannot be deleted.",
    )
    system_prompt = models.TextField(
        blank=True, verbose_name="own system prompt",
        help_text="Replaces the named (or default) system prompt for this character when set; {{original}} "
                  "in it stands for that prompt.",
    )
    post_history_instructions = models.TextField(
        blank=True, help_text="Placed after the conversation, just before the reply (e.g. style reminders)."
    )
    tags = models.CharField(max_length=500, blank=True, help_text="Comma-separated, e.g. 'pirate, adventure'.")
    creator = models.CharField(max_length=200, blank=True)
    character_version = models.CharField(max_length=50, blank=True)
    creator_notes = models.TextField(blank=True, help_text="Notes for editors and users; never sent to the model.")
    scan_depth = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(1000)],
        verbose_name="lorebook scan depth",
        help_text="How many recent messages are searched for this character's scenario keywords; empty uses "
                  "SCENARIO_SCAN_DEPTH. A scenario's own scan depth wins.",
    )
    avatar = models.ImageField(upload_to="avatars/", blank=True, help_text="Shown in the chat page.",
                               validators=[FileExtensionValidator(AVATAR_EXTENSIONS), avatar_size_check])

    temperature = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)],
        help_text="Sampling default for this character (0–2); empty uses config.yaml.",
    )
    top_p = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Nucleus sampling default (0–1); empty uses config.yaml.",
    )
    repetition_penalty = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.5), MaxValueValidator(2.0)],
        help_text="Default repetition penalty (0.5–2, 1 = none); empty uses config.yaml.",
    )
    max_tokens = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(8192)],
        help_text="Default reply length limit in tokens; empty uses config.yaml.",
    )

    talkativeness = models.FloatField(
        default=0.5, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="In group chats: how likely the character speaks when no one is named (0–1, relative to the others).",
    )
    is_active = models.BooleanField(default=True, help_text="Inactive characters cannot be chatted with.")
    extensions = models.JSONField(
        default=dict, blank=True, help_text="Card extensions from other tools, kept untouched (JSON object)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name if self.is_active else f"{self.name} (inactive)"

    @property
    def tag_list(self) -> list[str]:
        return [tag.strip() for tag in self.tags.split(",") if tag.strip()]

    def clean(self):
        errors = {}
        if not self.slug or not self.slug.strip():
            errors["slug"] = "A slug is required: it names the character in the API (e.g. 'captain-mira')."
        if not self.name or not self.name.strip():
            errors["name"] = "A character needs a name."
        if not isinstance(self.alternate_greetings, list) or not all(
            isinstance(item, str) for item in self.alternate_greetings
        ):
            errors["alternate_greetings"] = "Alternate greetings must be a list of texts."
        if not isinstance(self.extensions, dict):
            errors["extensions"] = "Extensions must be a JSON object, e.g. {}."
        if errors:
            raise ValidationError(errors)


class ContentRevision(models.Model):
    """One row counting edits of prompt content (characters, scenarios, system prompts).

    Every process sees it (it lives in the database, not in a per-process cache), so a reply cached
    under an older number is never served again, whichever process made the edit.
    """

    number = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "content revision"


class CharacterGroup(models.Model):
    """Several characters sharing one conversation (SillyTavern's group chats), reusable across conversations."""

    class TurnMode(models.TextChoices):
        NATURAL = "natural", "Natural: a character named in the last message, else by talkativeness"
        ROUND_ROBIN = "round_robin", "All in turn, in member order"

    name = models.CharField(max_length=100, help_text="Shown in the group picker.")
    slug = models.SlugField(
        max_length=100, unique=True,
        help_text="Names the group in the API (the request's 'character'); must not be a character's slug.",
    )
    members = models.ManyToManyField(Character, through="GroupMember", related_name="character_groups")
    scenario = models.TextField(
        blank=True, help_text="The shared situation of the group's chats; replaces each member's own setting.",
    )
    turn_mode = models.CharField(max_length=16, choices=TurnMode.choices, default=TurnMode.NATURAL,
                                 help_text="Who speaks next when the client names no one.")
    is_active = models.BooleanField(default=True, help_text="Inactive groups cannot be chatted with.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def member_list(self) -> list[Character]:
        return [member.character for member in self.memberships.select_related("character").order_by("position", "id")]

    def clean(self):
        if self.slug and Character.objects.filter(slug=self.slug).exists():
            raise ValidationError({"slug": "A character has this slug: the API could not tell them apart."})


class GroupMember(models.Model):
    group = models.ForeignKey(CharacterGroup, on_delete=models.CASCADE, related_name="memberships")
    character = models.ForeignKey(Character, on_delete=models.PROTECT, related_name="group_memberships",
                                  help_text="Characters in a group cannot be deleted; remove them from it first.")
    position = models.PositiveIntegerField(default=0, help_text="The order of turns in “all in turn” mode.")

    class Meta:
        ordering = ["position", "id"]
        constraints = [models.UniqueConstraint(fields=["group", "character"], name="one_membership_per_character")]

    def __str__(self):
        return f"{self.character} in {self.group}"
