"""Importing and exporting Character Cards: the database side of characters/cards.py."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils.text import slugify

from scenarios.models import Scenario

from .cards import (
    CardError,
    card_data_from_character,
    card_json_bytes,
    card_png_bytes,
    card_read,
    character_fields_from_card,
    png_without_card,
    scenario_fields_from_entry,
)
from .models import Character

DEFAULT_CARD_MAX_BYTES = 5 * 1024 * 1024
EXPORT_FORMATS = {"json": "application/json", "png": "image/png"}


@dataclass
class CardImport:
    """What an import did, for the admin message and the command's output."""

    character: Character
    created: bool
    scenarios_created: int = 0
    scenarios_updated: int = 0
    scenarios_kept: int = 0  # the character's scenarios that the card does not mention (update only)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verb = "Imported" if self.created else "Updated"
        text = f"{verb} “{self.character.name}” ({self.character.slug})"
        parts = []
        if self.scenarios_created:
            parts.append(f"{self.scenarios_created} scenario(s) created")
        if self.scenarios_updated:
            parts.append(f"{self.scenarios_updated} updated")
        if self.scenarios_kept:
            parts.append(f"{self.scenarios_kept} not in the card kept")
        return f"{text}: {', '.join(parts)}." if parts else f"{text}."


@dataclass(frozen=True)
class CardFile:
    content: bytes
    filename: str
    content_type: str


def card_max_bytes() -> int:
    return getattr(settings, "CARD_MAX_BYTES", DEFAULT_CARD_MAX_BYTES)


def character_card_import(*, raw: bytes, update: bool = False) -> CardImport:
    """Create a character (and its lorebook's scenarios) from a V1/V2 card, JSON or PNG.

    With `update`, a character whose slug is the card's name slugified is updated instead, its
    scenarios matched by title. All or nothing: any problem raises CardError and saves nothing.
    """
    card = card_read(raw, max_bytes=card_max_bytes())
    values = character_fields_from_card(card.data)
    base_slug = (slugify(values["name"]) or "character")[:90]
    with transaction.atomic():
        character = Character.objects.select_for_update().filter(slug=base_slug).first() if update else None
        created = character is None
        if created:
            character = Character(slug=_unique_slug(base_slug))
        for name, value in values.items():
            setattr(character, name, value)
        _validate(character, "The card", exclude=["avatar"])
        character.save()
        result = CardImport(character=character, created=created)
        _import_entries(character, card.entries, result)
        if card.image is not None:
            character.avatar.save(f"{character.slug}.png", ContentFile(png_without_card(card.image)), save=True)
    return result


def _import_entries(character: Character, entries: list[dict], result: CardImport) -> None:
    existing = defaultdict(list)
    if not result.created:
        for scenario in character.scenarios.order_by("id"):
            existing[scenario.title].append(scenario)
    for index, entry in enumerate(entries):
        values = scenario_fields_from_entry(entry, index=index)
        matches = existing.get(values["title"])
        scenario = matches.pop(0) if matches else Scenario(character=character)
        is_new = scenario.pk is None
        for name, value in values.items():
            setattr(scenario, name, value)
        _validate(scenario, f"Lorebook entry {index + 1} (“{values['title']}”)")
        scenario.save()
        if is_new:
            result.scenarios_created += 1
        else:
            result.scenarios_updated += 1
    result.scenarios_kept = sum(len(left) for left in existing.values())


def _validate(instance, label: str, exclude: list[str] | None = None) -> None:
    try:
        instance.full_clean(exclude=exclude)
    except ValidationError as exc:
        problems = "; ".join(f"{name}: {' '.join(messages)}" if name != "__all__" else " ".join(messages)
                             for name, messages in exc.message_dict.items())
        raise CardError(f"{label} cannot be imported: {problems}") from None


def _unique_slug(base: str) -> str:
    taken = set(Character.objects.filter(slug__startswith=base).values_list("slug", flat=True))
    if base not in taken:
        return base
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"


def character_card_data(*, character: Character) -> dict:
    """The V2 `data` object of a character, with its own scenarios as the lorebook."""
    return card_data_from_character(character, character.scenarios.order_by("id"))


def character_card_export(*, character: Character, fmt: str = "json") -> CardFile:
    """The character as a V2 card file: "json", or "png" (its avatar, or a plain picture, carrying the card)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    data = character_card_data(character=character)
    if fmt == "json":
        content = card_json_bytes(data)
    else:
        content = card_png_bytes(data, image=_avatar_bytes(character))
    return CardFile(content=content, filename=f"{character.slug}.{fmt}", content_type=EXPORT_FORMATS[fmt])


def _avatar_bytes(character: Character) -> bytes | None:
    if not character.avatar:
        return None
    try:
        with character.avatar.open("rb") as avatar:
            return avatar.read()
    except OSError:  # the file is gone from storage: export with the plain picture
        return None
