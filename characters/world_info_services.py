"""Importing and exporting SillyTavern World Info files: the database side of characters/world_info_format.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePath

from django.conf import settings
from django.db import transaction

from scenarios.models import Scenario

from .card_services import CardError, import_validate
from .models import Character
from .world_info_format import (
    WorldInfoError,
    entry_uid,
    imported_entry,
    scenario_fields_from_world_info,
    world_info_book_of,
    world_info_entries_numbered,
    world_info_entry_from_scenario,
    world_info_file,
    world_info_read,
)

__all__ = ["WorldInfoError", "WorldInfoImport", "world_info_export", "world_info_import"]

DEFAULT_MAX_ENTRIES = 2000


@dataclass
class WorldInfoImport:
    """What an import did, for the admin message."""

    created: list[Scenario] = field(default_factory=list)
    updated: list[Scenario] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why each unusable entry was left out

    def summary(self) -> str:
        parts = [f"{len(self.created)} scenario(s) created", f"{len(self.updated)} updated"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} entry(ies) skipped: " + "; ".join(self.skipped))
        return ", ".join(parts) + "."


def world_info_import(*, raw: bytes | str, character: Character | None = None, file_name: str = "") -> WorldInfoImport:
    """One scenario per World Info entry, for `character` (None: global). The file is known by its top-level
    `name`, else `file_name` (without its extension); an entry that an earlier import of the same file made
    into a scenario of the same character (the same uid) updates that scenario, any other creates one, so two
    entries with the same title stay two. An entry that cannot be a scenario (no keys and not constant, no
    content) is skipped with the reason; the rest are saved together. Raises WorldInfoError for a file that
    is not World Info or has more than WORLD_INFO_MAX_ENTRIES entries."""
    book = world_info_read(raw, max_entries=getattr(settings, "WORLD_INFO_MAX_ENTRIES", DEFAULT_MAX_ENTRIES))
    book_name = book.name or PurePath(file_name).stem
    result = WorldInfoImport()
    with transaction.atomic():
        earlier = _imported_by_uid(character=character, book_name=book_name)
        for entry in book.entries:
            values = scenario_fields_from_world_info(entry, book=book_name)
            label = f"entry {entry.get('uid', '?')} (“{values['title']}”)"
            scenario = earlier.pop(entry_uid(entry), None)  # popped: a repeated uid makes a second scenario
            is_new = scenario is None
            scenario = scenario or Scenario(character=character)
            for name, value in values.items():
                setattr(scenario, name, value)
            try:
                import_validate(scenario, label)
            except CardError as exc:
                result.skipped.append(str(exc))
                continue
            scenario.save()
            (result.created if is_new else result.updated).append(scenario)
    return result


def _imported_by_uid(*, character: Character | None, book_name: str) -> dict[int, Scenario]:
    """The scenarios of `character` an earlier import of the book made, by their entries' uids."""
    found = {}
    for scenario in Scenario.objects.filter(character=character).order_by("id"):
        if not book_name or world_info_book_of(scenario) != book_name:
            continue
        entry = imported_entry(scenario)
        uid = entry_uid(entry) if entry is not None else None
        if uid is not None:
            found.setdefault(uid, scenario)
    return found


def world_info_export(*, scenarios, name: str = "") -> bytes:
    """A World Info file (JSON bytes) holding `scenarios`, each as it was imported with the editors' changes
    (uids renumbered where two collide). Its `name` is the file's the scenarios were imported from when they
    share one, else `name`."""
    scenarios = list(scenarios)
    entries = [world_info_entry_from_scenario(scenario) for scenario in scenarios]
    books = {world_info_book_of(scenario) for scenario in scenarios} - {""}
    book_name = books.pop() if len(books) == 1 else name
    return json.dumps(world_info_file(world_info_entries_numbered(entries), name=book_name), ensure_ascii=False,
                      indent=2).encode()
