"""Rendered prompts that know which of their text is the chat template's own markup (docs/PROMPTS.md, "Text and markup").

Only the chat template's markup may become control tokens; everything handed to the template
(message content and names, tool definitions and arguments, dict keys too) is text, whatever it contains.
Before rendering, `guard` wraps each control-token text inside those strings (and an edge that could join
the template's text into one) in two Unicode noncharacters, and breaks each such text with a third after
its first character; after rendering, `Prompt.split` turns the wrapped spans into text, splits the rest at
the control-token texts and removes the breaks. The break holds where a template loses a wrapper: one
that splits content (Qwen3's `content.split('</think>')[-1]` drops everything before) or prints it with
Python's repr (which escapes noncharacters). The engine tokenizes each text piece without special-token
parsing and maps each markup piece to its token, so the tokens are exactly what parsing the template's
output would give, minus the client's control tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Noncharacters are reserved by Unicode for a program's internal use: the sentinels of guarded text.
TEXT_OPEN, TEXT_CLOSE = "\ufdd0", "\ufdd1"
TEXT_BREAK = "\ufdd3"  # inside each guarded control text
FINAL_MARK = "\ufdd2"  # where a continued reply's content ends (chat_template.py): never client text either
SHARED_MARK = "\ufdd4"  # where the site's own leading messages end (chat_template.py): never client text either
_SENTINELS = re.compile(f"[{TEXT_OPEN}{TEXT_CLOSE}]")
_RESERVED = re.compile(f"[{TEXT_OPEN}{TEXT_CLOSE}{TEXT_BREAK}{FINAL_MARK}{SHARED_MARK}]")
REPLACEMENT = "\ufffd"  # what a sentinel character inside client text becomes


@dataclass(frozen=True)
class Piece:
    """A run of prompt text: one control token's text (`control`), or text tokenized as text."""

    text: str
    control: bool = False


class Prompt(str):
    """Prompt text split into pieces; `str` operations on it return plain `str` (pieces lost).

    The site's own content (a character's system prompt and persona, nothing of a user's) comes first: the
    `shared_pieces` leading pieces, then the first `shared_chars` characters of the next text piece. That part's
    evaluated cells any tenant's prompt may reuse (docs/ARCHITECTURE.md, "Tenants and the prefix cache")."""

    pieces: tuple[Piece, ...]
    shared_pieces: int
    shared_chars: int

    def __new__(cls, pieces: Iterable[Piece], shared_pieces: int = 0, shared_chars: int = 0):
        pieces = tuple(pieces)
        prompt = super().__new__(cls, "".join(piece.text for piece in pieces))
        prompt.pieces = pieces
        prompt.shared_pieces = max(0, min(shared_pieces, len(pieces)))
        within = pieces[prompt.shared_pieces] if prompt.shared_pieces < len(pieces) else None
        prompt.shared_chars = max(0, min(shared_chars, len(within.text))) if within and not within.control else 0
        return prompt

    def __reduce__(self):  # pickle and copy keep the pieces (str's own way would rebuild from the text)
        return Prompt, (self.pieces, self.shared_pieces, self.shared_chars)

    @property
    def markup_offsets(self) -> tuple[int, ...]:
        """Where the control tokens start: two prompts of equal text differ here when client text mimics markup."""
        offsets, position = [], 0
        for piece in self.pieces:
            if piece.control:
                offsets.append(position)
            position += len(piece.text)
        return tuple(offsets)


class ControlTexts:
    """The texts that special-token parsing turns into control tokens, for one vocabulary."""

    def __init__(self, texts: Iterable[str]):
        self.texts = tuple(sorted({text for text in texts if text}, key=len, reverse=True))
        # Longest first at each position, as llama.cpp's own parsing prefers the longer token.
        self._pattern = re.compile("|".join(map(re.escape, self.texts))) if self.texts else None
        self._prefixes = {text[:end] for text in self.texts for end in range(1, len(text))}
        self._suffixes = {text[start:] for text in self.texts for start in range(1, len(text))}
        self._longest = max(map(len, self.texts), default=0)

    def __bool__(self) -> bool:
        return bool(self.texts)

    def guard(self, value):
        """`value` (a string, or dicts and lists of them) with its control-token texts wrapped as text."""
        if isinstance(value, str):
            return self._guard_text(value)
        if isinstance(value, dict):  # keys too: a template may print a tool's schema whole (tojson)
            return {self.guard(key): self.guard(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.guard(item) for item in value]
        return value

    def _guard_text(self, text: str) -> str:
        text = _RESERVED.sub(REPLACEMENT, text)  # client text cannot open, close or break a guarded span
        if self._pattern is None:
            return text
        spans = [match.span() for match in self._pattern.finditer(text)]
        # An edge that could join the template's text next to it into a control token (e.g. a
        # trailing "<|im_" before markup that goes on "end|>") is text too.
        head = next((size for size in range(min(len(text), self._longest - 1), 0, -1)
                     if text[:size] in self._suffixes), 0)
        tail = next((size for size in range(min(len(text), self._longest - 1), 0, -1)
                     if text[-size:] in self._prefixes), 0)
        if head:
            spans.insert(0, (0, head))
        if tail:
            spans.append((len(text) - tail, len(text)))
        if not spans:
            return text
        breaks = {start + 1 for start, end in spans if end - start > 1}  # no control text is one character
        out, position = [], 0
        for start, end in _merged(spans):
            inside = "".join(TEXT_BREAK + char if index in breaks else char
                             for index, char in enumerate(text[start:end], start))
            out += [text[position:start], TEXT_OPEN, inside, TEXT_CLOSE]
            position = end
        out.append(text[position:])
        return "".join(out)

    def split(self, rendered: str) -> Prompt:
        """The pieces of a template's output: guarded spans are text, other control-token texts are markup.
        A SHARED_MARK (chat_template.py) ends the site's own content: it is removed, and the Prompt records where
        it was (`shared_pieces`, `shared_chars`)."""
        pieces: list[Piece] = []
        text: list[str] = []

        def flush() -> None:
            joined = "".join(text).replace(TEXT_BREAK, "")
            if joined:
                pieces.append(Piece(joined))
            text.clear()

        for chunk, guarded in _segments(rendered):
            if guarded or self._pattern is None:
                text.append(chunk)
                continue
            position = 0
            for match in self._pattern.finditer(chunk):
                text.append(chunk[position:match.start()])
                flush()
                pieces.append(Piece(match.group(), control=True))
                position = match.end()
            text.append(chunk[position:])
        flush()
        return _without_shared_mark(pieces)


def _without_shared_mark(pieces: list[Piece]) -> Prompt:
    marked = next((index for index, piece in enumerate(pieces) if SHARED_MARK in piece.text), None)
    if marked is None:
        return Prompt(pieces)
    unmarked = [Piece(piece.text.replace(SHARED_MARK, ""), piece.control) for piece in pieces]
    chars = pieces[marked].text.index(SHARED_MARK)  # the first mark counts (a template may print a message twice)
    whole = marked + 1 if chars == len(unmarked[marked].text) else marked
    kept = [piece for piece in unmarked if piece.text]
    return Prompt(kept, shared_pieces=sum(1 for piece in unmarked[:whole] if piece.text),
                  shared_chars=0 if whole > marked else chars)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _segments(rendered: str):
    """(chunk, guarded) runs of `rendered` with the sentinels removed; one a template dropped ends nothing early."""
    depth, position = 0, 0
    for match in _SENTINELS.finditer(rendered):
        if match.start() > position:
            yield rendered[position:match.start()], depth > 0
        depth = depth + 1 if match.group() == TEXT_OPEN else max(depth - 1, 0)
        position = match.end()
    if position < len(rendered):
        yield rendered[position:], depth > 0


# -- servers that tokenize themselves (chat/engine/remote.py) -------------------------------------

WORD_JOINER = "\u2060"  # invisible and never part of a control token: what breaks one up
# Control-token texts of the common chat formats (we do not know a remote model's vocabulary): ChatML,
# Llama 3, Phi and most recent ones (<|...|>), DeepSeek (fullwidth bars), EXAONE ([|...|]), Llama 2 / Mistral,
# Gemma, Seed-OSS (<seed:...>), Nemotron (<extra_id_N>), and the usual BOS/EOS/padding texts.
_CONTROL_LIKE = re.compile(
    r"<\|[^\s<>|]{0,64}\|>"
    r"|<\uff5c[^\s<>\uff5c]{0,64}\uff5c>"
    r"|\[\|[^\s\[\]|]{1,64}\|\]"
    r"|</?seed:[^\s<>]{1,64}>|<extra_id_\d{1,4}>"
    r"|</?s>|<(?:unk|pad|bos|eos|mask|eot|sep|cls)>"
    r"|<(?:start|end)_of_(?:turn|image|text)>"
    r"|\[/?(?:INST|AVAILABLE_TOOLS|TOOL_RESULTS|SYSTEM_PROMPT)\]|\[TOOL_CALLS\]"
    r"|<</?SYS>>"
)


# Tag-like literals a chat template writes: its turn markup ([INST], <<SYS>>, <|user|>, <start_of_turn>).
TAG_LITERAL = re.compile(r"<\|[^\s<>|]{1,64}\|>|<[A-Za-z_/][^\s<>'\"]{0,40}>|\[/?[A-Z][A-Z_]{1,30}\]")


def markup_literals(template_source: str, control_texts: Iterable[str] = ()) -> tuple[str, ...]:
    """The tag-like literals of a chat template that are not control tokens of the vocabulary (`control_texts`):
    markup the model reads as text (Llama 2's [INST] and <<SYS>>, Zephyr's <|user|>, ChatML's tags in a vocabulary
    without them), which client text tokenized as text would spell exactly. Longest first."""
    controls = set(control_texts)
    found = set(TAG_LITERAL.findall(template_source)) | set(_CONTROL_LIKE.findall(template_source))
    return tuple(sorted((text for text in found if len(text) > 1 and text not in controls), key=len, reverse=True))


def broken(value, texts: Iterable[str]):
    """`value` (a string, or dicts and lists of them, keys too) with each of `texts` broken up by a word joiner
    after its first character."""
    texts = tuple(text for text in texts if len(text) > 1)
    if not texts:
        return value
    if isinstance(value, str):
        for text in texts:
            value = value.replace(text, _joined(text))
        return value
    if isinstance(value, dict):
        return {broken(key, texts): broken(item, texts) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [broken(item, texts) for item in value]
    return value


def neutralized(value, extra: Iterable[str] = ()):
    """`value` (a string, or dicts and lists of them) with every control-token-like text broken up by a
    word joiner after its first character, so that a server's own special-token parsing leaves it text.
    `extra`: more texts to break up (e.g. the markup literals of the configured chat template)."""
    extra = tuple(text for text in extra if len(text) > 1)
    if isinstance(value, str):
        return broken(_CONTROL_LIKE.sub(lambda match: _joined(match.group()), value), extra)
    if isinstance(value, dict):  # keys too: the server may print a tool's schema whole
        return {neutralized(key, extra): neutralized(item, extra) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [neutralized(item, extra) for item in value]
    return value


def _joined(text: str) -> str:
    return text[0] + WORD_JOINER + text[1:]
