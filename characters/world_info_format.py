"""SillyTavern World Info files (JSON): reading them into scenario field values and writing them back.

Pure functions, no database. A file is {"entries": {"<uid>": entry, ...}, ...}; each entry becomes one
scenario. The entry as read is kept under the reserved key "llmsite" of the scenario's `extensions`, and
export writes it back with only the fields editors changed since replaced, so a file round-trips
unchanged (also fields this project does not use, such as author's-note positions or automation ids).
Lorebook entries of a card's `character_book` carry the same settings in their `extensions`, under
SillyTavern's names (BOOK_EXTENSION_NAMES); card_format.py maps those.
"""

from __future__ import annotations

from dataclasses import dataclass

from scenarios.keys import split_keywords

from .card_format import RESERVED, fit_keys, join_list, scan_depth_value, split_list
from llmsite.strict_json import StrictJSONError, strict_json_loads

# SillyTavern's numbered positions; 2 and 3 (the author's note) and 7 (outlet) have no place here and
# insert after the profile (the number is kept for export).
POSITION_OF_NUMBER = {0: "before_char", 1: "after_char", 4: "at_depth", 5: "before_examples", 6: "after_examples"}
NUMBER_OF_POSITION = {name: number for number, name in POSITION_OF_NUMBER.items()}
ROLE_OF_NUMBER = {0: "system", 1: "user", 2: "assistant"}
NUMBER_OF_ROLE = {name: number for number, name in ROLE_OF_NUMBER.items()}
DEFAULT_DEPTH = 4
TITLE_MAX = 200


class WorldInfoError(ValueError):
    """The file is not an importable World Info file; the message says why, for an editor."""


@dataclass(frozen=True)
class WorldInfoBook:
    """A World Info file as read: its top-level `name` ("" without one) and its entries in uid order."""

    name: str
    entries: list[dict]


def world_info_read(raw: bytes | str, *, max_entries: int) -> WorldInfoBook:
    """The name and entries of a World Info file (each entry a dict, as written); more than `max_entries`
    entries is refused whole (a lorebook that size would be read on every reply)."""
    try:
        data = strict_json_loads(raw)
    except StrictJSONError as exc:
        raise WorldInfoError(f"The file is not valid JSON ({exc}).") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorldInfoError("The file is not JSON.") from exc
    entries = data.get("entries") if isinstance(data, dict) else None
    if isinstance(entries, list):
        entries = {str(index): entry for index, entry in enumerate(entries)}
    if not isinstance(entries, dict):
        raise WorldInfoError("A World Info file is a JSON object with 'entries'.")
    if len(entries) > max_entries:
        raise WorldInfoError(f"The file has {len(entries)} entries; at most {max_entries} are imported at once "
                             f"(WORLD_INFO_MAX_ENTRIES).")
    result = []
    for uid, entry in entries.items():
        if not isinstance(entry, dict):
            raise WorldInfoError(f"Entry {uid} must be a JSON object.")
        if not isinstance(entry.get("content", ""), str):
            raise WorldInfoError(f"Entry {uid}: 'content' must be text.")
        for name in ("key", "keysecondary"):
            value = entry.get(name, [])
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise WorldInfoError(f"Entry {uid}: '{name}' must be a list of strings.")
        result.append(entry)
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    return WorldInfoBook(name=name, entries=sorted(result, key=lambda entry: _number(entry.get("uid"), 0)))


def entry_uid(entry: dict) -> int | None:
    """The entry's uid when it is a whole number (what import matches existing scenarios by)."""
    uid = entry.get("uid")
    return uid if isinstance(uid, int) and not isinstance(uid, bool) else None


def _number(value, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(value)


def _selective_logic(value) -> int:
    """SillyTavern's selectiveLogic 0-3 (AND ANY, NOT ALL, NOT ANY, AND ALL); anything else is AND ANY."""
    number = _number(value, 0)
    return number if number in (0, 1, 2, 3) and number == value else 0


def _flag(value, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def scenario_fields_from_world_info(entry: dict, *, book: str = "") -> dict:
    """Scenario field values (no character) for one World Info entry, with the entry and the name of its
    `book` (file) kept for export and for matching the entry again on the next import."""
    keys, secondary = fit_keys(entry.get("key") or [])[0], fit_keys(entry.get("keysecondary") or [])[0]
    title = entry.get("comment") if isinstance(entry.get("comment"), str) else ""
    filter_ = entry.get("characterFilter") if isinstance(entry.get("characterFilter"), dict) else {}
    position = _number(entry.get("position"), 1)
    return {
        "title": (title.strip() or (keys[0] if keys else f"Entry {entry.get('uid', '')}".strip()))[:TITLE_MAX],
        "content": entry.get("content", ""),
        "keywords": join_list(keys),
        "secondary_keywords": join_list(secondary) if entry.get("selective", True) is not False else "",
        "selective_logic": _selective_logic(entry.get("selectiveLogic")),
        "always_on": _flag(entry.get("constant"), False),
        "priority": _number(entry.get("order"), 100),
        "enabled": not _flag(entry.get("disable"), False),
        "case_sensitive": _flag(entry.get("caseSensitive"), False),
        "whole_words": _flag(entry.get("matchWholeWords"), True),
        "scan_depth": scan_depth_value(entry.get("scanDepth")),
        "position": POSITION_OF_NUMBER.get(position, "after_char"),
        "depth": max(0, _number(entry.get("depth"), DEFAULT_DEPTH)),
        "depth_role": ROLE_OF_NUMBER.get(_number(entry.get("role"), 0), "system"),
        "probability": min(100, max(0, _number(entry.get("probability"), 100)))
        if _flag(entry.get("useProbability"), True) else 100,
        "inclusion_group": entry.get("group") if isinstance(entry.get("group"), str) else "",
        "group_weight": max(1, _number(entry.get("groupWeight"), 100)),
        "group_prioritize": _flag(entry.get("groupOverride"), False),
        "sticky": max(0, _number(entry.get("sticky"), 0)),
        "cooldown": max(0, _number(entry.get("cooldown"), 0)),
        "delay": max(0, _number(entry.get("delay"), 0)),
        "exclude_recursion": _flag(entry.get("excludeRecursion"), False),
        "prevent_recursion": _flag(entry.get("preventRecursion"), False),
        "character_filter": join_list([n for n in filter_.get("names") or [] if isinstance(n, str)]),
        "character_filter_exclude": _flag(filter_.get("isExclude"), False),
        "extensions": {RESERVED: {"world_info_entry": entry, "world_info_book": book}},
    }


MAPPED_FIELDS = tuple(name for name in scenario_fields_from_world_info({}) if name != "extensions")


def imported_entry(scenario) -> dict | None:
    """The World Info entry a scenario was imported from, as written (None for one made in the admin)."""
    reserved = (scenario.extensions or {}).get(RESERVED)
    original = reserved.get("world_info_entry") if isinstance(reserved, dict) else None
    return original if isinstance(original, dict) else None


def world_info_entry_from_scenario(scenario) -> dict:
    """The World Info entry of a scenario: the imported entry with the editors' changes, or a new one (no uid
    yet: world_info_entries_numbered gives it one that no imported entry holds)."""
    original = imported_entry(scenario)
    entry = dict(original) if original is not None else _new_entry()
    imported = scenario_fields_from_world_info(original) if isinstance(original, dict) else {}
    for name in MAPPED_FIELDS:
        value = getattr(scenario, name)
        if imported.get(name, object()) != value:
            _write(entry, name, value)
    return entry


def world_info_entries_numbered(entries: list[dict]) -> list[dict]:
    """The entries with distinct uids: each keeps its own unless an earlier one took it, then gets the next
    free number (a file is keyed by uid: two entries under one key would lose one)."""
    taken = {uid for uid in map(entry_uid, entries) if uid is not None}
    used, numbered, next_free = set(), [], 0
    for entry in entries:
        uid = entry_uid(entry)
        if uid is None or uid in used:
            while next_free in taken or next_free in used:
                next_free += 1
            uid, entry = next_free, {**entry, "uid": next_free}
        used.add(uid)
        numbered.append(entry)
    return numbered


def world_info_book_of(scenario) -> str:
    """The name of the World Info file a scenario was imported from ("" for one made in the admin)."""
    reserved = (scenario.extensions or {}).get(RESERVED)
    book = reserved.get("world_info_book") if isinstance(reserved, dict) else ""
    return book if isinstance(book, str) else ""


def world_info_file(entries: list[dict], *, name: str = "") -> dict:
    """A World Info file object named `name`, for `entries` (distinct uids, see world_info_entries_numbered)."""
    return {**({"name": name} if name else {}), "entries": {str(entry["uid"]): entry for entry in entries}}


def _new_entry() -> dict:
    return {"uid": None, "key": [], "keysecondary": [], "comment": "", "content": "", "constant": False,
            "selective": True, "selectiveLogic": 0, "order": 100, "position": 1, "disable": False,
            "excludeRecursion": False, "preventRecursion": False, "probability": 100, "useProbability": True,
            "depth": DEFAULT_DEPTH, "role": 0, "group": "", "groupOverride": False, "groupWeight": 100,
            "scanDepth": None, "caseSensitive": None, "matchWholeWords": None, "sticky": 0, "cooldown": 0,
            "delay": 0, "characterFilter": {"isExclude": False, "names": [], "tags": []}}


def _write(entry: dict, name: str, value) -> None:
    """Write one scenario field's value into a World Info entry under SillyTavern's name."""
    simple = {"always_on": "constant", "priority": "order", "case_sensitive": "caseSensitive",
              "whole_words": "matchWholeWords", "scan_depth": "scanDepth", "depth": "depth",
              "inclusion_group": "group", "group_weight": "groupWeight", "group_prioritize": "groupOverride",
              "sticky": "sticky", "cooldown": "cooldown", "delay": "delay", "exclude_recursion": "excludeRecursion",
              "prevent_recursion": "preventRecursion", "content": "content", "title": "comment",
              "selective_logic": "selectiveLogic"}
    if name in simple:
        entry[simple[name]] = value
    elif name == "keywords":
        entry["key"] = split_keywords(value)
    elif name == "secondary_keywords":
        entry["keysecondary"] = split_keywords(value)
        if value:
            entry["selective"] = True
    elif name == "enabled":
        entry["disable"] = not value
    elif name == "position":
        entry["position"] = NUMBER_OF_POSITION.get(value, 1)
    elif name == "depth_role":
        entry["role"] = NUMBER_OF_ROLE.get(value, 0)
    elif name == "probability":
        entry["probability"] = value
        entry["useProbability"] = True
    elif name in ("character_filter", "character_filter_exclude"):
        filter_ = dict(entry.get("characterFilter") or {"isExclude": False, "names": [], "tags": []})
        if name == "character_filter":
            filter_["names"] = split_list(value)
        else:
            filter_["isExclude"] = value
        entry["characterFilter"] = filter_
