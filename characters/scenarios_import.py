"""Importing the plain-text scenarios file: scenarios belong to characters, so characters imports them."""

from __future__ import annotations

from scenarios.models import Scenario

from .models import Character
from .resource_format import Block, BlockError, ImportReport, parse_blocks
from .services import save_matching

SCENARIO_FIELDS = {"character", "keywords", "secondary_keywords", "always_on", "priority", "enabled",
                   "case_sensitive", "whole_words", "scan_depth", "position"}
SCENARIO_SECTIONS = {"content"}


def scenarios_import(*, text: str) -> ImportReport:
    """Create or update one scenario per block, matched by title and character."""
    report = ImportReport()
    for block in parse_blocks(text, allowed_fields=SCENARIO_FIELDS, allowed_sections=SCENARIO_SECTIONS):
        try:
            values = _scenario_values(block)
            save_matching(Scenario, {"title": values["title"], "character": values["character"]},
                          values, block, report)
        except BlockError as exc:
            report.errors.append(f"{block.title or 'untitled block'} ({exc})")
    return report


def _scenario_values(block: Block) -> dict:
    if block.errors:
        raise block.errors[0]
    character = None
    slug = block.field_value("character").strip()
    if slug:
        character = Character.objects.filter(slug=slug).first()
        if character is None:
            raise BlockError(block.line_of("character"), f"no character with slug {slug!r} (import profiles first)")
    return {
        "title": block.title,
        "character": character,
        "content": block.section("content"),
        "keywords": block.field_value("keywords"),
        "secondary_keywords": block.field_value("secondary_keywords"),
        "always_on": block.flag("always_on", False),
        "priority": block.number("priority", int, 100),
        "enabled": block.flag("enabled", True),
        "case_sensitive": block.flag("case_sensitive", False),
        "whole_words": block.flag("whole_words", True),
        "scan_depth": block.number("scan_depth", int),
        "position": block.field_value("position", Scenario.Position.AFTER_CHAR).strip() or Scenario.Position.AFTER_CHAR,
    }
