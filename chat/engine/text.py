"""Turning generated token bytes into safe text deltas: UTF-8 reassembly and stop-string hold-back."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Decodes a byte stream piece by piece, never splitting a multibyte character.

    A token may hold half a character (byte-fallback tokens, emoji split across tokens); the
    incomplete tail is kept until the next piece completes it. Bytes that can never form valid
    UTF-8 become U+FFFD instead of raising.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Return whatever is left; an incomplete character at the very end becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopStringFilter:
    """Passes text through until a stop string appears; the stop string itself is never emitted.

    Text that could be the beginning of a stop string is held back until the following text
    shows whether it is one.
    """

    def __init__(self, stop: tuple[str, ...] | list[str]):
        self._stops = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit now; sets `stopped` when a stop string is found."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        first = min(
            (index for index in (self._pending.find(s) for s in self._stops) if index >= 0),
            default=-1,
        )
        if first >= 0:
            self.stopped = True
            emit, self._pending = self._pending[:first], ""
            return emit
        held = self._longest_stop_prefix_suffix(self._pending)
        emit = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(emit) :]
        return emit

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string followed it)."""
        emit, self._pending = ("" if self.stopped else self._pending), ""
        return emit

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string. Only where the
        stop string's first character is are its prefixes compared (this runs for every token of every stream)."""
        longest = 0
        for stop in self._stops:
            start = max(len(text) - len(stop) + 1, 0)
            position = text.find(stop[0], start)
            while position >= 0 and len(text) - position > longest:
                if stop.startswith(text[position:]):
                    longest = len(text) - position
                    break
                position = text.find(stop[0], position + 1)
        return longest


class TextAssembler:
    """Bytes of generated tokens in, client-safe text deltas out (UTF-8 first, then stop strings)."""

    def __init__(self, stop: tuple[str, ...] | list[str] = ()):
        self._utf8 = Utf8Stream()
        self._stop = StopStringFilter(stop)
        self._parts: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def feed(self, piece: bytes) -> str:
        return self._emit(self._stop.feed(self._utf8.feed(piece)))

    def finish(self) -> str:
        """Flush at the end of generation; returns the last delta (maybe empty)."""
        tail = self._stop.feed(self._utf8.flush())
        return self._emit(tail + self._stop.flush())

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta
