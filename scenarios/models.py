"""Scenarios: pieces of context inserted into the prompt when a chat makes them relevant (lorebook entries)."""

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from .keys import is_regex_key, regex_key_error, split_keywords


class Scenario(models.Model):
    class Position(models.TextChoices):
        # Character Card V2 lorebook positions.
        BEFORE_CHAR = "before_char", "Before the character's profile"
        AFTER_CHAR = "after_char", "After the profile, with the reply's context"
        # SillyTavern World Info positions.
        BEFORE_EXAMPLES = "before_examples", "Before the example dialogue"
        AFTER_EXAMPLES = "after_examples", "After the example dialogue"
        AT_DEPTH = "at_depth", "In the chat history, at a depth, as a message of the chosen role"

    class SelectiveLogic(models.IntegerChoices):
        # SillyTavern's selectiveLogic numbers, kept for import and export.
        AND_ANY = 0, "AND ANY: one of the secondary keywords appears"
        NOT_ALL = 1, "NOT ALL: not every secondary keyword appears"
        NOT_ANY = 2, "NOT ANY: none of the secondary keywords appears"
        AND_ALL = 3, "AND ALL: every secondary keyword appears"

    class Role(models.TextChoices):
        SYSTEM = "system", "System"
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

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
    selective_logic = models.PositiveSmallIntegerField(
        choices=SelectiveLogic.choices, default=SelectiveLogic.AND_ANY,
        help_text="How the secondary keywords decide, once a keyword appeared (no effect without secondary ones).",
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
    depth = models.PositiveIntegerField(
        default=4, validators=[MaxValueValidator(1000)],
        help_text="For “at depth”: how many chat messages come after the inserted one (0 = after the newest).",
    )
    depth_role = models.CharField(
        max_length=16, choices=Role.choices, default=Role.SYSTEM,
        help_text="For “at depth”: the role of the inserted message.",
    )
    probability = models.PositiveSmallIntegerField(
        default=100, validators=[MaxValueValidator(100)],
        help_text="Chance in percent that the scenario fires when triggered (100 = always).",
    )
    inclusion_group = models.CharField(
        max_length=200, blank=True,
        help_text="Comma-separated group names: of the scenarios of one group that fire together, only one is "
                  "inserted (a sticky one, else the highest-priority one with “prioritize”, else one by weight).",
    )
    group_weight = models.PositiveIntegerField(
        default=100, validators=[MinValueValidator(1)],
        help_text="The chance to win the inclusion group, relative to the others' weights.",
    )
    group_prioritize = models.BooleanField(
        default=False, help_text="Win the inclusion group by priority instead of by weight.",
    )
    sticky = models.PositiveIntegerField(
        default=0, help_text="Once fired, stays inserted for this many further messages of the conversation.",
    )
    cooldown = models.PositiveIntegerField(
        default=0, help_text="Once fired (and after its sticky messages), cannot fire for this many messages.",
    )
    delay = models.PositiveIntegerField(
        default=0, help_text="Cannot fire before the conversation holds this many messages.",
    )
    exclude_recursion = models.BooleanField(
        default=False, verbose_name="cannot be triggered by others",
        help_text="Only the chat's messages fire it, never the text of other scenarios.",
    )
    prevent_recursion = models.BooleanField(
        default=False, verbose_name="never triggers others",
        help_text="Its text is not searched for other scenarios' keywords.",
    )
    character_filter = models.CharField(
        max_length=1000, blank=True,
        help_text="Comma-separated character names or slugs: the scenario fires only in their chats "
                  "(or, with “exclude”, never in them). Empty: every character.",
    )
    character_filter_exclude = models.BooleanField(
        default=False, help_text="The character filter names the characters the scenario never fires for.",
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
    def group_list(self) -> list[str]:
        return split_keywords(self.inclusion_group)

    @property
    def character_filter_list(self) -> list[str]:
        return split_keywords(self.character_filter)

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
        for keyword in self.keyword_list + self.secondary_keyword_list:
            if is_regex_key(keyword) and regex_key_error(keyword):
                errors.setdefault("keywords", f"Keyword {keyword} is not a valid regular expression: "
                                              f"{regex_key_error(keyword)}.")
        if not isinstance(self.extensions, dict):
            errors["extensions"] = "Extensions must be a JSON object, e.g. {}."
        if errors:
            raise ValidationError(errors)
