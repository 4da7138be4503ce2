"""Character Card V1/V2: reading and writing cards (JSON, or PNG with base64 JSON in the 'chara' tEXt chunk).

Pure functions, no database: `card_read` turns uploaded bytes into a checked `Card`;
`character_fields_from_card` / `scenario_fields_from_entry` map it onto model field values;
`card_data_from_character` maps a saved character and its scenarios back; `card_json_bytes` /
`card_png_bytes` write the file. Anything a card holds that has no field of its own (unknown data
fields, the lorebook's settings, entry fields such as `id` or `position`) is kept under the reserved
key "llmsite" of the `extensions` it belongs to, and export puts it back where it came from.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from scenarios.keys import is_regex_key, split_keywords

from llmsite.strict_json import StrictJSONError, strict_json_loads

SPEC = "chara_card_v2"
SPEC_VERSION = "2.0"
RESERVED = "llmsite"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHUNK = "chara"
MAX_PIXELS = 25_000_000

# Card data field -> Character field, for the plain text fields.
TEXT_FIELDS = {
    "name": "name",
    "description": "description",
    "personality": "personality",
    "scenario": "setting",
    "first_mes": "greeting",
    "mes_example": "example_dialogue",
    "creator_notes": "creator_notes",
    "system_prompt": "system_prompt",
    "post_history_instructions": "post_history_instructions",
    "creator": "creator",
    "character_version": "character_version",
}
KNOWN_DATA_FIELDS = {*TEXT_FIELDS, "alternate_greetings", "tags", "extensions", "character_book"}
BOOK_ENTRY_FIELDS_MAPPED = ("content", "extensions")  # kept in Scenario.content / Scenario.extensions

# Limits that cut lists rather than refuse the card (docs/PROMPTS.md): a longer tag or key is left
# out, and so is any that would overflow its field (Character.tags, Scenario.keywords).
TAG_MAX_CHARS = 50
TAGS_MAX_CHARS = 500
KEY_MAX_CHARS = 100
KEYS_MAX_CHARS = 1000
SCAN_DEPTH_MAX = 1000
POSITIONS = ("before_char", "after_char")
# SillyTavern writes the position as a number in the entry's extensions; 0 and 1 are V2's two, 4 is "at
# depth", 5 and 6 before and after the example dialogue (2, 3 and 7 have no place here: after the profile).
NUMBERED_POSITIONS = {0: "before_char", 1: "after_char", 4: "at_depth", 5: "before_examples", 6: "after_examples"}
NUMBER_OF_POSITION = {name: number for number, name in NUMBERED_POSITIONS.items()}
ROLES = {0: "system", 1: "user", 2: "assistant"}
NUMBER_OF_ROLE = {name: number for number, name in ROLES.items()}
# World Info settings SillyTavern keeps in a lorebook entry's extensions: name there -> (Scenario field, default).
BOOK_EXTENSION_FIELDS = {
    "depth": ("depth", 4), "group": ("inclusion_group", ""), "group_weight": ("group_weight", 100),
    "group_override": ("group_prioritize", False), "sticky": ("sticky", 0), "cooldown": ("cooldown", 0),
    "delay": ("delay", 0), "exclude_recursion": ("exclude_recursion", False),
    "prevent_recursion": ("prevent_recursion", False), "selectiveLogic": ("selective_logic", 0),
}


class CardError(ValueError):
    """The file is not an importable character card; the message says why, for an editor."""


@dataclass
class Card:
    """A checked card: the V2 `data` object (V1 cards are lifted into it) and the PNG picture, if any."""

    data: dict
    spec_version: int  # 1 or 2, as read
    image: bytes | None = None  # the PNG the card came in, as uploaded

    @property
    def entries(self) -> list[dict]:
        book = self.data.get("character_book")
        return list(book["entries"]) if book else []


# --- reading ----------------------------------------------------------------------------------------


def card_read(raw: bytes, *, max_bytes: int) -> Card:
    """Parse a card file (PNG or JSON, V1 or V2); raises CardError with a message for the editor."""
    if len(raw) > max_bytes:
        raise CardError(f"The file is {len(raw):,} bytes; cards may be at most {max_bytes:,} bytes (CARD_MAX_BYTES).")
    if not raw.strip():
        raise CardError("The file is empty.")
    if raw.startswith(PNG_SIGNATURE):
        text = _png_chunk_text(raw)
        card = card_from_json(_json_from_chunk(text), source="the PNG's 'chara' chunk")
        card.image = raw
        return card
    try:
        value = strict_json_loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise CardError("Not a character card: the file is neither a PNG image nor UTF-8 JSON.") from None
    except StrictJSONError as exc:
        raise CardError(f"Not a character card: the file is not valid JSON ({exc}).") from None
    return card_from_json(value)


def card_from_json(value, *, source: str = "the file") -> Card:
    """Check a parsed card (V2 with `spec`, or a flat V1 object) and normalise it to V2 `data`."""
    if not isinstance(value, dict):
        raise CardError(f"Not a character card: {source} holds a JSON {type(value).__name__}, not an object.")
    if "spec" in value:
        spec, version = value.get("spec"), value.get("spec_version", SPEC_VERSION)
        if spec != SPEC:
            raise CardError(f"Unsupported card spec {spec!r}: only Character Card V2 ('{SPEC}') and V1 cards can "
                            "be imported.")
        if not isinstance(version, str) or not version.startswith("2"):
            raise CardError(f"Unsupported spec_version {version!r} for {SPEC}: expected '2.0'.")
        data = value.get("data")
        if not isinstance(data, dict):
            raise CardError("Not a valid V2 card: 'data' must be a JSON object holding the character.")
        return Card(data=_checked_data(data), spec_version=2)
    if not isinstance(value.get("name"), str) or not ({"description", "first_mes", "personality"} & value.keys()):
        raise CardError("Not a character card: no 'spec' (V2) and no 'name' with 'description' (V1).")
    return Card(data=_checked_data(value), spec_version=1)


def _png_chunk_text(raw: bytes) -> str:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != "PNG":
                raise CardError("The file is not a PNG image.")
            width, height = image.size
            if width * height > MAX_PIXELS:  # reading the text chunks decodes the pixels: refuse bombs first
                raise CardError(f"The PNG picture is {width}×{height} pixels; cards may have at most "
                                f"{MAX_PIXELS:,} pixels.")
            texts = dict(image.text)  # loads the image: text chunks may follow the pixel data
    except CardError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CardError(f"The PNG image cannot be read ({exc.__class__.__name__}).") from None
    if PNG_CHUNK not in texts:
        hint = " It has a 'ccv3' chunk: Character Card V3 is not supported." if "ccv3" in texts else ""
        raise CardError(f"This PNG holds no character card: it has no '{PNG_CHUNK}' text chunk.{hint}")
    return str(texts[PNG_CHUNK])


def _json_from_chunk(text: str):
    stripped = text.strip()
    try:
        if stripped.startswith("{"):  # a few tools store the JSON itself rather than base64
            return strict_json_loads(stripped)
        return strict_json_loads(base64.b64decode(stripped).decode("utf-8"))
    except StrictJSONError as exc:
        raise CardError(f"The PNG's '{PNG_CHUNK}' chunk is not valid card JSON ({exc}).") from None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CardError(f"The PNG's '{PNG_CHUNK}' chunk is not base64-encoded card JSON.") from None


def _checked_data(data: dict) -> dict:
    """A copy of `data` with every known field present and of the right type; unknown fields kept."""
    checked = dict(data)
    for name in TEXT_FIELDS:
        value = data.get(name)
        if value is None:
            checked[name] = ""
        elif not isinstance(value, str):
            raise CardError(f"Card field '{name}' must be text, not {type(value).__name__}.")
    if not checked["name"].strip():
        raise CardError("The card has no name.")
    checked["alternate_greetings"] = _string_list(data.get("alternate_greetings"), "alternate_greetings")
    tags = data.get("tags")
    checked["tags"] = [t.strip() for t in tags.split(",") if t.strip()] if isinstance(tags, str) else \
        _string_list(tags, "tags")
    checked["extensions"] = _object(data.get("extensions"), "extensions")
    book = data.get("character_book")
    if book is None:
        checked.pop("character_book", None)
    else:
        checked["character_book"] = _checked_book(book)
    return checked


def _checked_book(book) -> dict:
    if not isinstance(book, dict):
        raise CardError("Card field 'character_book' must be a JSON object.")
    entries = book.get("entries", [])
    if not isinstance(entries, list):
        raise CardError("Card field 'character_book.entries' must be a list.")
    checked = dict(book)
    checked["extensions"] = _object(book.get("extensions"), "character_book.extensions")
    checked["entries"] = [_checked_entry(entry, index) for index, entry in enumerate(entries)]
    return checked


def _checked_entry(entry, index: int) -> dict:
    where = f"character_book.entries[{index}]"
    if not isinstance(entry, dict):
        raise CardError(f"Lorebook entry {where} must be a JSON object.")
    checked = dict(entry)
    for name in ("keys", "secondary_keys"):
        value = entry.get(name)
        if name not in entry:
            continue  # left out, so that export does not add it
        if isinstance(value, str):  # some tools write one comma-separated string
            checked[name] = [part.strip() for part in value.split(",") if part.strip()]
        else:
            checked[name] = _string_list(value, f"{where}.{name}")
    if not isinstance(entry.get("content", ""), str):
        raise CardError(f"Lorebook entry {where}: 'content' must be text.")
    for name in ("name", "comment"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise CardError(f"Lorebook entry {where}: '{name}' must be text.")
    for name in ("priority", "insertion_order"):
        value = entry.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise CardError(f"Lorebook entry {where}: '{name}' must be a number.")
    checked["extensions"] = _object(entry.get("extensions"), f"{where}.extensions")
    return checked


def _string_list(value, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CardError(f"Card field '{name}' must be a list of strings.")
    return list(value)


def _object(value, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CardError(f"Card field '{name}' must be a JSON object.")
    return dict(value)


# --- card -> model fields -----------------------------------------------------------------------------


def join_list(items: list[str]) -> str:
    return ", ".join(item.strip() for item in items if item.strip())


def fit_keys(keys: list[str]) -> tuple[list[str], list[str]]:
    """(kept, left out) of trigger keys: a plain key is at most KEY_MAX_CHARS, a /regex/ key may be longer
    (patterns are); all within the field's KEYS_MAX_CHARS."""
    return fit_list(keys, item_max=KEY_MAX_CHARS, total_max=KEYS_MAX_CHARS, long_allowed=is_regex_key)


def split_list(text: str) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def fit_list(items: list[str], *, item_max: int, total_max: int, long_allowed=lambda item: False
             ) -> tuple[list[str], list[str]]:
    """(kept, left out): the items, in order, that are at most `item_max` characters (unless `long_allowed`)
    and whose comma-joined text stays within `total_max` characters."""
    kept, left_out = [], []
    for item in (item.strip() for item in items):
        if not item:
            continue
        if (len(item) <= item_max or long_allowed(item)) and len(join_list([*kept, item])) <= total_max:
            kept.append(item)
        else:
            left_out.append(item)
    return kept, left_out


def scan_depth_value(value) -> int | None:
    """A usable scan depth (a whole number 1..SCAN_DEPTH_MAX), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return int(value) if 1 <= value <= SCAN_DEPTH_MAX else None


def entry_scan_depth(entry: dict, extensions: dict):
    """The entry's own scan depth as written (top level, else SillyTavern's extensions), or None."""
    return entry["scan_depth"] if entry.get("scan_depth") is not None else extensions.get("scan_depth")


def entry_position(entry: dict, extensions: dict) -> str:
    position = entry.get("position")
    numbered = extensions.get("position")
    if not isinstance(numbered, bool) and NUMBERED_POSITIONS.get(numbered) not in (None, *POSITIONS):
        return NUMBERED_POSITIONS[numbered]  # SillyTavern's own positions, which V2's field cannot name
    if position in POSITIONS:
        return position
    return NUMBERED_POSITIONS.get(numbered, "after_char") if not isinstance(numbered, bool) else "after_char"


def character_fields_from_card(data: dict) -> dict:
    """Character field values for checked card `data` (no slug, no avatar)."""
    values = {field_name: data[card_name] for card_name, field_name in TEXT_FIELDS.items()}
    values["alternate_greetings"] = list(data["alternate_greetings"])
    values["tags"] = join_list(fit_list(data["tags"], item_max=TAG_MAX_CHARS, total_max=TAGS_MAX_CHARS)[0])
    book = data.get("character_book") or {}
    values["scan_depth"] = scan_depth_value(book.get("scan_depth"))
    reserved = {}
    unknown = {key: value for key, value in data.items() if key not in KNOWN_DATA_FIELDS}
    if unknown:
        reserved["card"] = unknown
    if split_list(values["tags"]) != data["tags"]:
        reserved["tags"] = list(data["tags"])  # tags holding commas or spaces around them
    if "character_book" in data:
        reserved["character_book"] = {k: v for k, v in data["character_book"].items() if k != "entries"}
    extensions = dict(data["extensions"])
    extensions.pop(RESERVED, None)
    if reserved:
        extensions[RESERVED] = reserved
    values["extensions"] = extensions
    return values


def scenario_fields_from_entry(entry: dict, *, index: int) -> dict:
    """Scenario field values (no character) for a checked lorebook entry."""
    extensions = dict(entry["extensions"])
    extensions.pop(RESERVED, None)
    keys, secondary_keys = entry.get("keys") or [], entry.get("secondary_keys") or []
    title = entry.get("name") or entry.get("comment") or (keys[0] if keys else "")
    keys, secondary_keys = fit_keys(keys)[0], fit_keys(secondary_keys)[0]
    whole_words = extensions.get("match_whole_words")
    priority = entry.get("priority") if entry.get("priority") is not None else entry.get("insertion_order")
    values = {
        "title": (title.strip() or f"Lorebook entry {index + 1}")[:200],
        "content": entry.get("content", ""),
        "keywords": join_list(keys),
        "secondary_keywords": join_list(secondary_keys) if entry.get("selective") else "",
        "always_on": bool(entry.get("constant")),
        "priority": int(priority) if priority is not None else 100,
        "enabled": entry.get("enabled") is not False,
        "case_sensitive": bool(entry.get("case_sensitive")),
        "whole_words": whole_words if isinstance(whole_words, bool) else True,
        "scan_depth": scan_depth_value(entry_scan_depth(entry, extensions)),
        "position": entry_position(entry, extensions),
        **world_info_fields_from_extensions(extensions),
    }
    original = {key: value for key, value in entry.items() if key not in BOOK_ENTRY_FIELDS_MAPPED}
    values["extensions"] = {**extensions, RESERVED: {"entry": original, "index": index}}
    return values


def world_info_fields_from_extensions(extensions: dict) -> dict:
    """Scenario field values for the World Info settings SillyTavern writes into an entry's extensions."""
    values = {}
    for name, (field_name, default) in BOOK_EXTENSION_FIELDS.items():
        value = extensions.get(name, default)
        if type(value) is not type(default) and not (isinstance(default, int) and isinstance(value, float)):
            value = default
        values[field_name] = max(0, int(value)) if isinstance(default, int) and not isinstance(default, bool) else value
    values["group_weight"] = max(1, values["group_weight"])
    values["selective_logic"] = values["selective_logic"] if values["selective_logic"] <= 3 else 0
    role = extensions.get("role")
    values["depth_role"] = ROLES.get(role, "system") if not isinstance(role, bool) else "system"
    probability = extensions.get("probability", 100)
    use = extensions.get("useProbability", True)
    usable = isinstance(probability, (int, float)) and not isinstance(probability, bool)
    values["probability"] = min(100, max(0, int(probability))) if usable and use is not False else 100
    filter_ = extensions.get("character_filter")
    filter_ = filter_ if isinstance(filter_, dict) else {}
    values["character_filter"] = join_list([n for n in filter_.get("names") or [] if isinstance(n, str)])
    values["character_filter_exclude"] = filter_.get("isExclude") is True
    return values


def _write_world_info_extension(extensions: dict, name: str, value) -> None:
    """Write one World Info scenario field into an entry's extensions under SillyTavern's name."""
    for extension_name, (field_name, _default) in BOOK_EXTENSION_FIELDS.items():
        if field_name == name:
            extensions[extension_name] = value
            return
    if name == "depth_role":
        extensions["role"] = NUMBER_OF_ROLE.get(value, 0)
    elif name == "probability":
        extensions["probability"] = value
        extensions["useProbability"] = True
    elif name in ("character_filter", "character_filter_exclude"):
        filter_ = dict(extensions.get("character_filter") or {"isExclude": False, "names": [], "tags": []})
        filter_["names" if name == "character_filter" else "isExclude"] = \
            split_list(value) if name == "character_filter" else value
        extensions["character_filter"] = filter_


WORLD_INFO_FIELDS = (*(field_name for field_name, _ in BOOK_EXTENSION_FIELDS.values()), "depth_role", "probability",
                     "character_filter", "character_filter_exclude")


# --- model -> card ------------------------------------------------------------------------------------


def card_data_from_character(character, scenarios) -> dict:
    """The V2 `data` object for a character and its own scenarios (in the order given)."""
    extensions = dict(character.extensions or {})
    reserved = extensions.pop(RESERVED, None) or {}
    data = dict(reserved.get("card") or {})
    for card_name, field_name in TEXT_FIELDS.items():
        data[card_name] = getattr(character, field_name)
    data["alternate_greetings"] = list(character.alternate_greetings or [])
    original_tags = reserved.get("tags")
    data["tags"] = original_tags if original_tags is not None and join_list(original_tags) == character.tags \
        else split_list(character.tags)
    data["extensions"] = extensions
    scenarios = list(scenarios)
    if scenarios or "character_book" in reserved or character.scan_depth is not None:
        book = dict(reserved.get("character_book") or {"extensions": {}})
        if scan_depth_value(book.get("scan_depth")) != character.scan_depth:  # edited since import
            if character.scan_depth is None:
                book.pop("scan_depth", None)
            else:
                book["scan_depth"] = character.scan_depth
        book["entries"] = [entry_from_scenario(scenario) for scenario in scenarios]
        data["character_book"] = book
    return data


def entry_from_scenario(scenario) -> dict:
    """A lorebook entry for a scenario: the imported entry with the editors' changes, or a new one."""
    extensions = dict(scenario.extensions or {})
    reserved = extensions.pop(RESERVED, None) or {}
    original = reserved.get("entry")
    current = {
        "title": scenario.title, "keywords": scenario.keywords, "secondary_keywords": scenario.secondary_keywords,
        "always_on": scenario.always_on, "priority": scenario.priority, "enabled": scenario.enabled,
        "case_sensitive": scenario.case_sensitive, "whole_words": scenario.whole_words,
        "scan_depth": scenario.scan_depth, "position": scenario.position,
        **{name: getattr(scenario, name) for name in WORLD_INFO_FIELDS},
    }
    if original is None:
        entry = {
            "keys": split_keywords(scenario.keywords), "content": scenario.content, "extensions": extensions,
            "enabled": scenario.enabled, "insertion_order": scenario.priority, "case_sensitive": scenario.case_sensitive,
            "name": scenario.title, "comment": scenario.title, "priority": scenario.priority,
            "selective": bool(split_keywords(scenario.secondary_keywords)),
            "secondary_keys": split_keywords(scenario.secondary_keywords), "constant": scenario.always_on,
            "position": scenario.position,
        }
        if scenario.scan_depth is not None:
            entry["scan_depth"] = scenario.scan_depth
        defaults = world_info_fields_from_extensions({})
        for name in WORLD_INFO_FIELDS:
            if getattr(scenario, name) != defaults[name]:
                _write_world_info_extension(extensions, name, getattr(scenario, name))
        if scenario.position not in POSITIONS:
            entry["position"] = "after_char"
            extensions["position"] = NUMBER_OF_POSITION[scenario.position]
        return entry
    entry = dict(original)
    # What import made of the original entry; a field that differs now was edited since.
    imported = scenario_fields_from_entry({**original, "extensions": extensions}, index=reserved.get("index", 0))
    for name, value in current.items():
        if imported[name] == value:
            continue
        if name == "title":
            entry["comment" if "comment" in entry and not entry.get("name") else "name"] = value
        elif name == "keywords":
            entry["keys"] = split_keywords(value)
        elif name == "secondary_keywords":
            entry["secondary_keys"] = split_keywords(value)
            entry["selective"] = bool(entry["secondary_keys"])
        elif name == "always_on":
            entry["constant"] = value
        elif name == "priority":
            entry["priority" if entry.get("priority") is not None else "insertion_order"] = value
        elif name == "whole_words":
            extensions["match_whole_words"] = value
        elif name == "scan_depth":
            where = extensions if "scan_depth" in extensions and "scan_depth" not in entry else entry
            if value is None:
                where.pop("scan_depth", None)
            else:
                where["scan_depth"] = value
        elif name == "position":
            entry["position"] = value if value in POSITIONS else "after_char"
            numbered = extensions.get("position") in NUMBERED_POSITIONS and not isinstance(extensions["position"], bool)
            if numbered or value not in POSITIONS:
                extensions["position"] = NUMBER_OF_POSITION[value]
        elif name in WORLD_INFO_FIELDS:
            _write_world_info_extension(extensions, name, value)
        else:  # enabled, case_sensitive
            entry[name] = value
    entry["content"] = scenario.content
    entry["extensions"] = extensions
    return entry


def card_from_data(data: dict) -> dict:
    """The whole V2 card object around a `data` object."""
    return {"spec": SPEC, "spec_version": SPEC_VERSION, "data": data}


def card_json_bytes(data: dict) -> bytes:
    return json.dumps(card_from_data(data), ensure_ascii=False, indent=2).encode("utf-8")


def card_png_bytes(data: dict, *, image: bytes | None = None) -> bytes:
    """A PNG of `image` (any format Pillow reads; a plain placeholder when None) carrying the card."""
    if image is not None:
        try:
            with Image.open(io.BytesIO(image)) as opened:
                picture = opened.convert("RGBA" if opened.mode in ("RGBA", "LA", "P", "PA") else "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            picture = None
    else:
        picture = None
    if picture is None:
        picture = Image.new("RGB", (400, 600), (92, 107, 128))
    payload = base64.b64encode(json.dumps(card_from_data(data), ensure_ascii=False).encode("utf-8")).decode("ascii")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_CHUNK, payload)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_without_card(raw: bytes) -> bytes:
    """The picture of a PNG card, re-encoded without its text chunks (to keep as the avatar)."""
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()
