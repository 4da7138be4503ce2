"""Importing and exporting SillyTavern World Info files: the database side of characters/world_info_format.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from django.db import transaction

from scenarios.models import Scenario

from .card_services import CardError, import_validate
from .models import Character
from .world_info_format import (
    WorldInfoError,
    scenario_fields_from_world_info,
    world_info_entry_from_scenario,
    world_info_file,
    world_info_read,
)

__all__ = ["WorldInfoError", "WorldInfoImport", "world_info_export", "world_info_import"]


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


def world_info_import(*, raw: bytes | str, character: Character | None = None) -> WorldInfoImport:
    """One scenario per World Info entry, for `character` (None: global), matched by title and character:
    an existing one is updated. An entry that cannot be a scenario (no keys and not constant, no content)
    is skipped with the reason; the rest are saved together. Raises WorldInfoError for a file that is not
    World Info."""
    result = WorldInfoImport()
    with transaction.atomic():
        for entry in world_info_read(raw):
            values = scenario_fields_from_world_info(entry)
            label = f"entry {entry.get('uid', '?')} (“{values['title']}”)"
            scenario = Scenario.objects.filter(title=values["title"], character=character).first()
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


def world_info_export(*, scenarios) -> bytes:
    """A World Info file (JSON bytes) holding `scenarios`, each as it was imported with the editors' changes."""
    entries = []
    for index, scenario in enumerate(scenarios):
        entry = world_info_entry_from_scenario(scenario, uid=index)
        entries.append(entry)
    return json.dumps(world_info_file(entries), ensure_ascii=False, indent=2).encode()
