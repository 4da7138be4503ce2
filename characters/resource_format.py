"""The plain-text format of character_profiles.txt and conversation_scenarios.txt.

A file holds blocks. A block starts with a line `=== <title>`; then `key: value` lines; then
sections, each started by a line `--- <name>` and holding the text up to the next section or
block (blank lines kept, outer blank lines trimmed). Lines starting with `#` outside sections
are comments. See docs/RESOURCES.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BLOCK_START = "=== "
SECTION_START = "--- "
FIELD_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_ ]*):\s*(.*)$")
TRUE_WORDS = {"yes", "true", "1", "on"}
FALSE_WORDS = {"no", "false", "0", "off", ""}


class BlockError(ValueError):
    """A block is malformed; `line` is where (1-based)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass
class Block:
    title: str
    line: int
    fields: dict[str, tuple[str, int]] = field(default_factory=dict)   # key -> (value, line)
    sections: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (text, line)
    repeated: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # repeatable name -> [(text, line)]
    errors: list[BlockError] = field(default_factory=list)

    def field_value(self, key: str, default: str = "") -> str:
        return self.fields.get(key, (default, self.line))[0]

    def section(self, name: str) -> str:
        return self.sections.get(name, ("", self.line))[0]

    def section_texts(self, name: str) -> list[str]:
        """Every text of a repeatable section, in file order; empty ones left out."""
        return [text for text, _ in self.repeated.get(name, []) if text.strip()]

    def line_of(self, key: str) -> int:
        entry = self.fields.get(key) or self.sections.get(key)
        return entry[1] if entry else self.line

    def flag(self, key: str, default: bool) -> bool:
        if key not in self.fields:
            return default
        value = self.field_value(key).strip().lower()
        if value in TRUE_WORDS:
            return True
        if value in FALSE_WORDS:
            return False
        raise BlockError(self.line_of(key), f"{key} must be yes or no, got {value!r}")

    def number(self, key: str, kind: type, default=None):
        raw = self.field_value(key).strip()
        if not raw:
            return default
        try:
            return kind(raw)
        except ValueError:
            raise BlockError(self.line_of(key), f"{key} must be a {kind.__name__}, got {raw!r}") from None


@dataclass
class ImportReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self, noun: str) -> str:
        return (f"{noun}: {len(self.created)} created, {len(self.updated)} updated, "
                f"{len(self.unchanged)} unchanged, {len(self.errors)} skipped with errors")


def parse_blocks(text: str, *, allowed_fields: set[str], allowed_sections: set[str],
                 repeatable_sections: frozenset[str] = frozenset()) -> list[Block]:
    """Split a resource file into blocks; problems are recorded on the block, never raised.

    A section of `repeatable_sections` may appear any number of times (Block.section_texts)."""
    blocks: list[Block] = []
    current: Block | None = None
    section_name: str | None = None
    section_lines: list[str] = []
    section_line = 0

    def close_section():
        nonlocal section_name, section_lines
        if current is not None and section_name is not None:
            entry = ("\n".join(section_lines).strip("\n"), section_line)
            if section_name in repeatable_sections:
                current.repeated.setdefault(section_name, []).append(entry)
            else:
                current.sections[section_name] = entry
        section_name, section_lines = None, []

    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.rstrip()
        if line.startswith(BLOCK_START.rstrip()) and (line == "===" or line.startswith(BLOCK_START)):
            close_section()
            title = line[len(BLOCK_START):].strip() if len(line) > 3 else ""
            current = Block(title=title, line=number)
            if not title:
                current.errors.append(BlockError(number, "a block needs a title after '==='"))
            blocks.append(current)
            continue
        if line.startswith(SECTION_START.rstrip()) and (line == "---" or line.startswith(SECTION_START)):
            close_section()
            name = line[len(SECTION_START):].strip().lower() if len(line) > 3 else ""
            if current is None:
                continue
            if name not in allowed_sections and name not in repeatable_sections:
                current.errors.append(BlockError(
                    number, f"unknown section {name!r} (known: {', '.join(sorted(allowed_sections | repeatable_sections))})"))
                continue
            if name in current.sections:
                current.errors.append(BlockError(number, f"section {name!r} appears twice"))
            section_name, section_line = name, number
            continue
        if section_name is not None:
            section_lines.append(raw_line)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if current is None:
            blocks.append(Block(title="", line=number, errors=[
                BlockError(number, "text outside a block (blocks start with '=== <title>')")]))
            continue
        match = FIELD_LINE.match(line)
        if not match:
            current.errors.append(BlockError(number, f"expected 'key: value' or '--- section', got {line.strip()!r}"))
            continue
        key = match.group(1).strip().lower().replace(" ", "_")
        if key not in allowed_fields:
            current.errors.append(BlockError(number, f"unknown field {key!r} (known: {', '.join(sorted(allowed_fields))})"))
            continue
        current.fields[key] = (match.group(2).strip(), number)
    close_section()
    return blocks
