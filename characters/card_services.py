"""Importing and exporting Character Cards: the database side of characters/card_format.py."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils.text import slugify

from scenarios.keys import is_regex_key
from scenarios.models import Scenario

from .card_format import (
    KEY_MAX_CHARS,
    KEYS_MAX_CHARS,
    TAG_MAX_CHARS,
    TAGS_MAX_CHARS,
    CardError,
    card_data_from_character,
    card_json_bytes,
    card_png_bytes,
    card_read,
    character_fields_from_card,
    entry_scan_depth,
    fit_list,
    png_without_card,
    scan_depth_value,
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
    scenarios_skipped: int = 0  # unusable lorebook entries, each named in `warnings`
    warnings: list[str] = field(default_factory=list)  # what was left out or cut, for the editor

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
        if self.scenarios_skipped:
            parts.append(f"{self.scenarios_skipped} lorebook entry(ies) skipped")
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
    scenarios matched by title. What can be kept is kept: an unusable lorebook entry is skipped,
    over-long tags, keys and metadata are cut, each with a warning in the result. A card whose
    character itself cannot be saved raises CardError and saves nothing.
    """
    card = card_read(raw, max_bytes=card_max_bytes())
    values = character_fields_from_card(card.data)
    warnings = _character_warnings(card.data, values)
    base_slug = (slugify(values["name"]) or "character")[:90]
    with transaction.atomic():
        character = Character.objects.select_for_update().filter(slug=base_slug).first() if update else None
        created = character is None
        if created:
            character = Character(slug=_unique_slug(base_slug))
        for name, value in values.items():
            setattr(character, name, value)
        import_validate(character, "The card", exclude=["avatar"])
        character.save()
        result = CardImport(character=character, created=created, warnings=warnings)
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
        label = f"Lorebook entry {index + 1} (“{values['title']}”)"
        unusable = _unusable_entry(values)
        if unusable:
            result.scenarios_skipped += 1
            result.warnings.append(f"{label} skipped: {unusable}.")
            continue
        result.warnings.extend(f"{label}: {warning}" for warning in _entry_warnings(entry))
        matches = existing.get(values["title"])
        scenario = matches.pop(0) if matches else Scenario(character=character)
        is_new = scenario.pk is None
        for name, value in values.items():
            setattr(scenario, name, value)
        try:
            import_validate(scenario, label)
        except CardError as exc:
            result.scenarios_skipped += 1
            result.warnings.append(f"{exc} It was skipped.")
            if not is_new:
                scenario.refresh_from_db()  # leave the stored scenario as it was
            continue
        scenario.save()
        if is_new:
            result.scenarios_created += 1
        else:
            result.scenarios_updated += 1
    result.scenarios_kept = sum(len(left) for left in existing.values())


def _unusable_entry(values: dict) -> str:
    """Why a lorebook entry cannot become a scenario ("" when it can)."""
    if not values["content"].strip():
        return "it has no content"
    if not values["always_on"] and not values["keywords"]:
        return "it has no keys and is not constant, so it could never fire"
    return ""


def _left_out(items: list[str], *, item_max: int, total_max: int, what: str, long_allowed=lambda item: False) -> str:
    _, left_out = fit_list(items, item_max=item_max, total_max=total_max, long_allowed=long_allowed)
    if not left_out:
        return ""
    shown = ", ".join(f"“{item[:40]}…”" if len(item) > 40 else f"“{item}”" for item in left_out[:5])
    more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
    return (f"{len(left_out)} {what} left out: {shown}{more} (each at most {item_max} characters, "
            f"{total_max} in all).")


def _character_warnings(data: dict, values: dict) -> list[str]:
    """Warnings for what the character's values lost (cut in place here for the metadata fields)."""
    warnings = []
    tags = _left_out(data["tags"], item_max=TAG_MAX_CHARS, total_max=TAGS_MAX_CHARS, what="tag(s)")
    if tags:
        warnings.append(f"Tags: {tags}")
    for name in ("creator", "character_version"):
        limit = Character._meta.get_field(name).max_length
        if len(values[name]) > limit:
            warnings.append(f"{name} cut to {limit} characters (it had {len(values[name])}).")
            values[name] = values[name][:limit]
    if not values["description"].strip():
        warnings.append("The card has no description: the prompt holds only the system prompt and the "
                        "other profile fields.")
    book = data.get("character_book") or {}
    if book.get("scan_depth") is not None and values["scan_depth"] is None:
        warnings.append(f"The lorebook's scan_depth {book['scan_depth']!r} is not a whole number from 1 to "
                        f"1000; SCENARIO_SCAN_DEPTH is used.")
    return warnings


def _entry_warnings(entry: dict) -> list[str]:
    warnings = []
    for name, what in (("keys", "key(s)"), ("secondary_keys", "secondary key(s)")):
        cut = _left_out(entry.get(name) or [], item_max=KEY_MAX_CHARS, total_max=KEYS_MAX_CHARS, what=what,
                        long_allowed=is_regex_key)  # /regex/ keys may be longer (card_format.fit_keys)
        if cut:
            warnings.append(cut)
    depth = entry_scan_depth(entry, entry["extensions"])
    if depth is not None and scan_depth_value(depth) is None:
        warnings.append(f"scan_depth {depth!r} is not a whole number from 1 to 1000; the book's is used.")
    return warnings


def import_validate(instance, label: str, exclude: list[str] | None = None) -> None:
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
