"""Write operations on characters (importing the plain-text profiles file)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.text import slugify

from .models import Character
from .resource_format import Block, BlockError, ImportReport, parse_blocks

PROFILE_FIELDS = {"slug", "tags", "creator", "version", "active", "temperature", "top_p",
                  "repetition_penalty", "max_tokens", "scan_depth"}
PROFILE_SECTIONS = {"description", "personality", "setting", "greeting", "example_dialogue",
                    "system_prompt", "post_history_instructions", "creator_notes"}
# One section per alternate greeting, in the order a request's `greeting` index counts them (1, 2, ...).
PROFILE_REPEATED_SECTIONS = frozenset({"alternate_greeting"})


def characters_import_profiles(*, text: str) -> ImportReport:
    """Create or update one character per block, matched by slug; bad blocks are reported, not imported."""
    report = ImportReport()
    for block in parse_blocks(text, allowed_fields=PROFILE_FIELDS, allowed_sections=PROFILE_SECTIONS,
                              repeatable_sections=PROFILE_REPEATED_SECTIONS):
        try:
            values = _profile_values(block)
            save_matching(Character, {"slug": values["slug"]}, values, block, report)
        except BlockError as exc:
            report.errors.append(f"{block.title or 'untitled block'} ({exc})")
    return report


def _profile_values(block: Block) -> dict:
    if block.errors:
        raise block.errors[0]
    slug = block.field_value("slug") or slugify(block.title)
    if not slug:
        raise BlockError(block.line, "cannot derive a slug from the title; add 'slug: ...'")
    if not block.section("description").strip():
        # Cards may come without one (characters/card_format.py); a profile written for this file should not.
        raise BlockError(block.line, "a profile needs a '--- description' section")
    values = {
        "name": block.title,
        "slug": slug,
        "tags": block.field_value("tags"),
        "creator": block.field_value("creator"),
        "character_version": block.field_value("version"),
        "is_active": block.flag("active", True),
        "temperature": block.number("temperature", float),
        "top_p": block.number("top_p", float),
        "repetition_penalty": block.number("repetition_penalty", float),
        "max_tokens": block.number("max_tokens", int),
        "scan_depth": block.number("scan_depth", int),
    }
    for name in PROFILE_SECTIONS:
        values[name] = block.section(name)
    values["alternate_greetings"] = block.section_texts("alternate_greeting")
    return values


def save_matching(model, lookup: dict, values: dict, block: Block, report: ImportReport) -> None:
    """Shared by the resource importers: create, update or leave one row, validating it first."""
    label = block.title
    with transaction.atomic():
        instance = model.objects.select_for_update().filter(**lookup).first()
        created = instance is None
        if created:
            instance = model()
        elif all(getattr(instance, key) == value for key, value in values.items()):
            report.unchanged.append(label)
            return
        for key, value in values.items():
            setattr(instance, key, value)
        try:
            instance.full_clean()
        except ValidationError as exc:
            field_name, messages = next(iter(exc.message_dict.items()))
            raise BlockError(block.line_of(field_name) if field_name != "__all__" else block.line,
                             f"{field_name}: {' '.join(messages)}") from None
        instance.save()
    (report.created if created else report.updated).append(label)

