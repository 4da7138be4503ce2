"""Scenarios: pieces of context inserted into the prompt when a chat makes them relevant (lorebook entries)."""

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


def split_keywords(text: str) -> list[str]:
    return [word.strip() for word in (text or "").split(",") if word.strip()]


class Scenario(models.Model):
    class Position(models.TextChoices):
        # Character Card V2 lorebook positions.
        BEFORE_CHAR = "before_char", "Before the character's profile"
        AFTER_CHAR = "after_char", "After the profile, with the reply's context"

    title = models.CharField(max_length=200, help_text="A name editors recognise; not sent to the model.")
    content = models.TextField(help_text="The text inserted into the prompt when the scenario fires.")
    keywords = models.CharField(
        max_length=1000, blank=True,
        help_text="Comma-separated trigger words; one appearing in the chat makes the scenario a candidate.",
    )
    secondary_keywords = models.CharField(
        max_length=1000, blank=True,
        help_text="Optional, comma-separated: when set, one of these must appear too.",
    )
    always_on = models.BooleanField(default=False, help_text="Always a candidate, whatever the chat says.")
    priority = models.IntegerField(default=100, help_text="Higher first when several scenarios fire.")
    enabled = models.BooleanField(default=True, help_text="Disabled scenarios never fire.")
    case_sensitive = models.BooleanField(default=False, help_text="Match keywords with exact case.")
    whole_words = models.BooleanField(default=True, help_text="Match keywords only as whole words.")
    scan_depth = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text="How many recent messages are searched for the keywords; empty uses the character's "
                  "lorebook scan depth, else SCENARIO_SCAN_DEPTH.",
    )
    position = models.CharField(
        max_length=16, choices=Position.choices, default=Position.AFTER_CHAR,
        help_text="Where the text goes in the prompt. Before the profile changes the prompt's first message, "
                  "so the model re-reads it whenever the scenario comes or goes (slower).",
    )
    character = models.ForeignKey(
        "characters.Character", null=True, blank=True, on_delete=models.CASCADE, related_name="scenarios",
        help_text="Only for this character; empty makes the scenario global.",
    )
    extensions = models.JSONField(
        default=dict, blank=True, help_text="Lorebook entry data from other tools, kept untouched."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "title"]

    def __str__(self):
        owner = self.character.name if self.character_id else "global"
        return f"{self.title} ({owner})"

    @property
    def keyword_list(self) -> list[str]:
        return split_keywords(self.keywords)

    @property
    def secondary_keyword_list(self) -> list[str]:
        return split_keywords(self.secondary_keywords)

    def clean(self):
        errors = {}
        if not self.title or not self.title.strip():
            errors["title"] = "A scenario needs a title."
        if not self.content or not self.content.strip():
            errors["content"] = "A scenario needs content: it is what gets inserted into the prompt."
        if not self.always_on and not self.keyword_list:
            errors["keywords"] = "Add at least one keyword, or tick “always on”: otherwise this scenario never fires."
        if not isinstance(self.extensions, dict):
            errors["extensions"] = "Extensions must be a JSON object, e.g. {}."
        if errors:
            raise ValidationError(errors)
